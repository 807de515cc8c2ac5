"""Point-to-point transfer of byte payloads and snapshot slots over the current default process
group."""

from __future__ import annotations

import json

import torch


def send_bytes(payload: bytes, dst: int) -> None:
    """Sends a length header, then ``payload`` (if any), to global rank ``dst``."""
    import torch.distributed as dist

    data = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else None
    dist.send(torch.tensor([len(payload)], dtype=torch.int64), dst)
    if data is not None:
        dist.send(data, dst)


def recv_bytes(src: int) -> bytes:
    """Receives what :func:`send_bytes` sent from global rank ``src``."""
    import torch.distributed as dist

    n = torch.zeros(1, dtype=torch.int64)
    dist.recv(n, src)
    data = torch.empty(int(n.item()), dtype=torch.uint8)
    if data.numel():
        dist.recv(data, src)
    return bytes(data.numpy())


def send_slot(slot, dst: int) -> None:
    """Verifies ``slot`` (a :class:`~megatron_moevement.snapshot.engine.SlotSnapshot`), then sends its
    manifest and the used prefix of its buffer to global rank ``dst``."""
    slot.verify()
    send_bytes(json.dumps(slot.manifest()).encode(), dst)
    send_bytes(bytes(slot.buffer[: slot.used_bytes].numpy()), dst)


def recv_slot(src: int, manifest: dict | None = None):
    """Receives what :func:`send_slot` sent from global rank ``src`` into a fresh host buffer and
    verifies its checksums. ``manifest``: the manifest, if the caller already received it."""
    from megatron_moevement.snapshot.buffers import allocate_host_buffer
    from megatron_moevement.snapshot.slots import SlotSnapshot

    if manifest is None:
        manifest = json.loads(recv_bytes(src))
    payload = recv_bytes(src)
    buf = allocate_host_buffer(len(payload))
    if payload:
        buf[: len(payload)].copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    slot = SlotSnapshot.from_manifest(manifest, buf)
    slot.verify()
    return slot
