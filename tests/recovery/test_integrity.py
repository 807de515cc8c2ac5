"""Corruption sweep: bytes flipped at random offsets of a local slot, a peer replica, an
upstream-log entry and a durable-tier file are each detected, named with the tier they came
from, and the recovery plan takes the next tier; nothing corrupted is replayed from.

The end-to-end cases corrupt a survivor's state inside a real job (a ``corrupt`` fault), SIGKILL
another rank, and require the final state to be bitwise equal to the fault-free run.
"""

import dataclasses
import json
import logging
from types import SimpleNamespace

import pytest
import torch

from megatron_moevement.config import MoEvementConfig
from megatron_moevement.harness.faults import flip_bytes, flip_record_bytes
from megatron_moevement.harness.launcher import run_elastic_job
from megatron_moevement.harness.worker import WorkerSpec
from megatron_moevement.recovery.errors import RecoveryError
from megatron_moevement.recovery.integrity import (
    corrupted_replicas,
    intact_windows,
    upstream_log_intact,
)
from megatron_moevement.recovery.tiers import INITIAL_STATE, plan_recovery
from megatron_moevement.snapshot.engine import SnapshotEngine
from megatron_moevement.snapshot.sharding import ShardPlan
from megatron_moevement.state.operators import Operator, OperatorParam
from megatron_moevement.upstream.log import UpstreamLog, UpstreamLogError
from tests.conftest import (
    RESILIENT_ITERATIONS,
    RESILIENT_LAYOUT,
    RESILIENT_MODEL,
    assert_states_bitwise_equal,
    load_states,
)
from tests.durable.test_files import _write_checkpoint
from tests.fakes import FakeRegistry, FakeSchedule
from tests.recovery.test_units import survey

SEEDS = range(8)


def _checkpoint(window=0):
    gen = torch.Generator().manual_seed(window)
    ops = [
        Operator(
            n,
            "dense",
            0,
            params=[
                OperatorParam(f"{n}.w", torch.nn.Parameter(torch.randn(64, 16, generator=gen)))
            ],
        )
        for n in ("a", "b")
    ]
    plan = ShardPlan(full_state=set(), compute={"a", "b"}, owner_of={"a": 0, "b": 0})
    engine = SnapshotEngine(FakeRegistry(ops), plan, rank=0, asynchronous=False)
    ckpt = engine.begin_window(
        FakeSchedule([["a"], ["b"]]), start_iteration=2 * window, window=window
    )
    for k in range(2):
        engine.capture(ckpt, k, 2 * window + k)
    engine.shutdown()
    return ckpt


@pytest.mark.parametrize("seed", SEEDS)
def test_corrupted_local_slot_is_not_offered(seed, caplog):
    good, bad = _checkpoint(0), _checkpoint(1)
    assert intact_windows([good, bad], rank=3) == [0, 1]
    slot = bad.slots[seed % 2]
    flip_record_bytes(slot.buffer, slot.records, seed)
    with caplog.at_level(logging.ERROR):
        assert intact_windows([good, bad], rank=3) == [0]
    assert "local sparse checkpoint of rank 3 (window 1)" in caplog.text


@pytest.mark.parametrize("seed", SEEDS)
def test_corrupted_replica_is_reported(seed, caplog):
    ckpt = _checkpoint(2)
    store = SimpleNamespace(windows={2: list(ckpt.slots), 3: [ckpt.slots[0], None]})
    replicator = SimpleNamespace(replicas={5: store})
    assert corrupted_replicas(replicator, rank=4) == []
    flip_record_bytes(ckpt.slots[1].buffer, ckpt.slots[1].records, seed)
    with caplog.at_level(logging.ERROR):
        assert corrupted_replicas(replicator, rank=4) == [(5, 2)]  # (window 3 is in flight)
    assert "peer replica of rank 5 (window 2) held by rank 4" in caplog.text


@pytest.mark.parametrize("seed", SEEDS)
def test_corrupted_upstream_log_entry_is_named(seed):
    log = UpstreamLog()
    for it in range(3):
        for mb in range(2):
            log.put("activation", it, mb, torch.randn(4, 8))
    log.verify()
    assert upstream_log_intact(log, rank=0)
    victim = log._entries[("activation", 1, seed % 2)].tensor
    flip_bytes(victim.reshape(-1).view(torch.uint8), seed)
    with pytest.raises(
        UpstreamLogError,
        match=f"activation iteration 1 microbatch {seed % 2} is corrupted.*global rollback",
    ):
        log.get("activation", 1, seed % 2)
    log.get("activation", 2, 0)  # the others are fine
    with pytest.raises(UpstreamLogError, match="corrupted"):
        log.verify()
    log.verify(since=2)
    assert not upstream_log_intact(log, rank=0)


