"""Dtype- and FP8-aware tensor packing with checksums.

Snapshots must restore *bit-exactly* (the correctness contract is bitwise equality with a
fault-free run), so every tensor is packed as its raw bytes — ``tensor.view(torch.uint8)`` —
plus the metadata needed to rebuild it (dtype name, shape) and a checksum of those bytes.
No arithmetic conversion ever touches the values: NaN payloads, infinities, negative zero and
the special encodings of the float8 formats survive unchanged.

Three kinds of objects are packed:

* plain tensors of any dtype with a byte representation (float8 variants, bf16, fp16, fp32,
  fp64, complex, integer, bool): :func:`pack_tensor` -> :class:`PackedTensor`;
* Transformer Engine FP8 tensors, detected by duck typing (and by ``isinstance`` against TE's
  classes when TE is importable): ``Float8Tensor``-like objects (``_data``, ``_scale_inv``,
  ``_fp8_dtype``, optional ``_transpose`` cache) and ``MXFP8Tensor``-like objects (row-wise and
  column-wise data and scale-inverses). They are packed as their raw buffers plus metadata
  (:class:`PackedQuantizedTensor`) and restored **in place** into an existing object of the same
  layout by copying into its buffers — never re-quantized from a higher precision;
* TE's delayed-scaling ``fp8_meta`` dict (``"scaling_fwd"`` / ``"scaling_bwd"`` objects with
  ``amax_history``, ``scale`` and, in older TE, ``scale_inv``): :func:`pack_fp8_meta` /
  :func:`restore_fp8_meta_`.

Integrity: :func:`checksum` hashes raw bytes (``crc32`` or ``sha256``); :func:`verify` and
:class:`ShardManifest` raise :class:`SnapshotChecksumError` naming the tensor and shard, the
expected and actual checksum, and the fallback (peer replica, then the next storage tier).

Transformer Engine is never imported at module import time; :func:`te_tensor_classes` tries
it lazily once and falls back to duck typing when it is missing or broken."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, NamedTuple, Optional, Tuple, Union

import torch

from megatron_moevement.constants import CHECKSUM_ALGORITHMS
from megatron_moevement.logging_utils import get_logger
from megatron_moevement.snapshot.checksum import (
    _FALLBACK_ADVICE,
    SerializationError,
    SnapshotChecksumError,
    SnapshotCorruptionError,
    _raw_bytes,
    checksum,
    dtype_from_name,
    dtype_name,
)

__all__ = [
    "CHECKSUM_ALGORITHMS",
    "ManifestEntry",
    "Packed",
    "PackedFP8Meta",
    "PackedQuantizedTensor",
    "PackedTensor",
    "SerializationError",
    "ShardManifest",
    "SnapshotChecksumError",
    "SnapshotCorruptionError",
    "checksum",
    "dtype_from_name",
    "dtype_name",
    "is_float8_tensor",
    "is_mxfp8_tensor",
    "iter_packed_tensors",
    "pack",
    "pack_fp8_meta",
    "pack_tensor",
    "restore_fp8_meta_",
    "te_tensor_classes",
    "unpack_tensor",
    "verify",
]


logger = get_logger(__name__)

"""Supported checksum algorithms."""


_FLOAT8_COMPONENTS = ("_data", "_transpose", "_scale_inv")


_MX_COMPONENTS = (
    "_rowwise_data",
    "_rowwise_scale_inv",
    "_columnwise_data",
    "_columnwise_scale_inv",
)


_FP8_META_KEYS = ("scaling_fwd", "scaling_bwd")


_FP8_META_FIELDS = ("amax_history", "scale", "scale_inv")


@dataclass
class PackedTensor:
    """Raw bytes of one tensor plus what is needed to rebuild and check it."""

    dtype: str
    """Dtype name, e.g. ``"bfloat16"`` or ``"float8_e4m3fn"``."""
    shape: Tuple[int, ...]
    """Tensor shape."""
    data: torch.Tensor
    """1-D contiguous uint8 CPU tensor (possibly a slice of a reused pinned buffer)."""
    checksum: Optional[str]
    """Checksum of ``data`` (``None`` until :meth:`seal` after an asynchronous copy)."""
    algorithm: str = "crc32"
    """Checksum algorithm."""
    name: str = ""
    """Tensor name used in error messages and manifests."""

    @property
    def nbytes(self) -> int:
        """Number of payload bytes."""
        return int(self.data.numel())

    def expected_nbytes(self) -> int:
        """Bytes implied by dtype and shape."""
        numel = 1
        for d in self.shape:
            numel *= int(d)
        return numel * dtype_from_name(self.dtype).itemsize

    def seal(self) -> "PackedTensor":
        """Computes the checksum (call once an asynchronous copy into ``data`` is complete)."""
        self.checksum = checksum(self.data, self.algorithm)
        return self

    def verify(self, shard: Optional[str] = None) -> None:
        """Checks size and checksum.

        Raises:
            SnapshotCorruptionError: when the payload size does not match dtype and shape.
            SnapshotChecksumError: when the checksum differs.
        """
        expected = self.expected_nbytes()
        if self.nbytes != expected:
            raise SnapshotCorruptionError(
                f"Tensor {self.name!r}" + (f" of shard {shard!r}" if shard else "") + f" has "
                f"{self.nbytes} bytes but dtype {self.dtype} and shape {list(self.shape)} need "
                f"{expected} (truncated or mixed-up payload). {_FALLBACK_ADVICE}"
            )
        if self.checksum is None:
            raise SnapshotCorruptionError(
                f"Tensor {self.name!r} has no checksum; it was never sealed. Fix: call seal() "
                "after the copy into its buffer has completed."
            )
        got = checksum(self.data, self.algorithm)
        if got != self.checksum:
            raise SnapshotChecksumError(self.name, self.checksum, got, self.algorithm, shard)

    def metadata(self) -> Dict[str, Any]:
        """JSON-serializable description without the payload."""
        return {
            "dtype": self.dtype,
            "shape": list(self.shape),
            "nbytes": self.nbytes,
            "checksum": self.checksum,
            "algorithm": self.algorithm,
            "name": self.name,
        }

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any], data: torch.Tensor) -> "PackedTensor":
        """Rebuilds a packed tensor from :meth:`metadata` and a received uint8 payload."""
        if data.dtype != torch.uint8 or data.dim() != 1:
            raise SerializationError(
                f"Payload of {meta.get('name', '')!r} must be a 1-D uint8 tensor, got "
                f"{data.dtype} with shape {tuple(data.shape)}."
            )
        return cls(
            dtype=str(meta["dtype"]),
            shape=tuple(int(d) for d in meta["shape"]),
            data=data,
            checksum=meta.get("checksum"),
            algorithm=str(meta.get("algorithm", "crc32")),
            name=str(meta.get("name", "")),
        )


@dataclass
class PackedQuantizedTensor:
    """Raw buffers and metadata of a TE-style FP8 tensor (restored in place only)."""

    kind: str
    """``"float8"`` (per-tensor scaling, ``Float8Tensor``) or ``"mxfp8"`` (row/column-wise
    block scaling: ``MXFP8Tensor`` and similar)."""
    class_name: str
    """Class name of the packed object; restoring into another class is refused."""
    fp8_dtype: str
    """``str()`` of the object's ``_fp8_dtype`` (e.g. ``"DType.kFloat8E4M3"``)."""
    logical_dtype: str
    """Dtype name the tensor presents to the model (e.g. ``"bfloat16"``)."""
    logical_shape: Tuple[int, ...]
    """Logical shape of the tensor."""
    components: Dict[str, PackedTensor]
    """Packed buffers by attribute name (``"_data"``, ``"_scale_inv"``, ...)."""
    name: str = ""
    """Tensor name for errors and manifests."""

    @property
    def nbytes(self) -> int:
        """Total payload bytes of all components."""
        return sum(p.nbytes for p in self.components.values())

    def seal(self) -> "PackedQuantizedTensor":
        """Computes every component's checksum."""
        for p in self.components.values():
            p.seal()
        return self

    def verify(self, shard: Optional[str] = None) -> None:
        """Checks every component (see :meth:`PackedTensor.verify`)."""
        for p in self.components.values():
            p.verify(shard)


