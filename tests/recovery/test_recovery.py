"""End-to-end recovery from real SIGKILLs (PP2 x DP2 x EP2, 4 ranks + spares, CPU/gloo).

Every run must finish its iterations with a final state bitwise equal to a fault-free run. When
the failed ranks lie in one stage, only that stage's ranks (its data-parallel group) roll back,
fed by the other stage's upstream logs, and the ranks outside replay nothing; when every stage
lost a rank, recovery is a global rollback.
"""

import json
import random

import pytest

from megatron_moevement.harness.launcher import run_elastic_job
from megatron_moevement.harness.worker import WorkerSpec
from tests.conftest import (
    RESILIENT_ITERATIONS,
    RESILIENT_LAYOUT,
    RESILIENT_MODEL,
    assert_states_bitwise_equal,
    load_states,
)

pytestmark = pytest.mark.multiproc

LAYOUT = RESILIENT_LAYOUT
MODEL = RESILIENT_MODEL
ITERATIONS = RESILIENT_ITERATIONS


@pytest.fixture
def fault_free(fault_free_pp2xdp2xep2):
    return fault_free_pp2xdp2xep2


def _run(tmp_path, faults, spares, replication_factor=1, **moevement):
    spec = WorkerSpec(
        job="resilient",
        layout=LAYOUT,
        model=MODEL,
        iterations=ITERATIONS,
        moevement=dict(
            window_size=3, replication_factor=replication_factor, faults=faults, **moevement
        ),
        timeout_s=60,
    )
    agent = run_elastic_job(spec, tmp_path, timeout=600, spares=spares)
    reports = [json.loads((tmp_path / f"recovery_rank{r}.json").read_text()) for r in range(4)]
    return agent, reports


STAGE = {0: 0, 1: 0, 2: 1, 3: 1}  # pipeline stage of each rank in PP2 x DP2 x EP2


def _check(
    fault_free,
    tmp_path,
    reports,
    expected_failed,
    expected_scope=None,
    tiers=("sparse-checkpoint",),
):
    assert_states_bitwise_equal(load_states(tmp_path, 4), fault_free)
    for rep in reports:
        assert rep["reports"], f"rank {rep['rank']} has no recovery report"
        last = rep["reports"][-1]
        assert set(expected_failed) <= set(last["failed_ranks"])
        assert last["tier"] in tiers, last
        if last["tier"] == "initial-state":
            # Nothing had persisted: every rank replays from the job's first iteration.
            assert last["scope"] == "global" and last["window"] == -1
            assert last["iterations_replayed"] == list(range(last["committed_iteration"] + 1))
        assert last["path"] == last["scope"]  # in memory: "scoped" or "global"
        assert set(last["times_s"]) == {"detect", "rebuild", "fetch", "replay"}
        steps = last["rebuild_steps_s"]
        assert set(steps) == {
            "gc",
            "process_groups",
            "model",
            "ddp_and_optimizer",
            "strategy_and_rest",
        }
        assert sum(steps.values()) == pytest.approx(last["times_s"]["rebuild"], abs=1e-6)
        if expected_scope is not None:
            assert last["scope"] == expected_scope, last["reason"]
        stages = {STAGE[r] for r in last["failed_ranks"]}
        scope_ranks = sorted(r for r in STAGE if STAGE[r] in stages)
        if last["scope"] == "scoped":
            assert last["scope_ranks"] == scope_ranks
        if rep["rank"] in last["scope_ranks"]:
            if last["tier"] != "initial-state":  # (checked above: maybe nothing committed yet)
                assert last["iterations_replayed"], "a rollback replays at least one iteration"
        else:
            # Outside the scope: nothing replayed, live state kept.
            assert last["iterations_replayed"] == [] and last["microbatches_replayed"] == 0


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param(dict(rank=1, iteration=6, phase="microbatch2"), id="mid-iteration"),
        pytest.param(dict(rank=2, iteration=7, phase="after_snapshot"), id="during-snapshot"),
    ],
)
def test_single_kill_recovers_bitwise(fault_free, tmp_path, fault):
    agent, reports = _run(tmp_path, [fault], spares=1)
    assert [f["rank"] for f in agent.failures] == [fault["rank"]]
    assert agent.failures[0]["code"] == -9  # a real SIGKILL
    _check(fault_free, tmp_path, reports, [fault["rank"]], expected_scope="scoped")
    replacement = reports[fault["rank"]]
    assert replacement["joined_as_spare"] and replacement["reports"][-1]["spare"]


