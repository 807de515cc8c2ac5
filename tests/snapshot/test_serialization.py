"""Tests for bit-exact, FP8-aware tensor packing and checksums."""

import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megatron_moevement.snapshot.checksum import (
    SerializationError,
    SnapshotChecksumError,
    SnapshotCorruptionError,
    checksum,
    dtype_name,
)
from megatron_moevement.snapshot.fp8 import (
    PackedQuantizedTensor,
    PackedTensor,
    ShardManifest,
    is_float8_tensor,
    is_mxfp8_tensor,
    pack,
    pack_fp8_meta,
    pack_tensor,
    restore_fp8_meta_,
    te_tensor_classes,
    unpack_tensor,
    verify,
)

FLOAT8_DTYPES = sorted(
    (getattr(torch, n) for n in dir(torch) if n.startswith(("float8_", "float4_"))),
    key=str,
)
ALGORITHMS = ["crc32", "sha256"]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).clone()


def all_byte_patterns(dtype: torch.dtype) -> torch.Tensor:
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).reshape(16, 16)


def all_16bit_patterns(dtype: torch.dtype) -> torch.Tensor:
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)


def special_fp32() -> torch.Tensor:
    patterns = [
        0x00000000,  # +0
        0x80000000,  # -0
        0x7F800000,  # +inf
        0xFF800000,  # -inf
        0x7FC00000,  # canonical qNaN
        0x7FC00001,  # qNaN with payload
        0x7F800001,  # sNaN
        0xFFFFFFFF,  # negative NaN, all payload bits
        0x00000001,  # smallest denormal
        0x807FFFFF,  # largest negative denormal
        0x7F7FFFFF,  # max finite
    ]
    rng = np.random.default_rng(0)
    arr = np.concatenate(
        [np.array(patterns, dtype=np.uint32), rng.integers(0, 2**32, 500, dtype=np.uint32)]
    )
    return torch.from_numpy(arr.view(np.int32).copy()).view(torch.float32)


def round_trip(t: torch.Tensor, algorithm: str = "crc32") -> torch.Tensor:
    packed = pack_tensor(t, name="t", algorithm=algorithm)
    assert isinstance(packed, PackedTensor)
    assert packed.dtype == dtype_name(t.dtype) and packed.shape == tuple(t.shape)
    return unpack_tensor(packed)


# ------------------------------------------------------------------ plain tensors


def test_float8_dtypes_present():
    names = {dtype_name(d) for d in FLOAT8_DTYPES}
    assert {"float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"} <= names


@pytest.mark.parametrize("dtype", FLOAT8_DTYPES, ids=str)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_float8_bit_pattern_round_trips(dtype, algorithm):
    src = all_byte_patterns(dtype)  # includes NaN, inf, -0 encodings of the format
    out = round_trip(src, algorithm)
    assert out.dtype == dtype and out.shape == src.shape
    assert torch.equal(bits(out), bits(src))
    # in place into an existing tensor
    target = torch.zeros(16, 16, dtype=torch.uint8).view(dtype)
    ptr = target.data_ptr()
    unpack_tensor(pack_tensor(src, algorithm=algorithm), out=target)
    assert target.data_ptr() == ptr and torch.equal(bits(target), bits(src))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_every_16bit_pattern_round_trips(dtype):
    src = all_16bit_patterns(dtype)
    assert torch.equal(bits(round_trip(src)), bits(src))


def test_fp32_special_values_round_trip():
    src = special_fp32()
    out = round_trip(src, "sha256")
    assert torch.equal(bits(out), bits(src))
    assert torch.signbit(out[1]) and out[1] == 0  # negative zero kept
    assert torch.isinf(out[2]) and torch.isnan(out[5])


@pytest.mark.parametrize(
    "src",
    [
        torch.randn(7, 5, dtype=torch.float64),
        torch.randn(3, 4, dtype=torch.complex64),
        torch.tensor([True, False, True]),
        torch.arange(-5, 5, dtype=torch.int8),
        torch.tensor([0, 2**63 - 1, -(2**63)], dtype=torch.int64),
        torch.tensor([1, 60000], dtype=torch.uint16),
        torch.tensor(3.5, dtype=torch.bfloat16),  # 0-dim
        torch.empty(0, 4, dtype=torch.float32),  # empty
        torch.randn(6, 4).t(),  # non-contiguous source
    ],
    ids=lambda t: f"{dtype_name(t.dtype)}{list(t.shape)}",
)
def test_other_dtypes_and_layouts_round_trip(src):
    out = round_trip(src)
    assert out.dtype == src.dtype and out.shape == src.shape
    assert torch.equal(bits(out), bits(src))