@dataclass
class PackedFP8Meta:
    """Raw buffers of TE's delayed-scaling ``fp8_meta`` (amax history, scale, scale_inv)."""

    entries: Dict[str, Dict[str, PackedTensor]] = field(default_factory=dict)
    """``{"scaling_fwd": {"amax_history": ..., "scale": ...}, "scaling_bwd": {...}}``."""
    name: str = ""
    """Name for errors and manifests (e.g. the module path)."""

    @property
    def nbytes(self) -> int:
        """Total payload bytes."""
        return sum(p.nbytes for fields_ in self.entries.values() for p in fields_.values())

    def seal(self) -> "PackedFP8Meta":
        """Computes every checksum."""
        for fields_ in self.entries.values():
            for p in fields_.values():
                p.seal()
        return self

    def verify(self, shard: Optional[str] = None) -> None:
        """Checks every buffer (see :meth:`PackedTensor.verify`)."""
        for fields_ in self.entries.values():
            for p in fields_.values():
                p.verify(shard)


Packed = Union[PackedTensor, PackedQuantizedTensor, PackedFP8Meta]


_TE_CLASSES: Optional[Dict[str, Tuple[type, ...]]] = None


_TE_CANDIDATES = {
    "float8": (
        ("transformer_engine.pytorch.tensor.float8_tensor", "Float8Tensor"),
        ("transformer_engine.pytorch.tensor.storage.float8_tensor_storage", "Float8TensorStorage"),
        ("transformer_engine.pytorch.tensor._internal.float8_tensor_base", "Float8TensorBase"),
        ("transformer_engine.pytorch.float8_tensor", "Float8Tensor"),
    ),
    "mxfp8": (
        ("transformer_engine.pytorch.tensor.mxfp8_tensor", "MXFP8Tensor"),
        ("transformer_engine.pytorch.tensor.storage.mxfp8_tensor_storage", "MXFP8TensorStorage"),
        ("transformer_engine.pytorch.tensor._internal.mxfp8_tensor_base", "MXFP8TensorBase"),
        ("transformer_engine.pytorch.tensor.float8_blockwise_tensor", "Float8BlockwiseQTensor"),
    ),
}


