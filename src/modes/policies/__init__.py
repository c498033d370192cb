"""Skipping policies as typed, versioned configs: MoDES and each baseline.

A policy config is plain data (what a plan file stores); it validates itself, checks that it
fits a model, and builds the `modes.engine.rules` rule of each MoE layer. Adding a policy is
one `PolicyConfig` subclass registered with `register_policy` (and its rule, if new).
"""

from modes.policies.base import PolicyConfig, policy_from_json, register_policy, registered_policies
from modes.policies.builtin import DiepConfig, KReductionConfig, McMoeConfig, ModesConfig, NaeeConfig

__all__ = [
    "DiepConfig",
    "KReductionConfig",
    "McMoeConfig",
    "ModesConfig",
    "NaeeConfig",
    "PolicyConfig",
    "policy_from_json",
    "register_policy",
    "registered_policies",
]
