"""Sparse snapshots on real multi-process Megatron-Core training (PP2 x DP2 x EP2).

Each slot must hold, bit for bit, the live state of its iteration (audited against a separate
synchronous copy taken at that iteration while training went on); each operator gets exactly one
full-state snapshot per window; peer replicas equal their owner's shard; old checkpoints are
freed; corruption is detected with a clear error.
"""

import json
from collections import defaultdict

import pytest

from tests.conftest import LAYOUTS

pytestmark = pytest.mark.multiproc

WINDOW = 3
ITERATIONS = 11  # windows start at 0, 3, 6, 9: the first two must have been freed


@pytest.fixture(
    scope="module",
    params=[
        pytest.param(dict(precision="fp32"), id="fp32"),
        pytest.param(dict(precision="bf16", use_distributed_optimizer=True), id="bf16-distopt"),
    ],
)
def reports(request, tmp_path_factory):
    from megatron_moevement.harness.launcher import run_worker_job
    from megatron_moevement.harness.worker import WorkerSpec

    out = tmp_path_factory.mktemp("snap")
    spec = WorkerSpec(
        job="snapshot_check",
        layout=LAYOUTS["pp2xdp2xep2"],
        model=request.param,
        moevement=dict(window_size=WINDOW, replication_factor=1),
        iterations=ITERATIONS,
    )
    run_worker_job(spec, out, timeout=300)
    return {
        r: json.loads((out / f"snapshot_rank{r}.json").read_text()) for r in range(4)
    }, request.param


def test_every_slot_equals_live_state_of_its_iteration(reports):
    reps, _ = reports
    for rank, rep in reps.items():
        assert rep["mismatches"] == [], f"rank {rank}"
        captured = sum(len(slot["hashes"]) for w in rep["windows"] for slot in w["slots"])
        assert captured > 0


def test_each_operator_has_exactly_one_full_snapshot_per_window(reports):
    reps, model = reports
    distributed = model.get("use_distributed_optimizer", False)
    stages = defaultdict(list)
    for rep in reps.values():
        stages[rep["pp_rank"]].append(rep)
    for stage, members in stages.items():
        stage_ops = set().union(*(set(m["registry_operators"]) for m in members))
        for window_index in range(2):
            full_count = defaultdict(int)
            for m in members:
                window = m["windows"][window_index]
                assert window["persisted"] or window_index == 1
                per_rank = defaultdict(int)
                for slot in window["slots"]:
                    for op in slot["full_state_ops"]:
                        per_rank[op] += 1
                        full_count[op] += 1
                # A rank captures each of its operators' full state in exactly one slot (the
                # in-flight window, index 1, has not captured its last slot yet).
                assert all(c == 1 for c in per_rank.values())
                if window_index == 0:
                    assert set(per_rank) == set(m["full_state_plan"])
            if window_index == 0:
                assert set(full_count) == stage_ops, f"stage {stage}: operator not snapshotted"
            if not distributed:
                # Replicas split the work: no operator is captured twice in the stage.
                assert all(c == 1 for c in full_count.values())


def test_compute_weights_cover_frozen_operators(reports):
    reps, _ = reports
    for rep in reps.values():
        for window in rep["windows"]:
            slices = window["slices"]
            for slot in window["slots"]:
                later = {op for s in slices[slot["slot"] :] for op in s}
                assert set(slot["compute_ops"]) == later & set(rep["compute_plan"])
                earlier = {op for s in slices[: slot["slot"]] for op in s}
                assert not earlier & set(slot["compute_ops"])


def test_peer_replica_is_bitwise_equal_to_owner_shard(reports):
    reps, _ = reports
    checked = 0
    for holder, rep in reps.items():
        assert rep["sources"], "every rank holds some replica with r=1"
        for replica in rep["replicas"]:
            owner = reps[replica["source"]]
            assert holder in owner["peers"]
            windows = {w["generation"]: w for w in owner["windows"]}
            if replica["generation"] not in windows:
                continue
            slots = {s["slot"]: s for s in windows[replica["generation"]]["slots"]}
            assert replica["hashes"] == slots[replica["slot"]]["hashes"]
            checked += 1
    assert checked >= 4 * WINDOW


