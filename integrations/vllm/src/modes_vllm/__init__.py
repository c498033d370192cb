"""MoDES expert skipping for vLLM: ``MODES_PLAN=plan.json vllm serve MODEL``.

A `vllm.general_plugins` entry point: vLLM calls `register` in each of its processes. With
``MODES_PLAN`` set it checks the plan file (a bad one stops vLLM at start-up with the reason)
and registers vLLM's Qwen3-MoE and Qwen3-VL-MoE under their own architecture names with each
MoE layer's routing passed through the MoDES rule (`modes_vllm.models`). Without it, vLLM runs
unchanged. ``VLLM_PLUGINS=modes`` also enables the `modes_vllm.serving` endpoints
(``/v1/modes/stats``, ``x-modes-skip-ratio``). The rule is `modes.routing`, vendored unchanged
as `modes_vllm.routing`; this package imports neither modes nor transformers' MoE code.
"""

from __future__ import annotations

import logging
import os

from modes_vllm.skipping import PlanFileError, load_plan, skip_stats

__all__ = ["ARCHITECTURES", "TESTED_VLLM", "PlanFileError", "register", "skip_stats"]

# the vLLM release whose MoE internals (runner, router, experts classes) the plugin is tested on
TESTED_VLLM = "0.32"

# vLLM architecture name -> the MoDES class that replaces it while a plan is set
ARCHITECTURES = {
    "Qwen3VLMoeForConditionalGeneration": "modes_vllm.models:ModesQwen3VLMoeForConditionalGeneration",
    "Qwen3MoeForCausalLM": "modes_vllm.models:ModesQwen3MoeForCausalLM",
}


def register() -> None:
    """vLLM's plugin hook: with ``MODES_PLAN`` set, check the plan and register the classes."""
    path = os.environ.get("MODES_PLAN")
    if not path:
        return
    load_plan(path)  # raises PlanFileError with the reason, before vLLM loads anything
    import vllm
    from vllm import ModelRegistry
    from vllm.v1.worker.worker_base import WorkerBase

    from modes_vllm.serving import worker_skip_stats

    if not vllm.__version__.startswith(f"{TESTED_VLLM}."):
        logging.getLogger(__name__).warning(
            "modes-vllm is tested with vLLM %s.x and runs on vLLM %s: the MoE internals it wraps may "
            "have moved; run integrations/vllm/run-tests against this vLLM before serving",
            TESTED_VLLM,
            vllm.__version__,
        )
    for architecture, model_class in ARCHITECTURES.items():
        ModelRegistry.register_model(architecture, model_class)
    WorkerBase.modes_skip_stats = worker_skip_stats  # reached by collective_rpc (modes_vllm.serving)