@pytest.mark.parametrize("seed", SEEDS)
def test_corrupted_durable_file_is_named(seed, tmp_path):
    from megatron_moevement.durable import files
    from megatron_moevement.durable.errors import DurableCheckpointError
    from megatron_moevement.durable.reader import read_rank

    payloads = _write_checkpoint(tmp_path)
    path = files.rank_dir(tmp_path, 1) / f"slot00{seed % 2}.bin"
    raw = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
    flip_record_bytes(raw, payloads[1].checkpoint.slots[seed % 2].records, seed)
    path.write_bytes(bytes(raw.numpy()))
    read_rank(tmp_path, 0, 2)
    with pytest.raises(DurableCheckpointError, match=f"slot00{seed % 2}.bin.*rank 1"):
        read_rank(tmp_path, 1, 2)


def test_plan_skips_a_corrupted_replica_for_the_next_holder():
    cfg = MoEvementConfig(replication_factor=2)
    base = survey(cfg, loader=False)
    plan = plan_recovery(base)
    assert plan.fetch_from == {0: 1, 3: 1}  # rank 3's first holder (rank 0) failed
    base = dataclasses.replace(base, corrupted_replicas=[(1, 0)])
    assert plan_recovery(base).fetch_from == {0: 2, 3: 1}


def test_plan_without_an_intact_replica_takes_the_next_tier():
    cfg = MoEvementConfig(replication_factor=1)
    base = survey(cfg, failed=(0,), holds=(False, True, True, True), loader=False)
    assert plan_recovery(base).fetch_from == {0: 1}
    base = dataclasses.replace(base, corrupted_replicas=[(1, 0)])
    try:
        plan = plan_recovery(base)
    except RecoveryError as exc:  # no durable tier, nothing persisted before: a clear stop
        assert "the replicas on [1] are corrupted" in str(exc)
    else:
        assert plan.tier == INITIAL_STATE or plan.needs_durable


# ------------------------------------------------------------------ end to end (real SIGKILL)
def _corrupt(rank, what, phase="before"):
    return dict(rank=rank, iteration=6, phase=phase, corrupt=what)


# case: (corruptions, expected scope, expected tier); rank 1 is then SIGKILLed mid-iteration 6.
E2E = {
    # Stage 1's rank 2 logged the gradients stage 0 replays from: corrupted -> global rollback.
    "upstream-log": ([_corrupt(2, "upstream_log", "microbatch0")], "global", "sparse-checkpoint"),
    # Rank 0 (in the failed stage) finds its own slot corrupted: it fetches its replica instead.
    "local-slot": ([_corrupt(0, "local_slot")], "scoped", "sparse-checkpoint"),
}


@pytest.mark.multiproc
@pytest.mark.parametrize("case", sorted(E2E))
def test_corruption_inside_a_job_is_survived_bitwise(fault_free_pp2xdp2xep2, tmp_path, case):
    corruptions, scope, tier = E2E[case]
    kill = dict(rank=1, iteration=6, phase="microbatch2")
    spec = WorkerSpec(
        job="resilient",
        layout=RESILIENT_LAYOUT,
        model=RESILIENT_MODEL,
        iterations=RESILIENT_ITERATIONS,
        moevement=dict(window_size=3, replication_factor=1, faults=[*corruptions, kill]),
        timeout_s=60,
    )
    agent = run_elastic_job(spec, tmp_path, timeout=600, spares=1)
    assert [(f["rank"], f["code"]) for f in agent.failures] == [(1, -9)]
    assert_states_bitwise_equal(load_states(tmp_path, 4), fault_free_pp2xdp2xep2)
    reports = [json.loads((tmp_path / f"recovery_rank{r}.json").read_text()) for r in range(4)]
    last = reports[0]["reports"][-1]
    assert (last["scope"], last["tier"]) == (scope, tier), last["reason"]
    logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "logs").glob("*.log"))
    assert "corrupted" in logs


@pytest.mark.slow
def test_corrupted_replica_of_the_lost_rank_stops_with_a_clear_error(tmp_path):
    """Every survivor's replicas corrupted: rank 1's checkpoint has no intact copy left (r=1);
    the scalar log before the checkpoint is gone, so the initial state cannot serve either, and
    without a durable tier the job stops naming the corruption and the fix."""
    from megatron_moevement.recovery.coordinator import JobFailed

    faults = [_corrupt(r, "replica") for r in (0, 2, 3)]
    faults.append(dict(rank=1, iteration=6, phase="microbatch2"))
    spec = WorkerSpec(
        job="resilient",
        layout=RESILIENT_LAYOUT,
        model=RESILIENT_MODEL,
        iterations=RESILIENT_ITERATIONS,
        moevement=dict(window_size=3, replication_factor=1, faults=faults),
        timeout_s=60,
    )
    with pytest.raises(JobFailed) as err:
        run_elastic_job(spec, tmp_path, timeout=600, spares=1, check_faults=False)
    text = str(err.value)
    assert "rank 1's sparse checkpoint has no surviving replica that verifies" in text
    assert "are corrupted" in text and "durable_dir" in text