@pytest.mark.timeout(400)
def test_hung_rank_is_noticed_by_its_heartbeat(fault_free, tmp_path):
    # SIGSTOP mid-iteration: no socket closes and nothing raises; the other ranks block in p2p and
    # collectives with rank 1 until the agent sees its heartbeat stop, aborts generation 0 and
    # kills it by pid. Recovery then runs as after a crash, and the result is bitwise equal.
    fault = dict(rank=1, iteration=6, phase="microbatch2", signal="SIGSTOP")
    agent, reports = _run(
        tmp_path, [fault], spares=1, heartbeat_interval_s=0.25, heartbeat_timeout_s=2.0
    )
    [failure] = agent.failures
    assert failure["rank"] == 1 and failure["cause"] == "heartbeat"
    assert failure["code"] == -9  # killed by the agent, by pid, while stopped
    assert 2.0 < failure["silent_s"] < 10.0
    _check(fault_free, tmp_path, reports, [1], expected_scope="scoped")
    stopped = json.loads((tmp_path / "faults.jsonl").read_text().splitlines()[0])["time"]
    # Every survivor noticed within seconds (timeout 2 s + one beat + polling).
    latencies = [rep["reports"][-1]["noticed_at"] - stopped for rep in reports if rep["rank"] != 1]
    assert all(0 < lat < 8.0 for lat in latencies), latencies
    assert reports[1]["joined_as_spare"]


def test_two_ranks_of_different_stages_killed_at_once(fault_free, tmp_path):
    # Both die as iteration 6 starts (a kill deep inside the iteration could never be reached
    # by the second victim: it would block on the first one's missing activations).
    # With r=1 each rank's replica lives on the next rank: 0 -> 1, 2 -> 3 survive.
    faults = [dict(rank=0, iteration=6, phase="before"), dict(rank=2, iteration=6, phase="before")]
    agent, reports = _run(tmp_path, faults, spares=2)
    assert sorted(f["rank"] for f in agent.failures) == [0, 2]
    # Both stages lost a rank: nothing outside to feed from, so every rank rolls back.
    _check(fault_free, tmp_path, reports, [0, 2], expected_scope="global")


@pytest.mark.parametrize(
    "faults, options, expected_failed, recoveries",
    [
        pytest.param(
            [dict(rank=1, iteration=1, phase="microbatch2")], {}, [1], 1, id="iteration-1"
        ),
        pytest.param(
            [dict(rank=3, iteration=0, phase="before")], {}, [3], 1, id="before-iteration-0"
        ),
        # Rank 3 dies as soon as it is built, before it records its initial state; a peer still
        # building fails in its build. The spare that takes rank 3, and any rank whose first
        # build failed, record their initial state from their first completed build.
        pytest.param(
            [dict(rank=3, iteration=0, phase="build")], {}, [3], 1, id="during-the-first-build"
        ),
        pytest.param(
            [dict(rank=2, iteration=2, phase="after_step")],
            {},
            [2],
            1,
            id="window-not-persisted",
        ),
        # After an initial-state recovery the scalar log still reaches back to iteration 0, so
        # a second failure before the new window persists replays from the initial state again.
        pytest.param(
            [
                dict(rank=1, iteration=1, phase="microbatch1"),
                dict(rank=2, iteration=3, phase="microbatch0", generation=1),
            ],
            {},
            [2],
            2,
            id="second-kill-before-the-next-window-persists",
        ),
        # The durable tier is configured but holds nothing of this run yet: it is asked first,
        # then the initial state is used.
        pytest.param(
            [dict(rank=2, iteration=1, phase="microbatch0")],
            dict(durable_interval=4),
            [2],
            1,
            id="empty-durable-tier",
        ),
        # Rank 3 dies while every rank replays iteration 1 from the initial state: the recovery
        # restarts in the next generation, from the initial state again.
        pytest.param(
            [
                dict(rank=1, iteration=2, phase="microbatch1"),
                dict(rank=3, iteration=1, phase="replay", generation=1),
            ],
            {},
            [1, 3],
            None,
            id="kill-during-the-replay",
        ),
    ],
)
def test_kill_in_the_first_window_replays_from_the_initial_state(
    fault_free, tmp_path, faults, options, expected_failed, recoveries
):
    # No sparse checkpoint has persisted yet (W = 3): every rank rebuilds the job's initial
    # state (a seeded build, checked against the fingerprint recorded at start) and replays.
    if "durable_interval" in options:
        options = dict(options, durable_dir=str(tmp_path / "durable"))
    agent, reports = _run(tmp_path, faults, spares=len(faults), **options)
    assert [f["rank"] for f in agent.failures] == [f["rank"] for f in faults]
    _check(fault_free, tmp_path, reports, expected_failed, "global", tiers=("initial-state",))
    if recoveries is not None:
        survivors = [rep for rep in reports if not rep["joined_as_spare"]]
        assert all(len(rep["reports"]) == recoveries for rep in survivors)


