"""MoEvement's timeline runtime: windows restart after a recovery, as in the implementation."""

import pytest

from megatron_moevement.sim.recovery import RecoveryModel
from megatron_moevement.sim.strategies import STRATEGIES, _MoEvementRuntime
from megatron_moevement.sim.timeline import run_timeline

REC = RecoveryModel(
    restart_s=1.0,
    load_s=0.0,
    fixed_replay_s=0.0,
    per_lost_iteration_s=1.0,
    cycle_iterations=3.0,
    durability_lag_iterations=0.5,
)


def test_first_failure_matches_the_static_model():
    runtime = _MoEvementRuntime(1.0, 0.0, REC)
    assert runtime.on_failure(7.2) == pytest.approx(REC.recovery_s(7.2)) == pytest.approx(2.2)
    assert runtime.on_failure(7.2, expected=True) == pytest.approx(REC.mean_s)


def test_windows_restart_after_a_recovery():
    runtime = _MoEvementRuntime(1.0, 0.0, REC)
    runtime.on_failure(7.2)  # restores the window ending at 6, resumes at iteration 7
    # No window of the new sequence persisted yet: back to the one restored before.
    assert runtime.on_failure(9.7) == pytest.approx(1.0 + (9.7 - 6.0))
    assert REC.recovery_s(9.7) == pytest.approx(1.7)  # what the static cycle would say
    # A window [9, 12) completed and persisted (lag 0.5) since the resume at 9.
    assert runtime.on_failure(12.6) == pytest.approx(1.0 + 0.6)


def test_failure_during_recovery_repeats_the_same_rollback():
    runtime = STRATEGIES["moevement"]
    rec = RecoveryModel(
        restart_s=2.0,
        load_s=0.0,
        fixed_replay_s=0.0,
        per_lost_iteration_s=1.0,
        cycle_iterations=3.0,
    )
    result = run_timeline(_MoEvementRuntime(1.0, 0.0, rec), [7.5, 8.0], 30.0)
    # First failure at progress 7.5 loses 1.5 iterations (3.5 s); the second, 0.5 s into that
    # recovery, restarts it from the same state: 0.5 + 3.5 s recovering, then 18.5 s training.
    assert result.failures == 2
    assert result.recovery_s == pytest.approx(4.0)
    assert result.progress_iterations == pytest.approx(7.5 + 18.5)
    assert runtime.name == "moevement"
