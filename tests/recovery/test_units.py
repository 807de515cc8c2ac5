"""Unit tests of the recovery machinery that need no training job: the coordinator's store
protocol (spares, generations, heartbeat watch), the heartbeat thread, and the durable-tier
fallback of the recovery driver (with fakes for the distributed parts)."""

import json
import threading
import time
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch.distributed as dist

from megatron_moevement.config import MoEvementConfig
from megatron_moevement.durable.recovery_loader import DurableTierLoader
from megatron_moevement.recovery.coordinator import JobCoordinator, JobFailed, JobTimeout
from megatron_moevement.recovery.driver import RecoveryDriver
from megatron_moevement.recovery.errors import RecoveryError
from megatron_moevement.recovery.procedure import (
    RankRecoveryState,
    RecoveryProcedure,
    rebuild_breakdown,
)
from megatron_moevement.recovery.protocol import ElasticContext
from megatron_moevement.recovery.scope import RankStatus
from megatron_moevement.recovery.tiers import Survey, plan_recovery, resolve_durable
from megatron_moevement.snapshot.replication import choose_peers


@pytest.fixture
def store():
    return dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10)
    )


class FakeTable:
    """Processes 0..n-1; the test sets their exit codes; kill() makes a process exit -9."""

    def __init__(self, n):
        self.codes = {p: None for p in range(n)}
        self.killed = []

    def returncode(self, proc):
        return self.codes[proc]

    def pid(self, proc):
        return 1000 + proc

    def kill(self, proc):
        self.killed.append(proc)
        self.codes[proc] = -9

    def log_hint(self, procs=None):
        return " <logs>"


def beat(store, rank, n, timeout_s=1.0, done=False, pid=None):
    store.set(
        f"hb/{rank}",
        json.dumps(
            dict(
                beat=n,
                pid=pid or 1000 + rank,
                host="h",
                generation=0,
                interval_s=0.1,
                timeout_s=timeout_s,
                done=done,
            )
        ),
    )


# ----------------------------------------------------------------------------- coordinator


def test_dead_ranks_are_replaced_by_spares_in_one_generation(store):
    table = FakeTable(6)
    coord = JobCoordinator(store, 4, spares=[4, 5], batch_window_s=0.0)
    table.codes[1] = -9
    table.codes[3] = 1
    coord._replace(table, coord._dead(table))
    assert coord.generation == 1
    assert json.loads(store.get("gen/1")) == {"generation": 1, "failed": [1, 3]}
    assert json.loads(store.get("spare/4")) == {"rank": 1, "generation": 1}
    assert json.loads(store.get("spare/5")) == {"rank": 3, "generation": 1}
    assert coord.rank_to_proc == {0: 0, 1: 4, 2: 2, 3: 5}
    assert [(f["rank"], f["code"], f["cause"], f["pid"]) for f in coord.failures] == [
        (1, -9, "exit", 1001),
        (3, 1, "exit", 1003),
    ]
    # No spare left: the next failure ends the job, killing the remaining ranks by pid.
    table.codes[0] = -9
    with pytest.raises(JobFailed, match="only 0 spare"):
        coord._replace(table, coord._dead(table))
    assert sorted(table.killed) == [2, 4, 5] and store.check(["job/failed"])


class RefillingTable(FakeTable):
    """A table that can start new spare processes (as the local launcher's does)."""

    def start_spare(self, failed_proc):
        proc = len(self.codes)
        self.codes[proc] = None
        return proc


def test_refill_keeps_the_spare_pool_full(store):
    table = RefillingTable(5)
    coord = JobCoordinator(store, 4, spares=[4], batch_window_s=0.0, refill_spares=True)
    table.codes[1] = -9
    coord._replace(table, coord._dead(table))
    assert coord.failures[-1]["spare"] == 4 and coord.failures[-1]["refill"] == 5
    assert coord.free_spares == [5]
    store.add("stable/1", 4)
    table.codes[4] = -9  # the first spare (now rank 1) dies too: the refilled one takes it
    coord._replace(table, coord._dead(table))
    assert json.loads(store.get("spare/5")) == {"rank": 1, "generation": 2}
    assert coord.rank_to_proc[1] == 5 and coord.free_spares == [6]
    # Without refill the same table is not asked for spares.
    plain = JobCoordinator(store, 4, spares=[], batch_window_s=0.0)
    table.codes[0] = -9
    with pytest.raises(JobFailed, match="only 0 spare"):
        plain._replace(table, [0])