@pytest.mark.parametrize(
    "faults, options",
    [
        pytest.param([dict(rank=3, iteration=0, phase="model")], {}, id="in-the-first-build"),
        pytest.param(
            [
                dict(rank=1, iteration=1, phase="microbatch2"),
                dict(rank=2, iteration=0, phase="model", generation=1),
            ],
            {},
            id="in-a-recovery-rebuild",
        ),
        # Stopped, not killed: the agent notices the silent heartbeat and kills it by pid.
        pytest.param(
            [dict(rank=3, iteration=0, phase="model", signal="SIGSTOP")],
            dict(heartbeat_interval_s=0.25, heartbeat_timeout_s=2.0),
            id="hung-in-the-first-build",
        ),
    ],
)
def test_a_rank_dying_before_a_groups_rendezvous_is_noticed_at_once(
    fault_free, tmp_path, faults, options
):
    # The victim dies with its model built, before the strategy's process group: its peers wait
    # for it in that group's rendezvous on the store, where no socket of theirs closes. Their
    # heartbeat threads break the wait once the agent announces the next generation, instead of
    # the group timeout (60 s here) ending it, after which the spare would be gone.
    agent, reports = _run(tmp_path, faults, spares=len(faults), **options)
    assert [f["rank"] for f in agent.failures] == [f["rank"] for f in faults]
    failed = sorted(f["rank"] for f in faults)
    _check(fault_free, tmp_path, reports, failed, "global", tiers=("initial-state",))
    killed = json.loads((tmp_path / "faults.jsonl").read_text().splitlines()[-1])["time"]
    latencies = [
        rep["reports"][-1]["noticed_at"] - killed for rep in reports if not rep["joined_as_spare"]
    ]
    assert latencies and all(0 < lat < 10.0 for lat in latencies), latencies


def test_first_window_kill_with_an_irreproducible_build_is_a_clear_error(tmp_path):
    from megatron_moevement.recovery.coordinator import JobFailed

    faults = [dict(rank=1, iteration=1, phase="microbatch2")]
    with pytest.raises(JobFailed) as err:
        _run(tmp_path, faults, spares=1, rebuild_seed_offset=7)
    assert "does not reproduce the weights the job started from" in str(err.value)
    assert "Fix: seed build()" in str(err.value)


def test_single_rank_job_losing_its_only_rank_is_a_clear_error(tmp_path):
    # One rank, one spare: the sparse checkpoints died with the only process (no peer held a
    # replica). Recovery must stop at once with the reason and the fix, not wait for timeouts.
    from megatron_moevement.harness.layout import ParallelLayout
    from megatron_moevement.recovery.coordinator import JobFailed

    spec = WorkerSpec(
        job="resilient",
        layout=ParallelLayout().to_dict(),
        model=MODEL,
        iterations=ITERATIONS,
        moevement=dict(window_size=3, faults=[dict(rank=0, iteration=5, phase="microbatch0")]),
        timeout_s=60,
    )
    with pytest.raises(JobFailed) as err:
        run_elastic_job(spec, tmp_path, timeout=120, spares=1)
    assert "every rank lost its state" in str(err.value)
    assert "durable tier" in str(err.value) and "at least two ranks" in str(err.value)