def te_tensor_classes() -> Dict[str, Tuple[type, ...]]:
    """Transformer Engine's FP8 tensor classes by kind; empty tuples when TE is unavailable.

    The import is attempted once per process; any failure (TE missing, built without CUDA,
    version without a given class) is tolerated.
    """
    global _TE_CLASSES
    if _TE_CLASSES is None:
        found: Dict[str, List[type]] = {"float8": [], "mxfp8": []}
        try:
            importlib.import_module("transformer_engine.pytorch")
            te_ok = True
        except Exception:  # noqa: BLE001 - TE missing or broken: duck typing only
            te_ok = False
        if te_ok:
            for kind, candidates in _TE_CANDIDATES.items():
                for module_name, class_name in candidates:
                    try:
                        cls = getattr(importlib.import_module(module_name), class_name)
                    except Exception:  # noqa: BLE001 - class absent in this TE version
                        continue
                    if isinstance(cls, type):
                        found[kind].append(cls)
            logger.debug("Transformer Engine FP8 classes: %s", found)
        _TE_CLASSES = {k: tuple(v) for k, v in found.items()}
    return _TE_CLASSES


def is_mxfp8_tensor(obj: Any) -> bool:
    """True for MXFP8-like objects (row/column-wise data and scale-inverses, ``_fp8_dtype``)."""
    classes = te_tensor_classes()["mxfp8"]
    if classes and isinstance(obj, classes):
        return True
    return hasattr(obj, "_fp8_dtype") and (
        hasattr(obj, "_rowwise_data") or hasattr(obj, "_columnwise_data")
    )


def is_float8_tensor(obj: Any) -> bool:
    """True for ``Float8Tensor``-like objects (``_data``, ``_scale_inv``, ``_fp8_dtype``)."""
    classes = te_tensor_classes()["float8"]
    if classes and isinstance(obj, classes):
        return True
    return (
        not is_mxfp8_tensor(obj)
        and hasattr(obj, "_fp8_dtype")
        and hasattr(obj, "_scale_inv")
        and hasattr(obj, "_data")
    )


