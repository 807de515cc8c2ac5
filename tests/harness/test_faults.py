"""Fault specs are checked before a run, and a run asked to inject a fault proves it fired."""

import json

import pytest

from megatron_moevement.harness.faults import (
    FaultSpecError,
    check_faults_fired,
    valid_phases,
    validate_faults,
)


def test_valid_phases_cover_every_point():
    assert valid_phases(2) == [
        "before",
        "model",
        "build",
        "microbatch0",
        "microbatch1",
        "backward0",
        "backward1",
        "optimizer_step",
        "after_step",
        "after_snapshot",
        "fetch",
        "replay",
        "recovery_wait",
    ]


@pytest.mark.parametrize(
    "fault, match",
    [
        (dict(rank=4, iteration=1, phase="before"), "rank=4 is invalid; valid: an int in 0..3"),
        (dict(rank=-1, iteration=1, phase="before"), "rank=-1"),
        (dict(rank=0, iteration=10, phase="before"), "iteration=10 is invalid.*0..9"),
        (dict(rank=0, iteration=True, phase="before"), "iteration=True"),
        (dict(rank=0, iteration=1, phase="sideways"), "phase='sideways' is unknown; valid: before"),
        (dict(rank=0, iteration=1, phase="microbatch4"), "microbatch4"),
        (dict(rank=0, iteration=1, phase="before", generation=-1), "generation=-1"),
        (dict(rank=0, iteration=1, phase="before", signal="SIGTERM"), "signal='SIGTERM'"),
        (dict(rank=0, iteration=1, phase="before", when="now"), "unknown field"),
        (dict(iteration=1, phase="before"), "rank=None"),
        (dict(rank=0, iteration=2, phase="build"), "phase 'build'.*takes iteration=0, got 2"),
        (dict(rank=0, iteration="*", phase="model"), "phase 'model'.*takes iteration=0, got '"),
    ],
)
def test_bad_faults_are_refused_with_the_valid_values(fault, match):
    with pytest.raises(FaultSpecError, match=match):
        validate_faults([fault], world_size=4, iterations=10, num_microbatches=4)


def test_good_faults_pass():
    faults = [
        dict(rank=3, iteration=0, phase="microbatch3"),
        dict(rank=0, iteration=9, phase="recovery_wait", generation=1, signal="SIGSTOP"),
        dict(rank=2, iteration="*", phase="replay", generation=1),
    ]
    assert validate_faults(faults, 4, 10, 4) == faults


def test_a_fault_that_never_fired_fails_the_run(tmp_path):
    fault = dict(rank=1, iteration=7, phase="after_step")
    with pytest.raises(AssertionError, match="never fired"):
        check_faults_fired([fault], tmp_path, failures=[])
    (tmp_path / "faults.jsonl").write_text(json.dumps(dict(fault, time=1.0)) + "\n")
    with pytest.raises(AssertionError, match="no death of rank 1 by SIGKILL"):
        check_faults_fired([fault], tmp_path, failures=[dict(rank=1, code=1)])
    check_faults_fired([fault], tmp_path, failures=[dict(rank=1, code=-9)])
