"""Sparse-to-dense conversion reconstructs a bit-identical dense state (real Megatron-Core jobs).

Each job trains with MoEvement, scrambles every live tensor, rolls back to the persisted sparse
checkpoint (W=3) and replays: the state at the window's end and at the last trained iteration must
equal the recorded fault-free states bit for bit; training then continues and the final state must
equal that of an uninterrupted run without MoEvement.
"""

import json

import pytest
import torch

from megatron_moevement.harness.layout import ParallelLayout
from megatron_moevement.replay.loader import SlotLoader
from megatron_moevement.replay.scalar_log import ReplayError, ScalarLog, StepScalars
from megatron_moevement.snapshot.checksum import SnapshotChecksumError
from megatron_moevement.snapshot.engine import SnapshotEngine
from megatron_moevement.snapshot.sharding import ShardingContext, ShardPlan
from megatron_moevement.snapshot.slots import SnapshotError
from megatron_moevement.state.operators import Operator, OperatorParam
from megatron_moevement.state.optim_view import ParamState
from tests.conftest import LAYOUTS, assert_states_bitwise_equal, load_states
from tests.fakes import FakeRegistry, FakeSchedule

ITERATIONS = 8  # windows 0-2, 3-5 (persisted), 6-7 (in flight)
EXTRA = 2

CASES = [
    pytest.param("single", dict(precision="fp32"), "hard_count", True, id="single-fp32"),
    pytest.param(
        "ep2",
        dict(precision="bf16", use_distributed_optimizer=True),
        "hard_count",
        False,
        id="ep2-bf16-distopt",
    ),
    pytest.param("pp2", dict(precision="bf16"), "hard_count", False, id="pp2-bf16"),
    pytest.param(
        "pp2xdp2xep2",
        dict(precision="bf16", use_distributed_optimizer=True),
        "hard_count",
        True,
        id="pp2xdp2xep2-bf16-distopt",
    ),
    pytest.param(
        "pp2xdp2xep2", dict(precision="fp32"), "soft_count", False, id="pp2xdp2xep2-fp32-soft_count"
    ),
    pytest.param("ep2", dict(precision="fp32"), "ema", False, id="ep2-fp32-ema"),
]


@pytest.mark.multiproc
@pytest.mark.parametrize("layout_name,model,ordering,check_no_log", CASES)
def test_replay_is_bitwise_equal_to_fault_free_run(
    run_job, layout_name, model, ordering, check_no_log
):
    layout = LAYOUTS[layout_name]
    world = ParallelLayout(**layout).world_size
    replay_dir = run_job(
        "replay",
        job="replay_check",
        layout=layout,
        model=model,
        iterations=ITERATIONS,
        moevement=dict(
            window_size=3,
            ordering=ordering,
            replication_factor=0,
            extra_iterations=EXTRA,
            replay_without_log=check_no_log,
        ),
    )
    reference = run_job("reference", layout=layout, model=model, iterations=ITERATIONS + EXTRA)
    for rank in range(world):
        rep = json.loads((replay_dir / f"replay_rank{rank}.json").read_text())
        assert rep["window_size"] == 3 and rep["start"] == 3 and rep["dense_at"] == 5
        assert rep["dense_mismatches"] == [], f"rank {rank} after conversion"
        assert rep["target_mismatches"] == [], f"rank {rank} after replay to the target"
        # Conversion really ran sparse: operators were frozen in the first replayed iterations.
        assert rep["conversion"]["iterations_replayed"] == [4, 5]
        assert (
            rep["conversion"]["frozen_operators"]["4"]
            > rep["conversion"]["frozen_operators"]["5"]
            > 0
        )
        # Frozen operators never got a weight gradient (.grad or DDP main_grad) written.
        assert rep["probe"]["frozen_checked"] > 0
        assert rep["probe"]["frozen_grad_writes"] == 0
        assert rep["probe"]["active_with_grads"] > 0
        if check_no_log:
            # With clipping active, recomputing the norm from partial gradients diverges.
            assert rep["no_log_mismatches"] > 0
    # Training continued from the reconstructed state equals an uninterrupted run.
    assert_states_bitwise_equal(load_states(replay_dir, world), load_states(reference, world))


# ----------------------------------------------------------------------------- unit tests


def _registry(shape=(4, 3)):
    ops = []
    for name in ("a", "b"):
        param = torch.nn.Parameter(torch.randn(shape))
        main = torch.randn(shape)
        state = ParamState(param, main, {"exp_avg": torch.randn(shape), "step": torch.tensor(3.0)})
        ops.append(
            Operator(name, "dense", layer=0, params=[OperatorParam(f"{name}.w", param, state)])
        )
    return FakeRegistry(ops)


def _captured(registry):
    plan = ShardPlan(full_state={"a", "b"}, compute={"a", "b"}, owner_of={"a": 0, "b": 0})
    engine = SnapshotEngine(registry, plan, rank=0)
    ckpt = engine.begin_window(FakeSchedule([["a"], ["b"]]), start_iteration=10, window=0)
    engine.capture(ckpt, 0, 10)
    engine.drain()
    return engine, ckpt, plan


def _loader(registry, plan):
    return SlotLoader(registry, plan, ShardingContext(0, 1, 0, 1), groups=None)


def test_slot_restores_bits_exactly():
    registry = _registry()
    _, ckpt, plan = _captured(registry)
    before = {k: t.clone() for k, t in _live(registry).items()}
    for t in _live(registry).values():
        t.add_(1.0)
    stats = _loader(registry, plan).apply(ckpt, 0)
    assert stats == {"full": 3, "compute": 2}
    after = _live(registry)
    assert torch.equal(after["a/main"], before["a/main"])
    assert torch.equal(after["b/compute"], before["b/compute"])  # frozen: compute weights only
    assert not torch.equal(after["b/main"], before["b/main"])  # its full state comes in slot 1


def _live(registry):
    out = {}
    for op in registry.operators:
        p = op.params[0]
        out[f"{op.name}/compute"] = p.param.data
        out[f"{op.name}/main"] = p.state.main_param
    return out


def test_incomplete_checkpoint_is_a_clear_error():
    registry = _registry()
    _, ckpt, plan = _captured(registry)
    with pytest.raises(SnapshotError, match="incomplete: slot 1 missing"):
        _loader(registry, plan).apply(ckpt, 1)


def test_corrupted_slot_fails_its_checksum():
    registry = _registry()
    _, ckpt, plan = _captured(registry)
    ckpt.slots[0].buffer[5] ^= 0x10
    with pytest.raises(SnapshotChecksumError, match="replica"):
        _loader(registry, plan).apply(ckpt, 0)


def test_checkpoint_from_another_layout_is_rejected():
    _, ckpt, plan = _captured(_registry(shape=(4, 3)))
    with pytest.raises(SnapshotError, match="layout"):
        _loader(_registry(shape=(2, 6)), plan).apply(ckpt, 0)


def test_scalar_log_names_missing_iterations_and_discards_old_ones():
    log = ScalarLog()
    for it in range(5):
        log.record(StepScalars(it, 1.0 + it, True, [[1e-3]]))
    log.discard_before(3)
    assert len(log) == 2 and 3 in log and 2 not in log
    with pytest.raises(ReplayError, match="iteration 1 .*3..4"):
        log.get(1)
    clone = ScalarLog()
    clone.load_dict(json.loads(json.dumps(log.to_dict())))
    assert clone.get(4).grad_norm == 5.0