def _pack_plain(
    t: torch.Tensor,
    name: str,
    algorithm: str,
    out: Optional[torch.Tensor],
    compute_checksum: bool,
) -> PackedTensor:
    if algorithm not in CHECKSUM_ALGORITHMS:
        raise SerializationError(
            f"Unknown checksum algorithm {algorithm!r}. Fix: use one of {CHECKSUM_ALGORITHMS}."
        )
    raw = _raw_bytes(t, f"pack_tensor({name!r})")
    n = raw.numel()
    if out is not None:
        if out.dtype != torch.uint8 or out.dim() != 1 or out.device.type != "cpu":
            raise SerializationError(
                f"pack_tensor({name!r}): out must be a 1-D uint8 CPU tensor, got {out.dtype} "
                f"{tuple(out.shape)} on {out.device}. Fix: allocate torch.empty(n, "
                "dtype=torch.uint8, pin_memory=True)."
            )
        if out.numel() < n:
            raise SerializationError(
                f"pack_tensor({name!r}): out holds {out.numel()} bytes but the tensor needs {n}. "
                "Fix: size the host buffer from the tensor's nbytes."
            )
        data = out[:n]
        data.copy_(raw)
    else:
        data = raw.to("cpu", copy=True) if raw.device.type != "cpu" else raw.clone()
    packed = PackedTensor(
        dtype=dtype_name(t.dtype),
        shape=tuple(int(d) for d in t.shape),
        data=data,
        checksum=None,
        algorithm=algorithm,
        name=name,
    )
    return packed.seal() if compute_checksum else packed


def _component_names(obj: Any, kind: str) -> List[str]:
    if kind == "float8":
        names = []
        for attr in _FLOAT8_COMPONENTS:
            value = getattr(obj, attr, None)
            if value is None:
                continue
            if attr == "_transpose" and getattr(obj, "_transpose_invalid", False):
                continue  # stale cache: not part of the state; invalidated again on restore
            names.append(attr)
        return names
    return [attr for attr in _MX_COMPONENTS if getattr(obj, attr, None) is not None]


def _pack_quantized(
    obj: Any, kind: str, name: str, algorithm: str, compute_checksum: bool
) -> PackedQuantizedTensor:
    components = {}
    for attr in _component_names(obj, kind):
        value = getattr(obj, attr)
        if not isinstance(value, torch.Tensor):
            raise SerializationError(
                f"pack_tensor({name!r}): FP8 component {attr} is a {type(value).__name__}, not a "
                "tensor; this FP8 tensor layout is not supported."
            )
        components[attr] = _pack_plain(value, f"{name}/{attr}", algorithm, None, compute_checksum)
    if not components:
        raise SerializationError(
            f"pack_tensor({name!r}): the {kind} tensor holds no data buffers (all None). Fix: "
            "snapshot it while it is materialized."
        )
    logical_dtype = getattr(obj, "dtype", None)
    logical_shape = getattr(obj, "shape", None)
    if logical_shape is None and hasattr(obj, "size"):
        logical_shape = obj.size()
    return PackedQuantizedTensor(
        kind=kind,
        class_name=type(obj).__name__,
        fp8_dtype=str(obj._fp8_dtype),
        logical_dtype=(
            dtype_name(logical_dtype)
            if isinstance(logical_dtype, torch.dtype)
            else str(logical_dtype)
        ),
        logical_shape=tuple(int(d) for d in logical_shape) if logical_shape is not None else (),
        components=components,
        name=name,
    )


