"""Raw-byte identity of snapshot tensors: dtype names, checksums and the corruption errors.

Snapshots must restore *bit-exactly*, so every tensor is stored as its raw bytes
(``tensor.view(torch.uint8)``) with its dtype name and shape, and a checksum of those bytes.
No arithmetic conversion ever touches the values: NaN payloads, infinities, negative zero and
the special encodings of the float8 formats survive unchanged. :func:`checksum` hashes raw
bytes (``crc32c``, the default, ``crc32`` or ``sha256``); a mismatch is a :class:`SnapshotChecksumError` naming the
tensor and shard, the expected and actual checksum, and the fallback (peer replica, then the
next storage tier).
"""

from __future__ import annotations

import hashlib
import zlib
from typing import Any, Callable, Iterable, Optional, Union

import torch

from megatron_moevement.constants import CHECKSUM_ALGORITHMS, DEFAULT_CHECKSUM

_FALLBACK_ADVICE = (
    "Do not load this copy: restore the shard from a peer replica, or from the next storage "
    "tier (durable checkpoint) if no replica verifies."
)


class SerializationError(ValueError):
    """Raised for objects that cannot be packed or restored (with the reason and the fix)."""


class SnapshotCorruptionError(RuntimeError):
    """Raised when snapshot bytes are missing, truncated or do not match their manifest."""


class SnapshotChecksumError(SnapshotCorruptionError):
    """Raised when the checksum of a tensor's bytes differs from the recorded one.

    Attributes:
        name: Tensor (or component) name.
        shard: Shard name, if known.
        algorithm: Checksum algorithm.
        expected: Recorded checksum.
        got: Checksum of the bytes at hand.
    """

    def __init__(
        self, name: str, expected: str, got: str, algorithm: str, shard: Optional[str] = None
    ) -> None:
        self.name, self.shard, self.algorithm = name, shard, algorithm
        self.expected, self.got = expected, got
        where = f"tensor {name!r}" + (f" of shard {shard!r}" if shard else "")
        super().__init__(
            f"Snapshot checksum mismatch for {where} ({algorithm}): expected {expected}, got "
            f"{got}. The bytes are corrupted (bad host memory, a truncated transfer or a torn "
            f"write). {_FALLBACK_ADVICE}"
        )


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float8_e4m3fn`` -> ``"float8_e4m3fn"`` (stable across processes and versions)."""
    return str(dtype).split(".", 1)[-1]


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`.

    Raises:
        SerializationError: when this torch build lacks the dtype.
    """
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise SerializationError(
            f"dtype {name!r} of the snapshot is not available in torch {torch.__version__}. Fix: "
            "restore with the torch version that wrote the snapshot (or a newer one)."
        )
    return dtype


def _raw_bytes(t: torch.Tensor, what: str) -> torch.Tensor:
    """1-D uint8 view of ``t``'s bytes (contiguous copy first if needed), on ``t``'s device."""
    if t.is_quantized:
        raise SerializationError(
            f"{what}: quantized tensors ({t.dtype}) have no raw byte view. Fix: pack "
            "t.int_repr() and the quantization parameters separately."
        )
    flat = t.detach()
    if not flat.is_contiguous():
        flat = flat.contiguous()
    try:
        return flat.reshape(-1).view(torch.uint8)
    except RuntimeError as exc:
        raise SerializationError(f"{what}: cannot view dtype {t.dtype} as bytes ({exc}).") from exc


def _host_buffer(data: Any) -> Any:
    """Object supporting the buffer protocol for hashing (numpy view of a CPU uint8 tensor)."""
    if isinstance(data, torch.Tensor):
        raw = _raw_bytes(data, "checksum")
        if raw.device.type != "cpu":
            raw = raw.cpu()
        return raw.numpy()
    if isinstance(data, (bytes, bytearray, memoryview)):
        return data
    raise SerializationError(
        "checksum expects bytes, bytearray, memoryview or a torch.Tensor, got "
        f"{type(data).__name__}."
    )


def _crc32c():
    """The hardware CRC32C function: the ``crc32c`` package's, which releases the GIL while it
    hashes (``google_crc32c.value`` holds it: a checksum on the copy thread then stopped the
    training thread for its whole duration), else ``google-crc32c``'s. Both compute the same
    Castagnoli CRC, so snapshots written with either verify with the other."""
    try:
        import crc32c

        return crc32c.crc32c
    except ImportError:
        pass
    try:
        import google_crc32c

        return google_crc32c.value
    except ImportError:
        raise SerializationError(
            "checksum 'crc32c' needs the crc32c package (or google-crc32c). Fix: pip install "
            "crc32c, or set MoEvementConfig.checksum='crc32'."
        ) from None


def checksum(
    buf: Union[bytes, bytearray, memoryview, torch.Tensor], algorithm: str = DEFAULT_CHECKSUM
) -> str:
    """Checksum of raw bytes as a lowercase hex string.

    Args:
        buf: Bytes, or a tensor (its raw bytes are hashed, whatever the dtype; device tensors
            are copied to the host first).
        algorithm: ``"crc32c"`` or ``"crc32"`` (8 hex digits), or ``"sha256"`` (64 hex digits).
    """
    data = _host_buffer(buf)
    return _digest_function(algorithm)(data)


def _digest_function(algorithm: str) -> Callable[[Any], str]:
    """``f(bytes-like) -> hex digest`` for ``algorithm`` (the library looked up once)."""
    if algorithm == "crc32c":
        crc32c = _crc32c()
        return lambda data: f"{crc32c(data) & 0xFFFFFFFF:08x}"
    if algorithm == "crc32":
        return lambda data: f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"
    if algorithm == "sha256":
        return lambda data: hashlib.sha256(data).hexdigest()
    raise SerializationError(
        f"Unknown checksum algorithm {algorithm!r}. Fix: use one of {CHECKSUM_ALGORITHMS}."
    )


def checksum_spans(
    buffer: torch.Tensor, spans: Iterable[tuple[int, int]], algorithm: str = DEFAULT_CHECKSUM
) -> list[str]:
    """:func:`checksum` of each ``(offset, nbytes)`` span of a 1-D uint8 host ``buffer``, in
    order: the same digests as ``checksum(buffer[offset : offset + nbytes])``.

    The spans are sliced out of one memoryview of the buffer, so a span costs a C-level slice
    rather than the half-dozen tensor operations of a tensor slice: a snapshot slot of a few
    hundred small tensors is sealed in a tenth of the time, on the copy thread, whose Python
    work holds the GIL that the training thread needs.
    """
    if buffer.device.type != "cpu" or buffer.dtype != torch.uint8 or buffer.dim() != 1:
        raise SerializationError(
            f"checksum_spans expects a 1-D uint8 host buffer, got {buffer.dtype} "
            f"{tuple(buffer.shape)} on {buffer.device}."
        )
    view = memoryview(buffer.numpy())
    digest = _digest_function(algorithm)
    return [digest(view[offset : offset + nbytes]) for offset, nbytes in spans]