def test_restore_into_non_contiguous_tensor_and_parameter():
    src = special_fp32()[:12].reshape(3, 4)
    target = torch.zeros(4, 3).t()  # non-contiguous 3x4 view
    unpack_tensor(pack_tensor(src), out=target)
    assert torch.equal(bits(target), bits(src))
    param = torch.nn.Parameter(torch.zeros(3, 4))
    unpack_tensor(pack_tensor(src), out=param)
    assert torch.equal(bits(param), bits(src)) and param.requires_grad


def test_pack_into_reusable_host_buffer():
    buffer = torch.zeros(1024, dtype=torch.uint8)
    src = all_16bit_patterns(torch.bfloat16)[:100]
    packed = pack_tensor(src, out=buffer)
    assert packed.data.data_ptr() == buffer.data_ptr() and packed.nbytes == 200
    assert torch.equal(bits(unpack_tensor(packed)), bits(src))
    with pytest.raises(SerializationError, match="needs 200"):
        pack_tensor(src, out=torch.zeros(10, dtype=torch.uint8))
    lazy = pack_tensor(src, compute_checksum=False)
    assert lazy.checksum is None
    with pytest.raises(SnapshotCorruptionError, match="seal"):
        lazy.verify()
    assert lazy.seal().checksum == packed.checksum


def test_metadata_round_trip_through_json():
    src = all_byte_patterns(torch.float8_e4m3fn)
    packed = pack_tensor(src, name="layer0.expert1/weight")
    meta = json.loads(json.dumps(packed.metadata()))
    rebuilt = PackedTensor.from_metadata(meta, packed.data.clone())
    assert torch.equal(bits(unpack_tensor(rebuilt)), bits(src))


def test_mismatched_target_is_rejected():
    packed = pack_tensor(torch.zeros(2, 3, dtype=torch.bfloat16))
    with pytest.raises(SerializationError, match="cannot restore"):
        unpack_tensor(packed, out=torch.zeros(2, 3, dtype=torch.float16))
    with pytest.raises(SerializationError, match="cannot restore"):
        unpack_tensor(packed, out=torch.zeros(3, 2, dtype=torch.bfloat16))


# ------------------------------------------------------------------ checksums and corruption


