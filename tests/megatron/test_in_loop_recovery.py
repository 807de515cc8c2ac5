"""In-memory recovery inside Megatron-LM's own ``pretrain_gpt.py`` (patched), on CPU with gloo.

Every case runs the same command on PP2 x DP2 x EP2 (bf16, distributed optimizer, Megatron's
default dropout) under the local launcher's elastic agent, once without a fault and once with a
real SIGKILL of one rank in the middle of an iteration (the victim kills itself at the fault
point, ``MOEVEMENT_FAULT_INJECTION``), with one spare process. The recovered job must finish its
``--train-iters`` with a final checkpoint (model, distributed optimizer, RNG, scheduler and
Megatron's counters) bitwise equal to the fault-free one, print every iteration's log line once
with the fault-free values, and replay only on the failed stage.
"""

import pytest

from megatron_moevement.harness.megatron_lm import (
    assert_bitwise_equal,
    final_state,
    log_lines,
    model_args,
    recovery_reports,
    run_pretrain,
)

pytestmark = pytest.mark.multiproc

ITERATIONS = 8
# Scoped recovery needs untied embeddings with pipeline parallelism (tied ones are all-reduced
# between the first and last stage every iteration: recovery is global then, see the last test).
ARGS = [*model_args(ITERATIONS), "--untie-embeddings-and-output-weights"]
STAGE_RANKS = {0: [0, 1], 1: [2, 3]}  # PP2 x DP2: ranks of each pipeline stage


@pytest.fixture(scope="module")
def fault_free(megatron_lm, tmp_path_factory):
    """The fault-free run of the command the recovery tests run."""
    out = tmp_path_factory.mktemp("fault-free")
    assert run_pretrain(megatron_lm, out, "moevement", ARGS, spares=1, elastic=True) == []
    return out


def check_recovered(out, fault_free, iterations=ITERATIONS) -> dict:
    """The recovered run equals the fault-free one: final state bitwise, every log line once with
    the same values (consumed samples, learning rate, losses, grad norm, loss scale, skipped and
    NaN counts). Returns the recovery reports by rank."""
    reference = log_lines(fault_free)
    assert sorted(reference) == list(range(1, iterations + 1))
    assert log_lines(out) == reference
    a, b = final_state(fault_free, iterations), final_state(out, iterations)
    assert sum(1 for k in a if "distrib_optim" in k) > 0 and any("/rng_state/" in k for k in a)
    assert any(k.endswith("counters/consumed_train_samples") for k in a)
    assert_bitwise_equal(a, b)
    return recovery_reports(out)


def check_scoped(reports: dict, failed: int, stage: int, generation: int = 1) -> None:
    """Every rank reported the scoped recovery of ``failed``'s stage; only that stage replayed."""
    assert sorted(reports) == [0, 1, 2, 3]
    for rank, rank_reports in reports.items():
        report = next(r for r in rank_reports if r["generation"] == generation)
        assert report["failed_ranks"] == [failed]
        assert report["path"] == "scoped" and report["tier"] == "sparse-checkpoint"
        assert report["scope_ranks"] == STAGE_RANKS[stage]
        if rank in STAGE_RANKS[stage]:
            assert report["iterations_replayed"], f"rank {rank} in scope replayed nothing"
        else:
            assert report["iterations_replayed"] == [], f"rank {rank} outside the scope replayed"
        assert report["spare"] == (rank == failed)


@pytest.mark.parametrize(
    "victim, stage, iteration, phase",
    [(1, 0, 4, "microbatch1"), (3, 1, 3, "microbatch0")],
    ids=["stage0-rank1", "stage1-last-rank"],
)
def test_sigkill_recovers_in_memory_bitwise(
    megatron_lm, fault_free, tmp_path, victim, stage, iteration, phase
):
    fault = {"rank": victim, "iteration": iteration, "phase": phase}
    failures = run_pretrain(
        megatron_lm, tmp_path, "moevement", ARGS, spares=1, elastic=True, faults=[fault]
    )
    assert [f["rank"] for f in failures] == [victim]
    assert failures[0]["spare"] == 4 and failures[0]["refill"] == 5  # the pool was refilled
    check_scoped(check_recovered(tmp_path, fault_free), victim, stage)
    logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "logs").glob("proc*.log"))
    assert "[MoEvement] recovered in memory" in logs  # in Megatron's own log


