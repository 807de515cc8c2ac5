"""Snapshots are raw bytes: every bit pattern of every dtype survives capture and restore.

The path is the real one: :class:`SnapshotEngine` copies an operator's tensors into a host slot
and seals their checksums; :class:`SlotLoader` writes them back into the live tensors. No value
is converted on the way, so NaN payloads, infinities, negative zero and the special encodings of
the float8 formats are kept.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megatron_moevement.replay.loader import SlotLoader
from megatron_moevement.snapshot.checksum import (
    SerializationError,
    checksum,
    checksum_spans,
    dtype_name,
)
from megatron_moevement.snapshot.engine import SnapshotEngine
from megatron_moevement.snapshot.sharding import ShardPlan
from megatron_moevement.state.operators import Operator, OperatorParam
from tests.fakes import FakeRegistry, FakeSchedule

FLOAT8_DTYPES = sorted(
    (getattr(torch, n) for n in dir(torch) if n.startswith("float8_")),
    key=str,
)

SINGLE_PROCESS_SHARDING = SimpleNamespace(
    dp_rank=0, dp_size=1, expert_dp_rank=0, expert_dp_size=1, distributed_optimizer=False
)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).clone()


def all_byte_patterns(dtype: torch.dtype) -> torch.Tensor:
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).reshape(16, 16)


def special_fp32() -> torch.Tensor:
    patterns = [
        0x00000000,  # +0
        0x80000000,  # -0
        0x7F800000,  # +inf
        0xFF800000,  # -inf
        0x7FC00001,  # qNaN with payload
        0x7F800001,  # sNaN
        0xFFFFFFFF,  # negative NaN, all payload bits
        0x00000001,  # smallest denormal
        0x7F7FFFFF,  # max finite
    ]
    rng = np.random.default_rng(0)
    arr = np.concatenate(
        [np.array(patterns, dtype=np.uint32), rng.integers(0, 2**32, 200, dtype=np.uint32)]
    )
    return torch.from_numpy(arr.view(np.int32).copy()).view(torch.float32)


def capture_and_restore(param: torch.nn.Parameter, algorithm: str = "crc32") -> dict:
    """Captures ``param`` as operator ``op``'s compute weight, overwrites it, restores it."""
    op = Operator("op", "dense", 0, params=[OperatorParam("op.w", param)])
    registry = FakeRegistry([op])
    plan = ShardPlan(full_state=set(), compute={"op"}, owner_of={"op": 0})
    engine = SnapshotEngine(registry, plan, rank=0, algorithm=algorithm, asynchronous=False)
    ckpt = engine.begin_window(FakeSchedule([["op"]]), start_iteration=0, window=0)
    slot = engine.capture(ckpt, 0, 0)
    engine.shutdown()
    original = bits(param)
    param.detach().reshape(-1).view(torch.uint8).zero_()
    assert not torch.equal(bits(param), original) or not original.any()
    SlotLoader(registry, plan, SINGLE_PROCESS_SHARDING, None).apply(ckpt, 0)
    return dict(slot=slot, original=original)


def test_float8_dtypes_present():
    names = {dtype_name(d) for d in FLOAT8_DTYPES}
    assert {"float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"} <= names


@pytest.mark.parametrize("dtype", FLOAT8_DTYPES, ids=str)
@pytest.mark.parametrize("algorithm", ["crc32c", "crc32", "sha256"])
def test_every_float8_bit_pattern_round_trips(dtype, algorithm):
    param = torch.nn.Parameter(all_byte_patterns(dtype), requires_grad=False)
    ptr = param.data_ptr()
    out = capture_and_restore(param, algorithm)
    record = out["slot"].records["op/compute/op.w"]
    assert record.dtype == dtype_name(dtype) and record.nbytes == 256  # one byte per element
    assert param.data_ptr() == ptr and torch.equal(bits(param), out["original"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_every_16bit_pattern_round_trips(dtype):
    src = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    param = torch.nn.Parameter(src.clone(), requires_grad=False)
    out = capture_and_restore(param)
    assert torch.equal(bits(param), out["original"])


def test_fp32_special_values_round_trip():
    param = torch.nn.Parameter(special_fp32(), requires_grad=False)
    out = capture_and_restore(param, "sha256")
    assert torch.equal(bits(param), out["original"])
    assert torch.signbit(param[1]) and param[1] == 0  # negative zero kept
    assert torch.isinf(param[2]) and torch.isnan(param[4])


def test_checksum_known_values():
    assert checksum(b"hello", "crc32") == "3610a686"
    assert checksum(b"hello", "crc32c") == "9a71bb4c"  # CRC32C (Castagnoli) of b"hello"
    assert checksum(b"hello") == checksum(b"hello", "crc32c")  # the default
    assert checksum(b"hello", "sha256") == (
        "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    )
    assert checksum(torch.tensor(list(b"hello"), dtype=torch.uint8), "crc32") == "3610a686"
    with pytest.raises(SerializationError, match="crc32"):
        checksum(b"x", "md5")


@pytest.mark.parametrize("algorithm", ["crc32c", "crc32", "sha256"])
def test_checksum_spans_equal_checksums_of_tensor_slices(algorithm):
    buffer = torch.randint(0, 256, (4096,), dtype=torch.uint8)
    spans = [(0, 0), (0, 7), (64, 1000), (1100, 2996), (4095, 1)]
    assert checksum_spans(buffer, spans, algorithm) == [
        checksum(buffer[offset : offset + nbytes], algorithm) for offset, nbytes in spans
    ]
    # A span of a buffer that is itself a slice of a larger one (a pooled slot buffer).
    pooled = torch.randint(0, 256, (8192,), dtype=torch.uint8)
    part = pooled[1024:5120]
    assert checksum_spans(part, [(10, 100)], algorithm) == [checksum(pooled[1034:1134], algorithm)]


def test_checksum_spans_refuse_what_is_not_a_flat_host_byte_buffer():
    with pytest.raises(SerializationError, match="1-D uint8 host buffer"):
        checksum_spans(torch.zeros(4, dtype=torch.float32), [(0, 4)])
    with pytest.raises(SerializationError, match="1-D uint8 host buffer"):
        checksum_spans(torch.zeros(2, 2, dtype=torch.uint8), [(0, 4)])


def test_both_crc32c_libraries_give_the_same_checksums():
    # Snapshots written through either library verify with the other.
    crc32c = pytest.importorskip("crc32c")
    google_crc32c = pytest.importorskip("google_crc32c")
    data = torch.randint(0, 256, (1 << 16,), dtype=torch.uint8).numpy()
    assert crc32c.crc32c(data) == google_crc32c.value(data)
    assert checksum(data.tobytes(), "crc32c") == f"{google_crc32c.value(data):08x}"


def test_crc32c_prefers_the_library_that_releases_the_gil():
    # google-crc32c holds the GIL while it hashes, so a checksum on the copy thread would stop
    # the training thread; the crc32c package releases it (measured in docs/snapshots.md).
    crc32c = pytest.importorskip("crc32c")
    from megatron_moevement.snapshot import checksum as checksum_module

    assert checksum_module._crc32c() is crc32c.crc32c