def test_failure_before_the_last_recovery_finished_widens_the_failed_set(store):
    table = FakeTable(6)
    coord = JobCoordinator(store, 4, spares=[4, 5], batch_window_s=0.0)
    table.codes[1] = -9
    coord._replace(table, [1])
    table.codes[2] = -9  # generation 1 never became stable (no stable/1 count)
    coord._replace(table, [2])
    assert json.loads(store.get("gen/2"))["failed"] == [1, 2]
    store.add("stable/2", 4)
    table.codes[5] = -9
    coord.free_spares = [0]
    table.codes[0] = None
    coord._replace(table, [2])
    assert json.loads(store.get("gen/3"))["failed"] == [2]


def test_non_elastic_job_ends_at_the_first_failure(store):
    table = FakeTable(4)
    coord = JobCoordinator(store, 3, spares=[3], elastic=False)
    table.codes[1] = 3
    with pytest.raises(JobFailed, match="cannot take over a rank"):
        coord._replace(table, coord._dead(table))
    assert sorted(table.killed) == [0, 2]  # the spare process is not a rank
    assert "ranks [1] failed" in store.get("job/failed").decode()


def test_silent_rank_is_aborted_and_killed_then_replaced(store):
    table = FakeTable(3)
    coord = JobCoordinator(store, 2, spares=[2], batch_window_s=0.0)
    beat(store, 0, 1)
    assert coord._silent(table, now=0.0) == []  # rank 1 has not beaten yet: not watched
    beat(store, 1, 1)
    assert coord._silent(table, now=0.1) == []
    beat(store, 0, 2)
    assert coord._silent(table, now=0.9) == []
    beat(store, 0, 3)
    silent = coord._silent(table, now=1.5)  # rank 1 unchanged since 0.1: 1.4 s > 1 s
    assert [r for r, _ in silent] == [1] and silent[0][1] == pytest.approx(1.4)
    coord._abort(table, silent)
    abort = json.loads(store.get("abort/0"))
    assert abort["ranks"] == [1] and "no heartbeat for 1.4s" in abort["reason"]
    assert table.killed == [1]
    coord._replace(table, coord._dead(table))
    [failure] = coord.failures
    assert failure["cause"] == "heartbeat" and failure["silent_s"] == pytest.approx(1.4)
    # The replacement gets the full timeout from its assignment before it counts as silent.
    assigned = coord._beats[1][1]
    beat(store, 0, 4)
    assert coord._silent(table, now=assigned + 0.5) == []
    beat(store, 1, 1, pid=2002)  # the spare's first beat
    beat(store, 0, 5)
    assert coord._silent(table, now=assigned + 1.2) == []
    assert coord._silent(table, now=assigned + 2.5) == [
        (0, pytest.approx(1.3)),
        (1, pytest.approx(1.3)),
    ]


def test_finished_and_exited_ranks_are_not_silent(store):
    table = FakeTable(2)
    coord = JobCoordinator(store, 2, spares=[])
    beat(store, 0, 1)
    beat(store, 1, 1)
    coord._silent(table, now=0.0)
    beat(store, 0, 2, done=True)  # rank 0 finished: its last beat says so
    table.codes[1] = 0  # rank 1 exited
    assert coord._silent(table, now=100.0) == []


def test_run_loop_until_done(store):
    table = FakeTable(3)
    coord = JobCoordinator(store, 2, spares=[2], batch_window_s=0.05)
    errors = []
    thread = threading.Thread(target=lambda: _run_catching(coord, table, 20, errors))
    thread.start()
    table.codes[0] = -9
    deadline = time.monotonic() + 10
    while not store.check(["gen/1"]) and time.monotonic() < deadline:
        time.sleep(0.01)
    table.codes[2] = table.codes[1] = 0  # the spare (now rank 0) and rank 1 finish
    thread.join(timeout=10)
    assert not errors and store.check(["job/done"])
    assert coord.rank_to_proc == {0: 2, 1: 1}


def test_run_loop_times_out(store):
    coord = JobCoordinator(store, 1, spares=[])
    with pytest.raises(JobTimeout, match="within 0s"):
        coord.run(FakeTable(1), timeout=0.1)
    assert store.check(["job/failed"])