def test_a_rank_dying_in_the_first_build_starts_the_job_over(megatron_lm, fault_free, tmp_path):
    """Rank 3 dies with its model built, before the strategy's process group: its peers wait for
    it in that group's rendezvous until their heartbeats break the wait. No iteration ran, so
    every rank starts the job over in generation 1 (the spare as rank 3), bitwise as if nothing
    had happened."""
    fault = {"rank": 3, "iteration": 0, "phase": "model"}
    failures = run_pretrain(
        megatron_lm, tmp_path, "moevement", ARGS, spares=1, elastic=True, faults=[fault]
    )
    assert [f["rank"] for f in failures] == [3]
    reports = check_recovered(tmp_path, fault_free)
    assert sorted(reports) == [0, 1, 2, 3]
    for rank_reports in reports.values():
        [report] = rank_reports
        assert report["path"] == "job-start" and report["failed_ranks"] == [3]
        assert report["generation"] == 1 and report["committed_iteration"] == -1


def test_second_failure_after_the_spare_pool_was_refilled(megatron_lm, tmp_path_factory):
    """One spare: it takes the first failed rank, a new spare is started, and that one takes the
    second failed rank (another stage, in the next generation)."""
    iterations = 10
    args = [*model_args(iterations), "--untie-embeddings-and-output-weights"]
    reference = tmp_path_factory.mktemp("fault-free-10")
    run_pretrain(megatron_lm, reference, "moevement", args, spares=1, elastic=True)
    out = tmp_path_factory.mktemp("two-failures")
    faults = [
        {"rank": 1, "iteration": 3, "phase": "microbatch1"},
        {"rank": 2, "iteration": 6, "phase": "microbatch0", "generation": 1},
    ]
    failures = run_pretrain(
        megatron_lm, out, "moevement", args, spares=1, elastic=True, faults=faults
    )
    assert [(f["rank"], f["spare"]) for f in failures] == [(1, 4), (2, 5)]
    reports = check_recovered(out, reference, iterations)
    check_scoped({r: [x for x in v if x["generation"] == 1] for r, v in reports.items()}, 1, 0)
    check_scoped({r: [x for x in v if x["generation"] == 2] for r, v in reports.items()}, 2, 1, 2)


@pytest.mark.slow
def test_tied_embeddings_recover_globally(megatron_lm, tmp_path_factory):
    """Megatron-LM's default tied embeddings couple the first and last stage inside every
    iteration: recovery rolls every rank back, and is still bitwise."""
    args = model_args(ITERATIONS)
    reference = tmp_path_factory.mktemp("fault-free-tied")
    run_pretrain(megatron_lm, reference, "moevement", args, spares=1, elastic=True)
    out = tmp_path_factory.mktemp("tied")
    fault = {"rank": 0, "iteration": 4, "phase": "microbatch1"}
    run_pretrain(megatron_lm, out, "moevement", args, spares=1, elastic=True, faults=[fault])
    reports = check_recovered(out, reference)
    for rank_reports in reports.values():
        assert rank_reports[0]["scope"] == "global"
        assert rank_reports[0]["scope_ranks"] == [0, 1, 2, 3]


@pytest.mark.slow
def test_without_a_replica_the_job_falls_back_to_megatrons_load(megatron_lm, tmp_path):
    """No replicas (replication factor 0): the failed rank's checkpoint is gone with it, so no
    in-memory tier can serve; every rank restores Megatron's own checkpoint (--load, torch_dist)
    and training finishes, and the reports say which path ran."""
    args = [
        *model_args(ITERATIONS),
        "--untie-embeddings-and-output-weights",
        "--ckpt-format",
        "torch_dist",
        "--save-interval",
        "2",
        "--load",
        str(tmp_path / "ckpt"),
    ]
    fault = {"rank": 1, "iteration": 5, "phase": "microbatch1"}
    failures = run_pretrain(
        megatron_lm,
        tmp_path,
        "moevement",
        args,
        spares=1,
        elastic=True,
        faults=[fault],
        replication_factor=0,
    )
    assert [f["rank"] for f in failures] == [1]
    reports = recovery_reports(tmp_path)
    assert sorted(reports) == [0, 1, 2, 3]
    for rank_reports in reports.values():
        assert rank_reports[0]["path"] == "megatron-load"
        assert "no surviving replica" in rank_reports[0]["reason"]
        assert rank_reports[0]["committed_iteration"] == 3  # the --save of iteration 4
    assert sorted(log_lines(tmp_path, allow_repeats=True)) == list(range(1, ITERATIONS + 1))