def pack_tensor(
    t: Any,
    *,
    name: str = "",
    algorithm: str = "crc32",
    out: Optional[torch.Tensor] = None,
    compute_checksum: bool = True,
) -> Union[PackedTensor, PackedQuantizedTensor]:
    """Packs a tensor (or TE-style FP8 tensor) as raw bytes plus metadata and checksum.

    Args:
        t: A ``torch.Tensor`` of any byte-addressable dtype, or a Float8Tensor / MXFP8Tensor
            (or duck-typed equivalent).
        name: Name for errors and manifests.
        algorithm: Checksum algorithm (``"crc32"`` or ``"sha256"``).
        out: Optional 1-D uint8 CPU buffer (e.g. pinned, allocated once) to copy into; the
            packed payload is a view of its first ``nbytes`` bytes. Plain tensors only.
        compute_checksum: Compute the checksum now (the copy is synchronous). Pass ``False``
            when the caller completes the copy asynchronously and calls ``seal()`` later.

    Returns:
        :class:`PackedTensor` for plain tensors, :class:`PackedQuantizedTensor` for FP8 ones.

    Raises:
        SerializationError: for unsupported objects or a bad ``out`` buffer.
    """
    if is_mxfp8_tensor(t) or is_float8_tensor(t):
        if out is not None:
            raise SerializationError(
                f"pack_tensor({name!r}): out= is only supported for plain tensors; FP8 tensors "
                "are packed component by component."
            )
        kind = "mxfp8" if is_mxfp8_tensor(t) else "float8"
        return _pack_quantized(t, kind, name, algorithm, compute_checksum)
    if not isinstance(t, torch.Tensor):
        raise SerializationError(
            f"pack_tensor({name!r}) expects a torch.Tensor or an FP8 tensor, got "
            f"{type(t).__name__}. Fix: pack fp8_meta dicts with pack_fp8_meta()."
        )
    return _pack_plain(t, name, algorithm, out, compute_checksum)


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _copy_bytes_into(dst: torch.Tensor, packed: PackedTensor, what: str) -> None:
    """Bit-exact in-place copy of ``packed`` into ``dst`` (same dtype and shape required)."""
    if dtype_name(dst.dtype) != packed.dtype or tuple(dst.shape) != tuple(packed.shape):
        raise SerializationError(
            f"{what}: cannot restore {packed.name!r} ({packed.dtype}, shape {list(packed.shape)}) "
            f"into a tensor of {dtype_name(dst.dtype)}, shape {list(dst.shape)}. Fix: restore into "
            "the tensor built by the same model configuration that took the snapshot."
        )
    with torch.no_grad():
        if dst.is_contiguous():
            dst.detach().reshape(-1).view(torch.uint8).copy_(packed.data)
            return
        int_dtype = _SAME_SIZE_INT.get(dst.element_size())
        if int_dtype is None:
            raise SerializationError(
                f"{what}: {packed.name!r} must be restored into a contiguous tensor (dtype "
                f"{packed.dtype} has no same-size integer view)."
            )
        tmp = torch.empty(packed.shape, dtype=dst.dtype, device=dst.device)
        tmp.reshape(-1).view(torch.uint8).copy_(packed.data)
        dst.detach().view(int_dtype).copy_(tmp.view(int_dtype))


def _restore_quantized(target: Any, packed: PackedQuantizedTensor, verify_first: bool) -> Any:
    what = f"unpack_tensor({packed.name!r})"
    if verify_first:
        packed.verify()
    kind = "mxfp8" if is_mxfp8_tensor(target) else ("float8" if is_float8_tensor(target) else None)
    if kind != packed.kind or type(target).__name__ != packed.class_name:
        raise SerializationError(
            f"{what}: the snapshot holds a {packed.kind} tensor of class {packed.class_name} but "
            f"out is a {type(target).__name__} ({kind or 'not an FP8 tensor'}). Fix: restore into "
            "the same parameter object type that was snapshotted (same FP8 recipe)."
        )
    if str(target._fp8_dtype) != packed.fp8_dtype:
        raise SerializationError(
            f"{what}: FP8 format differs (snapshot {packed.fp8_dtype}, target "
            f"{target._fp8_dtype}). Fix: use the same FP8 recipe/format as the snapshotted run."
        )
    shape = getattr(target, "shape", None)
    if (
        shape is not None
        and packed.logical_shape
        and tuple(int(d) for d in shape) != packed.logical_shape
    ):
        raise SerializationError(
            f"{what}: logical shape differs (snapshot {list(packed.logical_shape)}, target "
            f"{list(shape)}). Fix: restore into the same parameter."
        )
    present = set(_component_names(target, kind))
    if kind == "float8":
        present.discard("_transpose")  # a cache: restored when saved, else invalidated
        required = set(packed.components) - {"_transpose"}
    else:
        required = set(packed.components)
    if present != required:
        raise SerializationError(
            f"{what}: the target holds buffers {sorted(present)} but the snapshot has "
            f"{sorted(required)}; FP8 data cannot be regenerated bit-exactly without "
            "re-quantizing. Fix: give the target the same usages as at snapshot time (e.g. "
            "update_usage(rowwise_usage=..., columnwise_usage=...)) before restoring."
        )
    # Validate every component before writing any, so a failure leaves the target untouched.
    to_restore = dict(packed.components)
    if kind == "float8" and getattr(target, "_transpose", None) is None:
        to_restore.pop("_transpose", None)  # no cache buffer to fill: TE regenerates it
    for attr, comp in to_restore.items():
        dst = getattr(target, attr, None)
        if dst is None:
            raise SerializationError(
                f"{what}: the snapshot has {attr} but the target's {attr} is None. Fix: "
                "materialize that buffer (same usages as at snapshot time) before restoring."
            )
        if dtype_name(dst.dtype) != comp.dtype or tuple(dst.shape) != comp.shape:
            raise SerializationError(
                f"{what}: buffer {attr} is {dtype_name(dst.dtype)} {list(dst.shape)} in the "
                f"target but {comp.dtype} {list(comp.shape)} in the snapshot. Fix: restore into "
                "the same parameter built with the same configuration."
            )
    for attr, comp in to_restore.items():
        _copy_bytes_into(getattr(target, attr), comp, what)
    if kind == "float8" and hasattr(target, "_transpose_invalid"):
        target._transpose_invalid = "_transpose" not in to_restore
    return target