def _run_catching(coord, table, timeout, errors):
    try:
        coord.run(table, timeout)
    except Exception as exc:  # pragma: no cover - reported by the test
        errors.append(exc)


# ----------------------------------------------------------------------------- heartbeat


def test_heartbeat_beats_and_says_when_done(store):
    ctx = ElasticContext(store, rank=2, world_size=4)
    hb = ctx.start_heartbeat(interval_s=0.05, timeout_s=0.5)
    assert ctx.start_heartbeat(1.0, 10.0) is hb  # started once
    time.sleep(0.4)
    info = json.loads(store.get("hb/2"))
    assert info["beat"] >= 3 and info["timeout_s"] == 0.5 and not info["done"]
    hb.stop(done=True)
    assert json.loads(store.get("hb/2"))["done"]


def test_abort_request_is_relayed_once_and_only_for_the_live_generation(store):
    ctx = ElasticContext(store, rank=0, world_size=2)
    store.set("abort/0", json.dumps(dict(ranks=[1], reason="rank 1 sent no heartbeat")))
    assert not ctx.abort_if_requested(store)  # no live process group yet
    ctx._live_generation = 0
    assert ctx.abort_if_requested(store)
    assert not ctx.abort_if_requested(store)  # once per generation
    ctx._live_generation = 1  # the next generation is not aborted by abort/0
    assert not ctx.abort_if_requested(store)
    ctx.mark_torn_down()
    assert ctx._live_generation is None


def test_waiting_for_a_generation_stops_when_the_job_failed(store):
    ctx = ElasticContext(store, rank=0, world_size=2)
    store.set("job/failed", "ranks [1] died and only 0 spare(s) are left")
    with pytest.raises(RecoveryError, match="agent gave up: ranks"):
        ctx.wait_for_generation(0, wait_s=5)


def test_a_generation_superseded_before_everyone_arrived_is_left(store):
    # Rank 0 arrives at generation 1 alone; a second failure announces generation 2 meanwhile:
    # rank 0 must leave generation 1 (whose gloo rendezvous would wait for a dead rank).
    from megatron_moevement.recovery.protocol import GenerationSuperseded, StoreKeys

    ctx = ElasticContext(store, rank=0, world_size=2, generation=1, timeout_s=5)
    threading.Timer(0.1, lambda: store.set(StoreKeys.generation(2), "{}")).start()
    with pytest.raises(GenerationSuperseded, match="generation 1 was superseded by generation 2"):
        ctx._wait_for_everyone()


def test_everyone_arrived_at_a_generation_joins_it(store):
    ctx = ElasticContext(store, rank=0, world_size=2, generation=1, timeout_s=5)
    threading.Timer(0.1, lambda: store.add("arrived/1", 1)).start()  # rank 1 arrives
    ctx._wait_for_everyone()
    assert int(store.add("arrived/1", 0)) == 2


@pytest.fixture
def tracked_ctx(store, monkeypatch):
    """Rank 0 of 2 on its own, tracked connection to ``store`` (as ``from_env`` connects)."""
    from megatron_moevement.recovery.protocol import connect_store_tracked

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(store.port))
    client, fds = connect_store_tracked()
    assert len(fds) == 1  # the connection it opened is told apart
    ctx = ElasticContext(client, rank=0, world_size=2, timeout_s=30, store_fds=fds)
    yield ctx
    if ctx.heartbeat is not None:
        ctx.heartbeat.stop(done=False)


def test_a_wait_in_a_superseded_generation_is_broken_and_the_store_reconnected(store, tracked_ctx):
    # The main thread waits on the store for something a dead rank would have written (a group's
    # rendezvous); the agent announces generation 1. The heartbeat thread shuts the connection
    # down, so the wait fails with a network error now, not with a timeout 30 s later.
    from megatron_moevement.recovery.protocol import StoreKeys

    ctx = tracked_ctx
    first_store, first_fds = ctx.store, ctx.store_fds
    ctx.start_heartbeat(interval_s=0.05, timeout_s=1.0)
    time.sleep(0.5)
    assert ctx._severed_for is None  # nothing was announced: nothing is broken
    threading.Timer(0.1, lambda: store.set(StoreKeys.generation(1), "{}")).start()
    with pytest.raises(dist.DistNetworkError):
        first_store.wait(["gen0/rank_1"], timedelta(seconds=30))
    assert ctx._severed_for == 0
    ctx.mark_torn_down()  # the rank recovers: its store connection is whole again
    assert ctx.store is not first_store and ctx.store_fds and ctx.store_fds != first_fds
    assert ctx._severed_for is None
    time.sleep(0.5)  # recovering: the main thread polls the store itself, nothing is broken
    ctx.store.set("after", "1")
    assert ctx.store.get("after") == b"1" and ctx._severed_for is None


