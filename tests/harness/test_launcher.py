import os
import signal
import time

import pytest

from megatron_moevement.launch.local import LocalJob
from megatron_moevement.recovery.coordinator import JobFailed, JobTimeout

SLEEP_ARGS = ["-n", "1", "-r", "1", "import time; time.sleep(60)"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); read its state.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_timeout_kills_every_process_by_pid():
    job = LocalJob(3, "timeit", SLEEP_ARGS)
    with job:
        pids = job.pids
        with pytest.raises(JobTimeout):
            job.wait(timeout=1.0)
    assert not any(_alive(p) for p in pids)


def test_leaving_the_context_on_error_cleans_up():
    with pytest.raises(RuntimeError):
        with LocalJob(2, "timeit", SLEEP_ARGS) as job:
            pids = job.pids
            raise RuntimeError("test failure inside the job")
    assert not any(_alive(p) for p in pids)


def test_sigkill_one_process_is_reported_unless_allowed(tmp_path):
    with LocalJob(2, "timeit", ["-n", "1", "-r", "1", "pass"], log_dir=tmp_path) as job:
        time.sleep(0.2)
        job.kill(1, signal.SIGKILL)
        codes = job.wait(timeout=30)
    assert codes[0] == 0
    assert codes[1] in (0, -signal.SIGKILL)  # it may have finished before the kill landed


def test_failures_raise_with_logs(tmp_path):
    with LocalJob(
        1, "timeit", ["-n", "1", "-r", "1", "raise SystemExit(3)"], log_dir=tmp_path
    ) as job:
        with pytest.raises(JobFailed, match="codes"):
            job.check(timeout=30)


def test_spares_get_no_rank(tmp_path):
    code = "import os; assert ('RANK' in os.environ) != ('MOEVEMENT_SPARE' in os.environ)"
    with LocalJob(3, "timeit", ["-n", "1", "-r", "1", code], spares=1, log_dir=tmp_path) as job:
        assert job.check(timeout=30) == [0, 0, 0]