def unpack_tensor(
    p: Union[PackedTensor, PackedQuantizedTensor],
    out: Any = None,
    *,
    verify: bool = True,
    device: Optional[Union[str, torch.device]] = None,
) -> Any:
    """Restores a packed tensor bit-exactly.

    Args:
        p: A :class:`PackedTensor` or :class:`PackedQuantizedTensor`.
        out: Destination. For plain tensors optional (a new tensor is returned when ``None``);
            it must have the packed dtype and shape and is overwritten in place. For FP8
            tensors required: the existing FP8 parameter whose buffers receive the bytes.
        verify: Check size and checksum first (raises :class:`SnapshotChecksumError`).
        device: Device of a newly allocated tensor (default CPU).

    Returns:
        ``out`` (restored in place) or the new tensor.

    Raises:
        SnapshotCorruptionError, SnapshotChecksumError: on corrupted bytes (nothing written).
        SerializationError: when ``out`` does not match the snapshot.
    """
    if isinstance(p, PackedQuantizedTensor):
        if out is None:
            raise SerializationError(
                f"unpack_tensor({p.name!r}): FP8 tensors are restored in place. Fix: pass "
                "out=<the model's existing FP8 parameter> (never re-quantize from FP32)."
            )
        return _restore_quantized(out, p, verify)
    if not isinstance(p, PackedTensor):
        raise SerializationError(
            "unpack_tensor expects a PackedTensor or PackedQuantizedTensor, got "
            f"{type(p).__name__}."
            " Fix: restore fp8_meta with restore_fp8_meta_()."
        )
    if verify:
        p.verify()
    if out is None:
        out = torch.empty(p.shape, dtype=dtype_from_name(p.dtype), device=device or "cpu")
    elif not isinstance(out, torch.Tensor) or is_float8_tensor(out) or is_mxfp8_tensor(out):
        raise SerializationError(
            f"unpack_tensor({p.name!r}): out must be a plain torch.Tensor for a plain snapshot, "
            f"got {type(out).__name__}."
        )
    _copy_bytes_into(out, p, f"unpack_tensor({p.name!r})")
    return out


def pack_fp8_meta(
    meta: Mapping[str, Any], *, name: str = "fp8_meta", algorithm: str = "crc32"
) -> PackedFP8Meta:
    """Packs the delayed-scaling state of a TE module's ``fp8_meta`` bit-exactly.

    Only the training state is packed: for ``"scaling_fwd"`` and ``"scaling_bwd"`` (when
    present), the tensors ``amax_history``, ``scale`` and ``scale_inv`` (when present). Other
    keys (recipe, flags) are configuration and are rebuilt by the model.

    Raises:
        SerializationError: when ``meta`` has no scaling state.
    """
    if not isinstance(meta, Mapping):
        raise SerializationError(f"pack_fp8_meta expects a dict, got {type(meta).__name__}.")
    packed = PackedFP8Meta(name=name)
    for key in _FP8_META_KEYS:
        state = meta.get(key)
        if state is None:
            continue
        fields_ = {}
        for attr in _FP8_META_FIELDS:
            value = getattr(state, attr, None)
            if isinstance(value, torch.Tensor):
                fields_[attr] = _pack_plain(value, f"{name}/{key}/{attr}", algorithm, None, True)
        if fields_:
            packed.entries[key] = fields_
    if not packed.entries:
        raise SerializationError(
            f"pack_fp8_meta({name!r}): no 'scaling_fwd'/'scaling_bwd' tensors found. Fix: pass a "
            "TE module's fp8_meta after FP8 initialization (delayed scaling recipe)."
        )
    return packed