def test_a_rendezvous_with_a_dead_rank_is_left_for_the_newer_generation(store, tracked_ctx):
    # Rank 1 arrived at generation 1 and died before joining its gloo rendezvous; rank 0 waits in
    # init_process_group until the agent announces generation 2, then leaves for it.
    from megatron_moevement.recovery.protocol import GenerationSuperseded, StoreKeys

    ctx = tracked_ctx
    ctx.generation = 1
    store.add(StoreKeys.arrived(1), 1)  # rank 1 arrived
    first_store = ctx.store
    ctx.start_heartbeat(interval_s=0.05, timeout_s=1.0)
    announced = dict(generation=2, failed=[1])
    threading.Timer(0.3, lambda: store.set(StoreKeys.generation(2), json.dumps(announced))).start()
    with pytest.raises(GenerationSuperseded, match="while this rank waited in its rendezvous"):
        ctx.init_process_group()
    assert not dist.is_initialized()
    assert ctx.store is not first_store and ctx._recovering  # reconnected, and recovering
    assert ctx.wait_for_generation(1, wait_s=5) == announced


# ----------------------------------------------------------------------------- durable tier


class SameOnEveryRank:
    """One rank's view of the collectives: every rank reports what this one does."""

    def __init__(self, world=4):
        self.world = world

    def all_gather(self, obj):
        return [obj] * self.world

    def barrier(self):
        pass


def make_procedure(rank, config, loader=None, checkpoints=()):
    strategy = SimpleNamespace(
        config=config, replicator_ranks_per_node=4, checkpoints=list(checkpoints), scalar_log={}
    )
    trainer = SimpleNamespace(layout="pp2xdp2")
    return RecoveryProcedure(
        rank, 4, 1, trainer, strategy, RankRecoveryState(), SameOnEveryRank(), config, loader
    )


