"""Point-to-point transfer of byte payloads over the current default process group."""

from __future__ import annotations

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