def test_missing_peer_replica_is_a_clear_error(tmp_path):
    from megatron_moevement.recovery.coordinator import JobFailed

    # Rank 3's only replica (r=1) is on rank 0: losing both loses rank 3's sparse checkpoint.
    faults = [dict(rank=0, iteration=6, phase="before"), dict(rank=3, iteration=6, phase="before")]
    with pytest.raises(JobFailed) as err:
        _run(tmp_path, faults, spares=2)
    assert "no surviving replica" in str(err.value)
    assert "durable tier" in str(err.value)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_lost_replica_falls_back_to_the_durable_tier(fault_free, tmp_path):
    # As above (rank 3's only replica dies with rank 0), but the durable tier is configured: the
    # strategies' periodic saver writes `dist_checkpointing` (backend moevement) checkpoints every
    # iteration, and the driver's default DurableTierLoader reads rank 3's from there; rank 0's
    # comes from its surviving replica on rank 1.
    faults = [dict(rank=0, iteration=6, phase="before"), dict(rank=3, iteration=6, phase="before")]
    agent, reports = _run(
        tmp_path, faults, spares=2, durable_dir=str(tmp_path / "durable"), durable_interval=1
    )
    assert sorted(f["rank"] for f in agent.failures) == [0, 3]
    assert_states_bitwise_equal(load_states(tmp_path, 4), fault_free)
    for rep in reports:
        last = rep["reports"][-1]
        assert last["path"] == "durable" and last["tier"] == "durable", last
        assert last["scope"] == "global"  # both stages lost a rank


def test_second_kill_during_recovery(fault_free, tmp_path):
    # Rank 1 dies; while stage 0 replays, rank 2 (outside the scope, waiting) dies too.
    faults = [
        dict(rank=1, iteration=7, phase="microbatch0"),
        dict(rank=2, iteration=6, phase="recovery_wait", generation=1),
    ]
    agent, reports = _run(tmp_path, faults, spares=2)
    assert [f["rank"] for f in agent.failures] == [1, 2]
    # The second failure hit the other stage: the widened scope covers both, hence global.
    _check(fault_free, tmp_path, reports, [1, 2], expected_scope="global")


def test_second_kill_in_the_same_stage_stays_scoped(fault_free, tmp_path):
    # With r=2, rank 0's replicas live on ranks 1 and 2: one survives rank 1's loss.
    faults = [
        dict(rank=1, iteration=7, phase="microbatch0"),
        dict(rank=0, iteration=5, phase="replay", generation=1),
    ]
    agent, reports = _run(tmp_path, faults, spares=2, replication_factor=2)
    assert [f["rank"] for f in agent.failures] == [1, 0]
    _check(fault_free, tmp_path, reports, [0, 1], expected_scope="scoped")


PHASES = ["before", "microbatch0", "microbatch3", "after_step", "after_snapshot"]


def _random_fault(seed):
    rng = random.Random(seed)
    return dict(
        rank=rng.randrange(4), iteration=rng.randrange(ITERATIONS), phase=rng.choice(PHASES)
    )


ANY_TIER = ("sparse-checkpoint", "initial-state")


@pytest.mark.parametrize("seed", [11, 23])
def test_random_fault_injection(fault_free, tmp_path, seed):
    fault = _random_fault(seed)
    agent, reports = _run(tmp_path, [fault], spares=1)
    _check(fault_free, tmp_path, reports, [fault["rank"]], tiers=ANY_TIER)


@pytest.mark.soak
@pytest.mark.parametrize("seed", range(100, 140))
def test_random_fault_injection_soak(fault_free, tmp_path, seed):
    fault = _random_fault(seed)
    agent, reports = _run(tmp_path, [fault], spares=1)
    _check(fault_free, tmp_path, reports, [fault["rank"]], tiers=ANY_TIER)
