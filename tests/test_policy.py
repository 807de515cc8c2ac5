"""SparseWindowPolicy's Algorithm 1 bandwidth: the paper's rule on CUDA, measured cost on a host."""

from types import SimpleNamespace

import pytest

from megatron_moevement import policy as policy_module
from megatron_moevement.policy import SparseWindowPolicy
from megatron_moevement.snapshot.stage_times import StageTimes


def _policy(idle_core: bool, captured_bytes: int, stall_s: float, background_s: float, steps=10):
    times = StageTimes()
    times._seconds.update(after_step=stall_s, copy=background_s)  # as if measured
    times._calls.update(after_step=steps)
    pol = SparseWindowPolicy()
    pol.strategy = SimpleNamespace(
        d2h_bandwidth=2e9,
        snapshot_bytes_total=captured_bytes,
        stage_times=times,
        idle_core_for_snapshots=idle_core,
        config=SimpleNamespace(snapshot_budget_fraction=0.05, iteration_time_s=None),
        iteration_times=[1.0] * 5,
    )
    return pol


@pytest.fixture
def host(monkeypatch):
    monkeypatch.setattr(policy_module.torch.cuda, "is_available", lambda: False)


def test_before_any_capture_the_probed_bandwidth_is_used(host):
    assert _policy(False, 0, 0.0, 0.0)._charged_bandwidth() == 2e9


@pytest.mark.parametrize("idle_core", [False, True])
def test_on_a_host_background_work_is_charged_per_byte(host, idle_core):
    # 1 GB captured at 4 s of background copy: 0.25 GB per second of training, with or without
    # a free core (it shares memory bandwidth with training).
    assert _policy(idle_core, 10**9, 1.0, 4.0)._charged_bandwidth() == pytest.approx(2.5e8)


def test_the_charged_bandwidth_is_never_above_the_probe(host):
    assert _policy(True, 10**9, 0.01, 0.1)._charged_bandwidth() == 2e9


def test_on_a_host_the_stall_per_step_comes_off_the_slot_budget(host):
    # Budget 5% of a 1 s iteration; 10 steps stalled 0.2 s in all: 0.02 s per step.
    assert _policy(False, 10**9, 0.2, 4.0)._slot_budget_s() == pytest.approx(0.03)
    # A stall above the budget leaves a quarter of it for the bytes.
    assert _policy(False, 10**9, 2.0, 4.0)._slot_budget_s() == pytest.approx(
        policy_module.MIN_BYTE_BUDGET_SHARE * 0.05
    )


def test_on_cuda_the_papers_rule_stays(monkeypatch):
    monkeypatch.setattr(policy_module.torch.cuda, "is_available", lambda: True)
    pol = _policy(False, 10**9, 1.0, 4.0)
    assert pol._charged_bandwidth() == 2e9
    assert pol._slot_budget_s() == pytest.approx(0.05)
