"""SparseWindowPolicy's Algorithm 1 bandwidth: the paper's rule on CUDA, measured cost on a host."""

from types import SimpleNamespace

import pytest

from megatron_moevement import policy as policy_module
from megatron_moevement.policy import SparseWindowPolicy
from megatron_moevement.snapshot.stage_times import StageTimes


def _policy(idle_core: bool, captured_bytes: int, stall_s: float, background_s: float):
    times = StageTimes()
    times._seconds.update(after_step=stall_s, copy=background_s)  # as if measured
    pol = SparseWindowPolicy()
    pol.strategy = SimpleNamespace(
        d2h_bandwidth=2e9,
        snapshot_bytes_total=captured_bytes,
        stage_times=times,
        idle_core_for_snapshots=idle_core,
    )
    return pol


@pytest.fixture
def host(monkeypatch):
    monkeypatch.setattr(policy_module.torch.cuda, "is_available", lambda: False)


def test_before_any_capture_the_probed_bandwidth_is_used(host):
    assert _policy(False, 0, 0.0, 0.0)._charged_bandwidth() == 2e9


def test_without_an_idle_core_background_work_is_charged_to_training(host):
    # 1 GB captured at 1 s of stall + 4 s of background copy: 0.2 GB per second of training.
    assert _policy(False, 10**9, 1.0, 4.0)._charged_bandwidth() == pytest.approx(2e8)


def test_with_an_idle_core_only_the_stall_is_charged_and_never_above_the_probe(host):
    assert _policy(True, 10**9, 1.0, 4.0)._charged_bandwidth() == pytest.approx(1e9)
    assert _policy(True, 10**9, 0.01, 4.0)._charged_bandwidth() == 2e9


def test_on_cuda_the_papers_rule_stays(monkeypatch):
    monkeypatch.setattr(policy_module.torch.cuda, "is_available", lambda: True)
    assert _policy(False, 10**9, 1.0, 4.0)._charged_bandwidth() == 2e9