def test_checksum_known_values():
    assert checksum(b"hello", "crc32") == "3610a686"
    assert checksum(b"hello", "sha256") == (
        "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    )
    assert checksum(torch.tensor(list(b"hello"), dtype=torch.uint8)) == "3610a686"
    with pytest.raises(SerializationError, match="crc32"):
        checksum(b"x", "md5")


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_corrupted_byte_is_detected_with_a_clear_error(algorithm):
    src = special_fp32()
    packed = pack_tensor(src, name="layer3.expert5/main_param", algorithm=algorithm)
    packed.data[17] ^= 0x01
    target = torch.zeros_like(src)
    with pytest.raises(SnapshotChecksumError) as info:
        unpack_tensor(packed, out=target)
    err = info.value
    message = str(err)
    assert "layer3.expert5/main_param" in message and algorithm in message
    assert f"expected {err.expected}, got {err.got}" in message and err.expected != err.got
    assert "peer replica" in message and "next storage tier" in message
    assert torch.count_nonzero(target) == 0  # nothing written
    with pytest.raises(SnapshotChecksumError, match="shard 'iter7/slot1'"):
        verify(packed, shard="iter7/slot1")


def test_truncated_payload_is_detected():
    packed = pack_tensor(torch.ones(8))
    packed.data = packed.data[:-4]
    with pytest.raises(SnapshotCorruptionError, match="truncated"):
        packed.verify()


# ------------------------------------------------------------------ TE-shaped FP8 tensors


class FakeFloat8Tensor:
    """Duck-typed stand-in for Transformer Engine's Float8Tensor."""

    def __init__(self, data, scale_inv, transpose=None, fp8_dtype="DType.kFloat8E4M3"):
        self._data = data
        self._scale_inv = scale_inv
        self._transpose = transpose
        self._transpose_invalid = transpose is None
        self._fp8_dtype = fp8_dtype
        self.dtype = torch.bfloat16

    @property
    def shape(self):
        return self._data.shape

    def dequantize(self, *args, **kwargs):  # restoring must never go through values
        raise AssertionError("dequantize called")

    def quantize_(self, *args, **kwargs):
        raise AssertionError("re-quantization called")


class FakeMXFP8Tensor:
    """Duck-typed stand-in for Transformer Engine's MXFP8Tensor (block scales, E8M0)."""

    def __init__(self, rows, cols, rowwise=True, columnwise=True, seed=0):
        g = torch.Generator().manual_seed(seed)

        def rand(*shape):
            return torch.randint(0, 256, shape, generator=g, dtype=torch.int32).to(torch.uint8)

        self._rowwise_data = rand(rows, cols) if rowwise else None
        self._rowwise_scale_inv = rand(rows, cols // 32) if rowwise else None
        self._columnwise_data = rand(rows, cols) if columnwise else None
        self._columnwise_scale_inv = rand(rows // 32, cols) if columnwise else None
        self._fp8_dtype = "DType.kFloat8E4M3"
        self.dtype = torch.bfloat16
        self.shape = torch.Size([rows, cols])

    def dequantize(self, *args, **kwargs):
        raise AssertionError("dequantize called")


def _fp8_pair(with_transpose=True):
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, 256, (8, 16), generator=g, dtype=torch.int32).to(torch.uint8)
    src = FakeFloat8Tensor(
        data,
        special_fp32()[5:6].clone(),  # a NaN with payload bits as scale_inv
        data.t().contiguous() if with_transpose else None,
    )
    dst = FakeFloat8Tensor(
        torch.zeros(8, 16, dtype=torch.uint8),
        torch.zeros(1),
        torch.zeros(16, 8, dtype=torch.uint8),
    )
    dst._transpose_invalid = True
    return src, dst


def test_te_is_optional_and_not_imported():
    assert "transformer_engine" not in sys.modules
    classes = te_tensor_classes()
    assert set(classes) == {"float8", "mxfp8"}
    src, _ = _fp8_pair()
    assert is_float8_tensor(src) and not is_mxfp8_tensor(src)
    mx = FakeMXFP8Tensor(64, 64)
    assert is_mxfp8_tensor(mx) and not is_float8_tensor(mx)
    assert not is_float8_tensor(torch.zeros(1))


@pytest.mark.parametrize("with_transpose", [True, False])
def test_float8_tensor_restores_in_place_bit_exactly(with_transpose):
    src, dst = _fp8_pair(with_transpose)
    packed = pack_tensor(src, name="layer0.expert0.fc1.weight")
    assert isinstance(packed, PackedQuantizedTensor) and packed.kind == "float8"
    assert packed.logical_dtype == "bfloat16" and packed.logical_shape == (8, 16)
    ptrs = (dst._data.data_ptr(), dst._scale_inv.data_ptr(), dst._transpose.data_ptr())
    assert unpack_tensor(packed, out=dst) is dst
    assert ptrs == (dst._data.data_ptr(), dst._scale_inv.data_ptr(), dst._transpose.data_ptr())
    assert torch.equal(dst._data, src._data)
    assert torch.equal(bits(dst._scale_inv), bits(src._scale_inv))
    if with_transpose:
        assert torch.equal(dst._transpose, src._transpose) and not dst._transpose_invalid
    else:
        assert dst._transpose_invalid  # stale cache must be regenerated by TE


def test_float8_tensor_subclass_of_torch_tensor_is_detected():
    class Float8Like(torch.Tensor):
        pass

    def make(data, scale):
        t = torch.Tensor._make_subclass(Float8Like, torch.empty(4, 4, dtype=torch.bfloat16))
        t._data, t._scale_inv, t._fp8_dtype, t._transpose = data, scale, "DType.kFloat8E5M2", None
        return t

    src = make(torch.arange(16, dtype=torch.uint8).reshape(4, 4), torch.tensor([0.125]))
    dst = make(torch.zeros(4, 4, dtype=torch.uint8), torch.zeros(1))
    packed = pack_tensor(src)
    assert isinstance(packed, PackedQuantizedTensor)
    unpack_tensor(packed, out=dst)
    assert torch.equal(dst._data, src._data) and torch.equal(dst._scale_inv, src._scale_inv)


def test_float8_tensor_errors():
    src, dst = _fp8_pair()
    packed = pack_tensor(src)
    with pytest.raises(SerializationError, match="restored in place"):
        unpack_tensor(packed)
    dst._fp8_dtype = "DType.kFloat8E5M2"
    with pytest.raises(SerializationError, match="FP8 format differs"):
        unpack_tensor(packed, out=dst)
    small = FakeFloat8Tensor(torch.zeros(4, 16, dtype=torch.uint8), torch.zeros(1))
    with pytest.raises(SerializationError, match="shape"):
        unpack_tensor(packed, out=small)
    with pytest.raises(SerializationError, match="mxfp8"):
        unpack_tensor(packed, out=FakeMXFP8Tensor(64, 64))
    # corruption in a component: detected, target untouched
    _, dst = _fp8_pair()
    packed.components["_scale_inv"].data[0] ^= 0xFF
    with pytest.raises(SnapshotChecksumError, match="_scale_inv"):
        unpack_tensor(packed, out=dst)
    assert torch.count_nonzero(dst._data) == 0


@pytest.mark.parametrize("rowwise,columnwise", [(True, True), (True, False), (False, True)])
def test_mxfp8_tensor_restores_in_place_bit_exactly(rowwise, columnwise):
    src = FakeMXFP8Tensor(64, 64, rowwise, columnwise, seed=3)
    dst = FakeMXFP8Tensor(64, 64, rowwise, columnwise, seed=4)
    packed = pack_tensor(src, name="layer1.expert2.fc2.weight")
    assert packed.kind == "mxfp8"
    ptrs = {a: getattr(dst, a).data_ptr() for a in packed.components}
    unpack_tensor(packed, out=dst)
    for attr in packed.components:
        assert getattr(dst, attr).data_ptr() == ptrs[attr]
        assert torch.equal(getattr(dst, attr), getattr(src, attr))


def test_mxfp8_usage_mismatch_is_rejected():
    packed = pack_tensor(FakeMXFP8Tensor(64, 64, True, True))
    with pytest.raises(SerializationError, match="update_usage"):
        unpack_tensor(packed, out=FakeMXFP8Tensor(64, 64, True, False))


# ------------------------------------------------------------------ fp8_meta


def _meta(seed, with_scale_inv=True):
    g = torch.Generator().manual_seed(seed)

    def state():
        amax = torch.rand(16, 3, generator=g)
        amax.view(-1)[:4] = special_fp32()[[1, 2, 5, 7]]  # -0, inf, NaN payloads
        return SimpleNamespace(
            amax_history=amax,
            scale=torch.rand(3, generator=g),
            scale_inv=torch.rand(3, generator=g) if with_scale_inv else None,
        )

    return {
        "scaling_fwd": state(),
        "scaling_bwd": state(),
        "recipe": object(),
        "fp8_checkpoint": True,
    }


@pytest.mark.parametrize("with_scale_inv", [True, False])
def test_fp8_meta_round_trips_in_place(with_scale_inv):
    src, dst = _meta(0, with_scale_inv), _meta(1, with_scale_inv)
    packed = pack_fp8_meta(src, name="decoder.layers.0.mlp.fc1")
    ptr = dst["scaling_fwd"].amax_history.data_ptr()
    restore_fp8_meta_(dst, packed)
    assert dst["scaling_fwd"].amax_history.data_ptr() == ptr
    fields = ["amax_history", "scale"] + (["scale_inv"] if with_scale_inv else [])
    for key in ("scaling_fwd", "scaling_bwd"):
        for f in fields:
            assert torch.equal(bits(getattr(dst[key], f)), bits(getattr(src[key], f)))


def test_fp8_meta_errors():
    packed = pack_fp8_meta(_meta(0))
    with pytest.raises(SerializationError, match="scaling_bwd"):
        restore_fp8_meta_({"scaling_fwd": _meta(1)["scaling_fwd"]}, packed)
    with pytest.raises(SerializationError, match="no 'scaling_fwd'"):
        pack_fp8_meta({"recipe": None})
    dst = _meta(1)
    before = bits(dst["scaling_fwd"].scale)
    packed.entries["scaling_bwd"]["amax_history"].data[3] ^= 0x10
    with pytest.raises(SnapshotChecksumError, match="scaling_bwd/amax_history"):
        restore_fp8_meta_(dst, packed)
    assert torch.equal(bits(dst["scaling_fwd"].scale), before)  # nothing written


# ------------------------------------------------------------------ manifest


def test_shard_manifest_round_trip_and_corruption():
    src_fp8, _ = _fp8_pair()
    items = {
        "layer0.expert0/main_param": pack(special_fp32()),
        "layer0.expert0/weight": pack(src_fp8),
        "layer0.expert0/fp8_meta": pack(_meta(0)),
    }
    manifest = ShardManifest.from_packed("iter12/slot0/rank3", items)
    assert manifest.entries["layer0.expert0/main_param"].dtype == "float32"
    assert "layer0.expert0/weight/_scale_inv" in manifest.entries
    assert "layer0.expert0/fp8_meta/scaling_fwd/amax_history" in manifest.entries
    assert manifest.nbytes == sum(p.nbytes for p in items.values())
    restored = ShardManifest.from_dict(json.loads(json.dumps(manifest.to_dict())))
    assert restored == manifest
    restored.verify(items)
    items["layer0.expert0/weight"].components["_data"].data[5] ^= 0x80
    with pytest.raises(SnapshotChecksumError) as info:
        restored.verify(items)
    assert info.value.name == "layer0.expert0/weight/_data"
    assert info.value.shard == "iter12/slot0/rank3"
    del items["layer0.expert0/main_param"]
    with pytest.raises(SnapshotCorruptionError, match="missing"):
        restored.verify(items)
    with pytest.raises(SerializationError, match="Malformed"):
        ShardManifest.from_dict({"shard": "x"})