STATUSES = [RankStatus(r, r // 2, r % 2, 7, False, r not in (0, 3), True) for r in range(4)]


def survey(config, failed=(0, 3), window=1, holds=(False, True, True, False), loader=True):
    """Ranks 0 and 3 failed: rank 0's replica lives on rank 1; rank 3's on rank 0."""
    return Survey(
        statuses=STATUSES,
        failed=list(failed),
        window=window,
        holds_window=list(holds),
        replica_peers=[choose_peers(r, 4, config.replication_factor, 4) for r in range(4)],
        has_scalar_log=[s.has_state for s in STATUSES],
        durable_dir_set=config.durable_dir is not None,
        durable_loader_installed=loader,
    )


def ckpt(window):
    return SimpleNamespace(window=window, start_iteration=3 * window)


def test_lost_replicas_without_durable_tier_is_a_clear_error():
    cfg = MoEvementConfig(replication_factor=1)
    with pytest.raises(RecoveryError) as err:
        plan_recovery(survey(cfg, loader=False))
    text = str(err.value)
    # Rank 0's replica lives on rank 1 (alive); rank 3's on rank 0, which failed.
    assert "rank 3's sparse checkpoint has no surviving replica" in text
    assert "rank 0's sparse checkpoint" not in text
    assert "durable tier" in text and "durable_dir is not set" in text
    cfg = MoEvementConfig(durable_dir="/ckpt", durable_interval=10)
    driver = RecoveryDriver(
        ElasticContext(store=None, rank=1, world_size=4), lambda: None, config=cfg
    )
    # With durable_dir set, the driver reads the real durable tier by default...
    assert isinstance(driver.durable_loader, DurableTierLoader)
    assert driver.durable_loader.durable_dir == "/ckpt"
    # ...and without a loader the plan says so.
    with pytest.raises(RecoveryError, match="no durable checkpoint loader is installed"):
        plan_recovery(survey(cfg, loader=False))
    plan = plan_recovery(survey(cfg))
    assert plan.needs_durable and plan.durable_ranks == [3] and plan.fetch_from == {0: 1}


def test_durable_checkpoint_of_the_same_window_replaces_only_the_lost_rank():
    cfg = MoEvementConfig(durable_dir="/ckpt", durable_interval=10)
    calls = []

    def loader(rank, layout):
        calls.append((rank, layout))
        return ckpt(1)

    s = survey(cfg)
    plan = plan_recovery(s)
    lost_rank = make_procedure(3, cfg, loader)
    resolved = lost_rank.consult_durable_tier(plan, s)
    assert resolved.window == 1 and resolved.scope == plan.scope and resolved.path == "durable"
    assert resolved.fetch_from == {0: 1}  # rank 0 still fetches its checkpoint from rank 1
    assert calls == [(3, "pp2xdp2")]
    assert lost_rank.strategy.checkpoints[0].window == 1 and lost_rank.state.received_checkpoint
    survivor = make_procedure(2, cfg, loader, checkpoints=["live"])
    survivor.consult_durable_tier(plan, s)
    assert survivor.strategy.checkpoints == ["live"]  # keeps its in-memory checkpoint


def test_older_durable_window_means_global_rollback_to_it():
    cfg = MoEvementConfig(durable_dir="/ckpt", durable_interval=10)
    s = survey(cfg)
    driver = make_procedure(2, cfg, lambda rank, layout: ckpt(0), checkpoints=["live"])
    plan = driver.consult_durable_tier(plan_recovery(s), s)
    assert plan.window == 0 and not plan.scope.scoped and plan.scope.ranks == [0, 1, 2, 3]
    assert plan.scope.committed == 7 and "durable tier holds window 0" in plan.scope.reason
    assert driver.strategy.checkpoints[0].window == 0


def test_missing_durable_checkpoint_or_loader_error_is_reported():
    cfg = MoEvementConfig(durable_dir="/ckpt", durable_interval=10)
    s = survey(cfg)
    plan = plan_recovery(s)
    with pytest.raises(RecoveryError, match=r"ranks \[0, 1, 2, 3\] have no durable checkpoint"):
        make_procedure(2, cfg, lambda r, l: None).consult_durable_tier(plan, s)

    def broken(rank, layout):
        raise OSError("disk gone")

    with pytest.raises(RecoveryError, match="loader failed on rank 2: OSError: disk gone"):
        make_procedure(2, cfg, broken).consult_durable_tier(plan, s)


def test_durable_tier_asked_first_in_the_first_window_then_initial_state():
    cfg = MoEvementConfig(durable_dir="/ckpt", durable_interval=10)
    s = survey(cfg, window=-1)
    plan = plan_recovery(s)
    assert plan.needs_durable and plan.durable_ranks == [0, 1, 2, 3]
    resolved = resolve_durable(plan, s, [-1, -1, -1, -1])
    assert resolved.tier == "initial-state" and not resolved.scope.scoped
    assert plan_recovery(survey(MoEvementConfig(), window=-1)).tier == "initial-state"


def test_replay_from_durable_needs_the_scalar_log():
    cfg = MoEvementConfig(durable_dir="/ckpt", durable_interval=10)
    driver = make_procedure(2, cfg)

    class Log(dict):
        def span(self):
            return "6..9"

    driver.strategy.scalar_log = Log({i: 1 for i in range(6, 10)})
    driver.check_scalar_coverage(7, 9, ckpt(2))  # window start 6: replays 7..9, all logged
    with pytest.raises(RecoveryError, match=r"durable checkpoint of window 1 .*covers 6\.\.9 "):
        driver.check_scalar_coverage(4, 9, ckpt(1))  # window start 3: needs 4..9
    with pytest.raises(RecoveryError, match=r"initial state starts at iteration 0.*lacks \[0, 1"):
        driver.check_scalar_coverage(0, 9)  # the initial-state tier replays 0..9


def test_rebuild_breakdown_splits_the_total_and_names_the_remainder():
    steps = rebuild_breakdown(0.5, 0.1, {"process_groups": 0.15, "model": 0.05})
    assert steps == pytest.approx(
        {"gc": 0.1, "process_groups": 0.15, "model": 0.05, "strategy_and_rest": 0.2}
    )
    # A trainer that does not time its setup: everything after gc is the remainder.
    assert rebuild_breakdown(0.3, 0.1, None) == pytest.approx({"gc": 0.1, "strategy_and_rest": 0.2})
    # Clock granularity never yields a negative remainder.
    assert rebuild_breakdown(0.1, 0.1, {"model": 0.01})["strategy_and_rest"] == 0.0
