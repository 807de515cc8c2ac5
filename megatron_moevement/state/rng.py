"""A rank's random-number generator states: what dropout and input jitter draw from.

Replay must draw the same random numbers the original run drew, so the generator states are part
of the training state: torch's CPU generator, every CUDA device's generator, and the named states
of Megatron-Core's RNG tracker (``model-parallel-rng``, ``expert-parallel-rng``, ...; forked around
tensor-parallel regions). They are per rank (each rank draws its own), small (a few KB) and
captured as raw bytes, so restoring them is exact.
"""

from __future__ import annotations

import torch

__all__ = ["RNG_PREFIX", "rng_state", "set_rng_state"]

RNG_PREFIX = "rank/rng/"
"""Prefix of the snapshot records that hold a rank's generator states."""


def _tracker():
    try:
        from megatron.core.tensor_parallel import random as mrandom
    except ImportError:  # pragma: no cover - Megatron-Core is a dependency
        return None
    if not getattr(mrandom, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", False):
        return None
    tracker = mrandom.get_cuda_rng_tracker()
    return tracker if tracker.is_initialized() else None


def _as_bytes(state) -> torch.Tensor:
    if not torch.is_tensor(state):
        raise TypeError(f"an RNG state of type {type(state).__name__} cannot be captured as bytes")
    return state.detach().to("cpu").reshape(-1).view(torch.uint8).clone()


def rng_state() -> dict[str, torch.Tensor]:
    """``{name: uint8 CPU tensor}`` of every generator state of this process."""
    states = {"cpu": _as_bytes(torch.get_rng_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for device in range(torch.cuda.device_count()):
            states[f"cuda{device}"] = _as_bytes(torch.cuda.get_rng_state(device))
    tracker = _tracker()
    if tracker is not None:
        for name, state in sorted(tracker.get_states().items()):
            states[f"tracker/{name}"] = _as_bytes(state)
    return states


def set_rng_state(states: dict[str, torch.Tensor]) -> None:
    """Puts back what :func:`rng_state` returned (states this process does not have are an
    error: the layout or the device set changed)."""
    tracker = _tracker()
    tracker_states = tracker.get_states() if tracker is not None else {}
    updated = dict(tracker_states)
    for name, value in states.items():
        raw = value.detach().to("cpu").reshape(-1).view(torch.uint8).clone()
        if name == "cpu":
            torch.set_rng_state(raw)
        elif name.startswith("cuda"):
            torch.cuda.set_rng_state(raw, int(name[4:]))
        elif name.startswith("tracker/"):
            key = name[len("tracker/") :]
            if key not in tracker_states:
                raise KeyError(
                    f"RNG tracker state {key!r} was captured but this process's tracker has "
                    f"{sorted(tracker_states)}; restore on the layout and seed that captured it"
                )
            updated[key] = raw.view(tracker_states[key].dtype).reshape(tracker_states[key].shape)
        else:
            raise KeyError(f"unknown RNG state {name!r}")
    if tracker is not None and updated is not tracker_states:
        tracker.set_states(updated)
