"""StageTimes: per-stage seconds, stall without double counting, and the idle-core test."""

import threading
import time

import pytest

from megatron_moevement.snapshot import stage_times
from megatron_moevement.snapshot.stage_times import StageTimes, host_has_idle_core


def test_stall_counts_after_step_and_waits_not_the_nested_capture():
    times = StageTimes()
    with times.measure("after_step"):
        with times.measure("capture"):
            time.sleep(0.02)
    with times.measure("wait_for_copies"):
        time.sleep(0.01)
    totals = times.totals()
    assert totals["capture"] >= 0.02
    assert totals["after_step"] >= totals["capture"]
    assert totals["stall"] == pytest.approx(totals["after_step"] + totals["wait_for_copies"])
    assert totals["background"] == 0.0


def test_background_stages_add_up_across_threads():
    times = StageTimes()

    def work():
        for stage in ("copy", "checksum", "replication"):
            with times.measure(stage):
                time.sleep(0.005)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    totals = times.totals()
    assert totals["background"] >= 4 * 3 * 0.005
    assert totals["stall"] == 0.0


def test_unknown_stage_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown snapshot stage 'copyy'"):
        with StageTimes().measure("copyy"):
            pass


def test_idle_core_needs_fewer_training_threads_than_cores(monkeypatch):
    monkeypatch.setattr(stage_times, "usable_cores", lambda: 2)
    assert host_has_idle_core(1, 1)
    assert not host_has_idle_core(2, 1)
    assert not host_has_idle_core(1, 2)
    assert not host_has_idle_core(4, 1)
