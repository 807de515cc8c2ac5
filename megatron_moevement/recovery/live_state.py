"""A rank's live training state as host copies: kept across a recovery rebuild, fingerprinted.

A rank outside a recovery's scope keeps its live state: :func:`capture_live_state` copies every
tensor of it to host memory before the process groups are torn down, and
:func:`restore_live_state` writes it into the rebuilt model and optimizer.
:func:`state_fingerprint` is the CRC32 the initial-state recovery tier compares a fresh build
against.
"""

from __future__ import annotations

import torch

from megatron_moevement.state.operators import operator_tensors


# ---------------------------------------------------------------------------- live state backup
def capture_live_state(registry, buffers: dict | None = None) -> dict[str, torch.Tensor]:
    """Host copies of every tensor of this rank's training state (kept across a rebuild).

    Args:
        registry: The rank's operator registry.
        buffers: The buffers as the last completed iteration left them (the strategy's
            ``buffers_after_step``): a failure mid-iteration finds buffers that the interrupted
            forward passes already changed (the routers' token counts), which the live copy must
            not keep.
    """
    registry.refresh()
    out = {}
    for op in registry.operators:
        for key, tensor in operator_tensors(op, ("compute", "main", "optim")):
            out[key] = tensor.detach().to("cpu", copy=True)
    for key, tensor in (buffers or {}).items():
        out[key] = tensor.detach().to("cpu", copy=True)
    return out


def state_fingerprint(registry) -> str:
    """CRC32 over this rank's compute weights and main parameters, in registry order.

    Recorded when a job starts and compared after a rebuild: equal only if the rebuild
    reproduces the job's initial weights (a seeded build), which the initial-state recovery tier
    requires. Optimizer moments are left out: before the first step they do not exist yet.
    """
    import zlib

    from megatron_moevement.snapshot.checksum import checksum

    registry.refresh()
    digest = 0
    for op in registry.operators:
        for key, tensor in operator_tensors(op, ("compute", "main")):
            digest = zlib.crc32(f"{key}:{checksum(tensor)};".encode(), digest)
    return f"{digest & 0xFFFFFFFF:08x}"


def restore_live_state(registry, backup: dict[str, torch.Tensor]) -> int:
    """Copies :func:`capture_live_state` output into a rebuilt model and optimizer."""
    registry.refresh()
    restored = 0
    with torch.no_grad():
        for op in registry.operators:
            for key, live in operator_tensors(op, ("compute", "main", "optim")):
                saved = backup.get(key)
                if saved is None or saved.shape != live.shape or saved.dtype != live.dtype:
                    raise RuntimeError(
                        f"cannot restore {key!r} after the rebuild: the saved state does not "
                        "match the rebuilt model (layout or config changed)"
                    )
                live.copy_(saved)
                restored += 1
            op.after_restore()
    return restored
