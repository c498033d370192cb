"""Loading models and processors, including Qwen-VL processors on machines without torchvision.

transformers 5.x builds every Qwen-VL processor with a video processor, and video processors
need torchvision; on a CPU-only machine with the CPU torch build, torchvision is often not
installable. `load_processor` then builds the same processor class from the same files with
the PIL image processor and no video half: images and text work, videos raise.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
)
from transformers.utils import is_torchvision_available

from modes.checkpoints import hub_layout_loading

__all__ = [
    "PATCH_SIZE",
    "build_qwen3_vl_processor",
    "bundled_model_path",
    "input_device",
    "load_model",
    "load_processor",
]

PATCH_SIZE = (
    16  # bundled model: 192 px images -> 12 x 12 patches -> 36 tokens after 2x2 merge (4 per grid cell)
)


def build_qwen3_vl_processor(
    tokenizer: Any, image_size: int, processor_class: str = "Qwen3VLProcessor"
) -> Any:
    """A Qwen-VL processor with a PIL image processor fixed to ``image_size`` square images."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    pixels = image_size * image_size
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=PATCH_SIZE,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": pixels, "longest_edge": pixels},
    )
    return _processor_without_video(processor_class, tokenizer, image_processor)


def _processor_without_video(processor_class: str, tokenizer: Any, image_processor: Any) -> Any:
    """Instance of ``processor_class`` without calling the torchvision-bound constructor."""
    cls = getattr(transformers, processor_class)
    processor = cls.__new__(cls)
    processor.tokenizer = tokenizer
    processor.image_processor = image_processor
    processor.video_processor = None
    processor.chat_template = tokenizer.chat_template
    for kind, default in (("image", "<|image_pad|>"), ("video", "<|video_pad|>")):
        token = getattr(tokenizer, f"{kind}_token", None) or default
        setattr(processor, f"{kind}_token", token)
        setattr(processor, f"{kind}_token_id", tokenizer.convert_tokens_to_ids(token))
    processor.vision_start_token = "<|vision_start|>"
    processor.vision_end_token = "<|vision_end|>"
    return processor


def load_processor(path: str | Path) -> Any:
    """`AutoProcessor.from_pretrained(path)`, or the torchvision-free equivalent described above."""
    if is_torchvision_available():
        return AutoProcessor.from_pretrained(path)
    path = Path(path)
    config_file = path / "processor_config.json"
    processor_class = (
        json.loads(config_file.read_text()).get("processor_class") if config_file.exists() else None
    )
    if processor_class not in ("Qwen3VLProcessor", "Qwen2_5_VLProcessor", "Qwen2VLProcessor"):
        return AutoProcessor.from_pretrained(path)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(path)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
    return _processor_without_video(processor_class, tokenizer, image_processor)


def bundled_model_path() -> Path:
    """Directory of the shipped checkpoint and processor (a trained tiny Qwen3-VL-MoE)."""
    path = Path(__file__).parent / "bundled" / "checkpoint"
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"the bundled checkpoint is missing from {path}; reinstall modes")
    return path


def load_model(
    name_or_path: str | Path | None = None, dtype: torch.dtype | str = torch.float32, **placement: Any
) -> tuple[Any, Any]:
    """(model, processor) in eval mode: the bundled model by default, else any local or hub
    checkpoint (fused experts in Hub or transformers layout, square ones too: `modes.checkpoints`).
    ``placement`` goes to ``from_pretrained`` (``device_map``, ``max_memory``, ``offload_folder``:
    accelerate dispatches models larger than one device). Under torchrun with ``device_map`` and no
    ``max_memory``, each rank takes its own block of the node's GPUs (`modes.parallel.gpus_of_rank`)."""
    if placement.get("device_map") is not None and "max_memory" not in placement:
        placement["max_memory"] = _rank_max_memory()
    path = bundled_model_path() if name_or_path is None else name_or_path
    with hub_layout_loading(path):
        try:
            model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, **placement)
        except ValueError:  # text-only MoE checkpoints have no image-text-to-text class
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **placement)
    return model.eval(), load_processor(path)


def _rank_max_memory() -> dict[Any, Any] | None:
    """max_memory keeping this rank on its own GPUs (None: one process, or no GPU)."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local_world <= 1 or not torch.cuda.is_available():
        return None
    from modes.parallel import gpus_of_rank

    mine = gpus_of_rank(torch.cuda.device_count(), int(os.environ.get("LOCAL_RANK", "0")), local_world)
    memory = {
        gpu: (torch.cuda.mem_get_info(gpu)[1] if gpu in mine else 0)
        for gpu in range(torch.cuda.device_count())
    }
    return memory


def input_device(model: Any) -> torch.device:
    """Where the model's inputs go: its first device that holds weights (models dispatched by
    accelerate keep offloaded weights on "meta" or on disk and load them per call)."""
    device_map = getattr(model, "hf_device_map", None) or {}
    placed = [d for d in device_map.values() if str(d) not in ("disk", "meta")]
    if placed:
        first = placed[0]
        return torch.device(f"cuda:{first}" if isinstance(first, int) else first)
    for parameter in model.parameters():
        if parameter.device.type != "meta":
            return parameter.device
    return torch.device("cpu")
