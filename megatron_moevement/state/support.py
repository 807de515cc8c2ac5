"""Which Megatron-Core model configurations the strategy accepts, and why it refuses others.

Most MoE options only add tensors that the operator registry places (and then checks; see
:mod:`megatron_moevement.state.operators`). A few change how training computes in ways a bitwise
replay cannot rely on, or that this package has not been able to build and test: those are
refused when the strategy is built, with the option, the reason and the fix.
``docs/support.md`` is the matrix, with the test behind each line.
"""

from __future__ import annotations

from typing import Any

from megatron_moevement.state.fp8 import fp8_refusal

__all__ = ["UnsupportedModelError", "check_model_supported"]


class UnsupportedModelError(ValueError):
    """The model's configuration uses an option MoEvement cannot recover bit-exactly."""


def _refusals(config: Any) -> list[str]:
    refused = []
    if getattr(config, "moe_token_dispatcher_type", "alltoall") == "flex":
        refused.append(
            "moe_token_dispatcher_type='flex' (DeepEP's fused dispatch: its kernels need CUDA "
            "and have not been shown to route deterministically, which replay relies on; use "
            "'alltoall' or 'allgather')"
        )
    if getattr(config, "virtual_pipeline_model_parallel_size", None):
        refused.append(
            "virtual pipeline parallelism (upstream logging follows the 1F1B schedule; use one "
            "model chunk per rank)"
        )
    fp8 = fp8_refusal(config)
    if fp8:
        refused.append(fp8)
    if getattr(config, "fp4", None):
        refused.append("fp4 (no FP4 snapshot layout; use bf16 or fp8)")
    if getattr(config, "cpu_offloading", False):
        refused.append(
            "cpu_offloading (offloaded activations and weights are outside the operators' state)"
        )
    return refused


def check_model_supported(config: Any) -> None:
    """Raises :class:`UnsupportedModelError` for a configuration the strategy refuses.

    Args:
        config: The model's Megatron-Core ``TransformerConfig``.
    """
    refused = _refusals(config)
    if refused:
        raise UnsupportedModelError(
            "MoEvement cannot checkpoint this model bit-exactly: "
            + "; ".join(refused)
            + ". Fix: change those options, or train without MoEvement (--ckpt-strategy default)."
        )