def restore_fp8_meta_(
    meta: Mapping[str, Any], packed: PackedFP8Meta, *, verify: bool = True
) -> None:
    """Copies packed amax history / scale / scale_inv into an existing ``fp8_meta`` in place.

    Raises:
        SnapshotChecksumError: when a buffer is corrupted (nothing is written).
        SerializationError: when ``meta`` lacks a packed entry or shapes/dtypes differ.
    """
    if verify:
        packed.verify()
    targets = []
    for key, fields_ in packed.entries.items():
        state = meta.get(key) if isinstance(meta, Mapping) else None
        if state is None:
            raise SerializationError(
                f"restore_fp8_meta_({packed.name!r}): target has no {key!r}. Fix: run the module's "
                "FP8 initialization (one forward under fp8_autocast) before restoring."
            )
        for attr, comp in fields_.items():
            dst = getattr(state, attr, None)
            if not isinstance(dst, torch.Tensor):
                raise SerializationError(
                    f"restore_fp8_meta_({packed.name!r}): target {key}.{attr} is missing. Fix: "
                    "use the same Transformer Engine version and recipe as the snapshotted run."
                )
            if dtype_name(dst.dtype) != comp.dtype or tuple(dst.shape) != comp.shape:
                raise SerializationError(
                    f"restore_fp8_meta_({packed.name!r}): {key}.{attr} is {dtype_name(dst.dtype)} "
                    f"{list(dst.shape)} but the snapshot has {comp.dtype} {list(comp.shape)}. Fix: "
                    "use the same recipe (amax_history_len, number of GEMMs) as the snapshotted "
                    "run."
                )
            targets.append((dst, comp))
    for dst, comp in targets:
        _copy_bytes_into(dst, comp, f"restore_fp8_meta_({packed.name!r})")


def pack(obj: Any, *, name: str = "", algorithm: str = "crc32") -> Packed:
    """Packs a tensor, an FP8 tensor or an ``fp8_meta`` dict (dispatching on the type)."""
    if isinstance(obj, Mapping):
        return pack_fp8_meta(obj, name=name, algorithm=algorithm)
    return pack_tensor(obj, name=name, algorithm=algorithm)


def verify(packed: Packed, shard: Optional[str] = None) -> None:
    """Verifies any packed object (size and checksum of every buffer).

    Raises:
        SnapshotChecksumError: naming the tensor and shard, expected vs got, and the fallback.
    """
    packed.verify(shard)


def _flatten(items: Mapping[str, Packed]) -> Dict[str, PackedTensor]:
    flat: Dict[str, PackedTensor] = {}
    for name, packed in items.items():
        if isinstance(packed, PackedTensor):
            flat[name] = packed
        elif isinstance(packed, PackedQuantizedTensor):
            for attr, comp in packed.components.items():
                flat[f"{name}/{attr}"] = comp
        elif isinstance(packed, PackedFP8Meta):
            for key, fields_ in packed.entries.items():
                for attr, comp in fields_.items():
                    flat[f"{name}/{key}/{attr}"] = comp
        else:
            raise SerializationError(f"Cannot add {type(packed).__name__} {name!r} to a manifest.")
    return flat


class ManifestEntry(NamedTuple):
    """Manifest record of one packed buffer."""

    dtype: str
    shape: Tuple[int, ...]
    nbytes: int
    checksum: str