def test_old_checkpoints_are_freed_and_buffers_reused(reports):
    reps, _ = reports
    for rep in reps.values():
        assert rep["windows_started"] == 4
        assert [w["generation"] for w in rep["windows"]] == [2, 3]  # one persisted, one in flight
        assert rep["windows"][0]["persisted"]
        # Host buffers are allocated once per (generation parity, slot), never per window.
        assert rep["pool_allocations"] == 2 * WINDOW
        # Host memory stops growing once both generations exist (replicas arrive one iteration
        # later, asynchronously).
        snapshots = [m["snapshots"] for m in rep["memory"]]
        assert all(b == snapshots[2 * WINDOW - 1] for b in snapshots[2 * WINDOW - 1 :])
        assert all(m == rep["memory"][2 * WINDOW] for m in rep["memory"][2 * WINDOW :])
        assert {g for r in rep["replicas"] for g in [r["generation"]]} <= {2, 3}


def test_corrupted_shard_is_detected_with_a_clear_error(reports):
    reps, _ = reports
    for rep in reps.values():
        msg = rep["corruption_message"]
        assert msg is not None
        assert "checksum mismatch" in msg and "rank" in msg and "slot" in msg
        assert "replica" in msg.lower()  # says where to fall back to


@pytest.mark.multiproc
def test_tensor_parallel_ranks_cut_the_same_schedule(run_job):
    """Each tensor-parallel rank routes only its sequence shard; the popularity statistics are
    summed over the stage, so the ranks of a TP group order and cut the same slices."""
    out = run_job(
        "tp",
        job="snapshot_check",
        layout=dict(tp=2, dp=2, ep=2),
        model=dict(),
        iterations=8,
        moevement=dict(
            window_size=2, replication_factor=0, reorder_threshold=0.01, reorder_fraction=0.01
        ),
    )
    reports = [json.loads((out / f"snapshot_rank{r}.json").read_text()) for r in range(4)]
    schedules = [r["schedule"] for r in reports]
    assert schedules[0]["version"] > 0, "the order never changed: nothing was compared"
    for a, b in ((0, 1), (2, 3)):  # tensor-parallel pairs (tp is Megatron's fastest dimension)
        assert reports[a]["dp_rank"] == reports[b]["dp_rank"]
        assert schedules[a]["slices"] == schedules[b]["slices"]


@pytest.mark.multiproc
def test_capacity_normalized_ordering_runs_past_the_first_window(run_job):
    out = run_job(
        "capacity",
        job="snapshot_check",
        layout=dict(),
        model=dict(moe_expert_capacity_factor=1.5),
        iterations=6,
        moevement=dict(window_size=2, replication_factor=0, ordering="capacity_normalized"),
    )
    report = json.loads((out / "snapshot_rank0.json").read_text())
    assert report["schedule"]["policy"] == "capacity_normalized"
    assert report["windows_started"] == 3 and report["mismatches"] == []


@pytest.mark.multiproc
def test_grouped_experts_keep_the_sparsity(run_job):
    """With grouped-GEMM experts (every local expert stacked in ``weight1``/``weight2``) each
    iteration snapshots 1/W of the experts' full state, and one window all of it exactly once."""
    window = 3
    out = run_job(
        "grouped",
        job="overhead",
        layout=dict(dp=2, ep=2),
        model=dict(moe_grouped_gemm=True, precision="bf16"),
        iterations=2 * window,
        moevement=dict(mode="moevement", window_size=window, replication_factor=0),
    )
    data = json.loads((out / "overhead.json").read_text())
    full = data["expert_full_state_bytes"]
    per_iteration = data["expert_snapshot_bytes_per_iteration"]
    assert full > 0 and len(per_iteration) == 2 * window
    for start in (0, window):
        assert sum(per_iteration[start : start + window]) == full
    assert max(per_iteration) <= full / window * 1.5
