"""The snapshot engine on its own: synchronous and asynchronous copies, sealed checksums."""

import threading

import torch

from megatron_moevement.snapshot.engine import SnapshotEngine
from megatron_moevement.snapshot.sharding import ShardPlan
from megatron_moevement.state.operators import Operator, OperatorParam
from megatron_moevement.state.optim_view import ParamState
from tests.fakes import FakeRegistry, FakeSchedule


def _registry():
    gen = torch.Generator().manual_seed(0)
    ops = []
    for name in ("a", "b"):
        param = torch.nn.Parameter(torch.randn((64, 32), generator=gen).to(torch.bfloat16))
        main = torch.randn((64, 32), generator=gen)
        state = ParamState(param, main, {"exp_avg": torch.randn((64, 32), generator=gen)})
        ops.append(Operator(name, "dense", 0, params=[OperatorParam(f"{name}.w", param, state)]))
    return FakeRegistry(ops)


def _engine(asynchronous):
    plan = ShardPlan(full_state={"a", "b"}, compute={"a", "b"}, owner_of={"a": 0, "b": 0})
    return SnapshotEngine(_registry(), plan, rank=0, asynchronous=asynchronous)


def test_synchronous_capture_is_complete_when_it_returns():
    engine = _engine(asynchronous=False)
    ckpt = engine.begin_window(FakeSchedule([["a"], ["b"]]), start_iteration=0, window=0)
    calling = threading.current_thread()
    seen = []
    original = engine._copier._copy_host
    engine._copier._copy_host = lambda slot, sources, destinations, first_touch: (
        seen.append(threading.current_thread()),
        original(slot, sources, destinations, first_touch),
    )
    slot = engine.capture(ckpt, 0, 0)
    assert slot.ready.is_set() and slot.error is None and seen == [calling]
    assert all(rec.checksum for rec in slot.records.values())
    slot.verify()
    live = engine.registry["a"].params[0].state.main_param
    assert torch.equal(slot.tensor("a/main/a.w"), live)
    engine.shutdown()


def test_asynchronous_capture_copies_on_the_copy_thread():
    engine = _engine(asynchronous=True)
    ckpt = engine.begin_window(FakeSchedule([["a"], ["b"]]), start_iteration=0, window=0)
    slot = engine.capture(ckpt, 0, 0)
    engine.drain()
    assert slot.ready.is_set() and all(rec.checksum for rec in slot.records.values())
    slot.verify()
    engine.shutdown()


def test_snapshot_stages_are_named_in_a_profiler_trace():
    from torch.profiler import ProfilerActivity, profile

    engine = _engine(asynchronous=False)
    ckpt = engine.begin_window(FakeSchedule([["a"], ["b"]]), start_iteration=0, window=0)
    engine.capture(ckpt, 0, 0)  # allocates slot 0's buffer (and faults it in) ...
    ckpt = engine.begin_window(FakeSchedule([["a"], ["b"]]), start_iteration=2, window=2)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        engine.capture(ckpt, 0, 2)  # ... which window 2 reuses
        engine.wait_for_copies()
    names = {e.name for e in prof.events()}
    assert {
        "moevement.snapshot.capture",
        "moevement.snapshot.copy",
        "moevement.snapshot.checksum",
        "moevement.snapshot.wait_for_copies",
    } <= names
    engine.shutdown()


def test_copies_into_fresh_buffers_are_timed_as_first_touch():
    # A buffer allocated for a slot has its pages faulted in once, timed apart from the copy.
    engine = _engine(asynchronous=False)
    for window in range(3):
        ckpt = engine.begin_window(FakeSchedule([["a"], ["b"]]), start_iteration=0, window=window)
        for slot_index in range(2):
            before = engine.times.totals()
            engine.capture(ckpt, slot_index, 2 * window + slot_index)
            after = engine.times.totals()
            fresh = after["first_touch"] > before["first_touch"]
            # Two windows' buffers (window parity x slot) are allocated, then reused.
            assert fresh == (window < 2) and after["copy"] > before["copy"]
    engine.shutdown()