@dataclass
class ShardManifest:
    """``name -> (dtype, shape, nbytes, checksum)`` for every buffer of one snapshot shard.

    FP8 tensors contribute one entry per component (``"<name>/_data"``, ...), ``fp8_meta`` one
    per buffer (``"<name>/scaling_fwd/amax_history"``, ...).
    """

    shard: str
    """Shard name (e.g. ``"iter120/slot2/rank5"``) used in error messages."""
    algorithm: str = "crc32"
    """Checksum algorithm of every entry."""
    entries: Dict[str, ManifestEntry] = field(default_factory=dict)
    """Records by flattened buffer name."""

    @classmethod
    def from_packed(cls, shard: str, items: Mapping[str, Packed]) -> "ShardManifest":
        """Builds the manifest of already sealed packed objects."""
        flat = _flatten(items)
        algorithms = {p.algorithm for p in flat.values()}
        if len(algorithms) > 1:
            raise SerializationError(
                f"Shard {shard!r} mixes checksum algorithms {sorted(algorithms)}. Fix: pack every "
                "tensor of a shard with MoEvementConfig.checksum."
            )
        entries = {}
        for name, p in flat.items():
            if p.checksum is None:
                raise SerializationError(
                    f"Tensor {name!r} of shard {shard!r} is not sealed; call seal()."
                )
            entries[name] = ManifestEntry(p.dtype, tuple(p.shape), p.nbytes, p.checksum)
        return cls(
            shard=shard, algorithm=algorithms.pop() if algorithms else "crc32", entries=entries
        )

    @property
    def nbytes(self) -> int:
        """Total payload bytes of the shard."""
        return sum(e.nbytes for e in self.entries.values())

    def verify(self, items: Mapping[str, Packed]) -> None:
        """Checks that ``items`` hold exactly the manifest's buffers with matching bytes.

        Raises:
            SnapshotCorruptionError: missing/extra buffers or dtype/shape/size mismatches.
            SnapshotChecksumError: a buffer whose bytes do not hash to the recorded checksum.
        """
        flat = _flatten(items)
        missing = sorted(set(self.entries) - set(flat))
        extra = sorted(set(flat) - set(self.entries))
        if missing or extra:
            raise SnapshotCorruptionError(
                f"Shard {self.shard!r} does not match its manifest: missing {missing[:5]}, "
                f"unexpected {extra[:5]}. {_FALLBACK_ADVICE}"
            )
        for name, entry in self.entries.items():
            p = flat[name]
            if (
                p.dtype != entry.dtype
                or tuple(p.shape) != tuple(entry.shape)
                or p.nbytes != entry.nbytes
            ):
                raise SnapshotCorruptionError(
                    f"Tensor {name!r} of shard {self.shard!r} is {p.dtype} {list(p.shape)} "
                    f"({p.nbytes} bytes) but the manifest records {entry.dtype} "
                    f"{list(entry.shape)} ({entry.nbytes} bytes). {_FALLBACK_ADVICE}"
                )
            got = checksum(p.data, self.algorithm)
            if got != entry.checksum:
                raise SnapshotChecksumError(name, entry.checksum, got, self.algorithm, self.shard)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-serializable form."""
        return {
            "shard": self.shard,
            "algorithm": self.algorithm,
            "entries": {
                name: {
                    "dtype": e.dtype,
                    "shape": list(e.shape),
                    "nbytes": e.nbytes,
                    "checksum": e.checksum,
                }
                for name, e in self.entries.items()
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ShardManifest":
        """Inverse of :meth:`to_dict`."""
        try:
            entries = {
                name: ManifestEntry(
                    str(e["dtype"]),
                    tuple(int(d) for d in e["shape"]),
                    int(e["nbytes"]),
                    str(e["checksum"]),
                )
                for name, e in data["entries"].items()
            }
            return cls(shard=str(data["shard"]), algorithm=str(data["algorithm"]), entries=entries)
        except (KeyError, TypeError, ValueError) as exc:
            raise SerializationError(
                f"Malformed shard manifest ({exc!r}). Fix: pass the dict produced by "
                "ShardManifest.to_dict()."
            ) from exc


def iter_packed_tensors(items: Mapping[str, Packed]) -> Iterable[Tuple[str, PackedTensor]]:
    """Yields ``(flattened name, PackedTensor)`` for every buffer (e.g. to send to a peer)."""
    return _flatten(items).items()
