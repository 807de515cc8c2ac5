"""FP8 training state: what an FP8 compute weight and a module's FP8 scaling state consist of.

Snapshots copy raw bytes, so an FP8 weight must be captured as the tensors that hold it, not as
the high-precision view it presents:

* a plain torch float8 tensor (``torch.float8_e4m3fn`` ...) is its own bytes (one per element);
  a scale kept beside it is a module buffer and is captured as one;
* a Transformer Engine ``Float8Tensor`` (FP8 primary weights, ``fp8_param_gather``) is a
  wrapper whose nominal dtype is the high-precision one; its state is ``_data`` (uint8, one byte
  per element) and ``_scale_inv`` (FP32). Its ``_transpose`` is a cache derived from ``_data``:
  it is not captured, and is invalidated after a restore so that TE recomputes it identically;
* a TE ``MXFP8Tensor`` holds row-wise and/or column-wise data and block scales
  (``_rowwise_data``, ``_rowwise_scale_inv``, ``_columnwise_data``, ``_columnwise_scale_inv``);
  each present one is captured.

A TE module's delayed-scaling state (``module.fp8_meta["scaling_fwd"|"scaling_bwd"]``: ``scale``,
``amax_history`` and, in older TE, ``scale_inv``) is neither a parameter nor a buffer; the
registry makes each of those tensors a buffer of the operator that owns the module
(:func:`fp8_meta_tensors`). TE updates them in place during the forward pass of each iteration
(the amax history is rolled in place), so restoring them before a replay and letting the replay
run reproduces them exactly. With current (tensor-wise) scaling there is no state beyond the
tensor.

Transformer Engine is never imported here: its tensors are recognised by their attributes, which
is also what lets the CPU tests use a double with TE's layout.
"""

from __future__ import annotations

from typing import Any

import torch

FLOAT8_COMPONENTS = ("_data", "_scale_inv")
"""State of a ``Float8Tensor`` (``_transpose`` is a derived cache)."""

MXFP8_COMPONENTS = (
    "_rowwise_data",
    "_rowwise_scale_inv",
    "_columnwise_data",
    "_columnwise_scale_inv",
)
"""State of an ``MXFP8Tensor`` (those present; a usage TE did not create is ``None``)."""

FP8_META_KEYS = ("scaling_fwd", "scaling_bwd")
"""The delayed-scaling entries of a TE module's ``fp8_meta``."""

FP8_META_FIELDS = ("scale", "scale_inv", "amax_history")
"""Tensors of one delayed-scaling entry (``scale_inv`` only in older TE)."""

SUPPORTED_FP8_RECIPES = ("delayed", "tensorwise", "mxfp8")
"""Megatron-Core ``fp8_recipe`` values whose state MoEvement captures exactly."""


class FP8StateError(RuntimeError):
    """An FP8 configuration or tensor whose state MoEvement cannot capture exactly."""


def is_float8_dtype(dtype: torch.dtype) -> bool:
    """True for torch's float8 dtypes (``float8_e4m3fn``, ``float8_e5m2``, ...)."""
    return "float8" in str(dtype)


def is_mxfp8_tensor(tensor: Any) -> bool:
    """True for a TE ``MXFP8Tensor`` (recognised by its row-/column-wise buffers)."""
    return hasattr(tensor, "_rowwise_data") and hasattr(tensor, "_columnwise_data")


def is_float8_tensor(tensor: Any) -> bool:
    """True for a TE ``Float8Tensor`` (recognised by ``_data``, ``_scale_inv``, ``_fp8_dtype``)."""
    return all(hasattr(tensor, a) for a in ("_data", "_scale_inv", "_fp8_dtype"))


def is_quantized(tensor: Any) -> bool:
    """True for a TE quantized tensor, whose bytes are not its nominal dtype's (any subclass of
    TE's ``QuantizedTensor``, also one of a layout :func:`quantized_components` refuses)."""
    if is_float8_tensor(tensor) or is_mxfp8_tensor(tensor):
        return True
    return any(cls.__name__ == "QuantizedTensor" for cls in type(tensor).__mro__)


def quantized_components(tensor: Any) -> list[tuple[str, torch.Tensor]]:
    """``(component name, live tensor)`` pairs that hold a quantized tensor's state.

    Raises:
        FP8StateError: for a quantized tensor of a layout this module does not know (e.g. TE's
            block-wise ``Float8BlockwiseQTensor``): capturing its nominal view would silently
            re-quantize it on restore.
    """
    if is_mxfp8_tensor(tensor):
        names = MXFP8_COMPONENTS
    elif is_float8_tensor(tensor):
        names = FLOAT8_COMPONENTS
    else:
        raise FP8StateError(
            f"{type(tensor).__name__} is a quantized tensor of a layout MoEvement does not know; "
            f"supported: Float8Tensor, MXFP8Tensor (fp8_recipe in {SUPPORTED_FP8_RECIPES})"
        )
    out = []
    for name in names:
        value = getattr(tensor, name, None)
        if value is not None:
            out.append((name, value.detach()))
    if not out:
        raise FP8StateError(f"{type(tensor).__name__} holds none of {names}: nothing to capture")
    return out


def invalidate_caches(tensor: Any) -> None:
    """After writing a quantized tensor's components in place: drop what TE derived from them
    (the FP8 transpose), so that it is recomputed from the restored data."""
    reset = getattr(tensor, "_reset_caches", None)
    if callable(reset):
        reset()
        return
    if hasattr(tensor, "_transpose"):
        tensor._transpose = None
    if hasattr(tensor, "_transpose_invalid"):
        tensor._transpose_invalid = True


def fp8_meta_tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(path, live tensor)`` of a TE module's delayed-scaling state, path relative to the
    module (``"fp8_meta.scaling_fwd.amax_history"``); empty for modules without FP8 state."""
    meta = getattr(module, "fp8_meta", None)
    if not isinstance(meta, dict):
        return []
    out = []
    for key in FP8_META_KEYS:
        entry = meta.get(key)
        if entry is None:
            continue
        for field in FP8_META_FIELDS:
            value = getattr(entry, field, None)
            if torch.is_tensor(value):
                out.append((f"fp8_meta.{key}.{field}", value))
    return out


def resolve_fp8_meta(module: torch.nn.Module, path: str) -> torch.Tensor:
    """The live tensor at ``path`` (from :func:`fp8_meta_tensors`) of ``module``, read anew each
    time: TE reallocates its meta tensors when the recipe or the amax history length changes."""
    _, key, field = path.split(".")
    value = getattr(module.fp8_meta[key], field)
    return value.detach()


def fp8_refusal(config: Any) -> str | None:
    """Why MoEvement refuses the model's FP8 options, or ``None`` when it captures their state.

    Args:
        config: The model's ``TransformerConfig``.

    Returns:
        A reason naming the option and the fix for an ``fp8_recipe`` outside
        :data:`SUPPORTED_FP8_RECIPES` (block-wise scaling keeps its scales in a layout not
        handled here; a ``custom`` recipe is state nobody described), else ``None``.
    """
    if not getattr(config, "fp8", None):
        return None
    recipe = str(getattr(config, "fp8_recipe", "delayed") or "delayed")
    recipe = recipe.rsplit(".", 1)[-1].lower()
    if recipe in SUPPORTED_FP8_RECIPES:
        return None
    return (
        f"fp8_recipe={recipe!r} with fp8={config.fp8!r} (its scaling state cannot be captured "
        f"bit-exactly; use --fp8-recipe {'|'.join(SUPPORTED_FP8_RECIPES)})"
    )
