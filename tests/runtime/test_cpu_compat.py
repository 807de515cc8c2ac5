"""The CPU redirections run in a fresh interpreter: they are process-global by design."""

import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only redirections")

SCRIPT = r"""
import torch
from megatron_moevement.runtime import apply_cpu_compat, cpu_compat_needed
assert cpu_compat_needed()
assert apply_cpu_compat() and apply_cpu_compat()  # idempotent
x = torch.zeros(3, device="cuda")
assert x.device.type == "cpu"
y = torch.ones(2, device=torch.cuda.current_device()).cuda()
assert y.device.type == "cpu"
with torch.cuda.stream(torch.cuda.Stream()):
    torch.cuda.current_stream().wait_stream(torch.cuda.Stream())
torch.cuda.synchronize()
from megatron.core.tensor_parallel import random as mrandom
mrandom.initialize_rng_tracker(force_reset=True)
tracker = mrandom.get_cuda_rng_tracker()
tracker.add("a", 11)
before = torch.get_rng_state()
with tracker.fork("a"):
    first = torch.rand(4)
with tracker.fork("a"):
    second = torch.rand(4)
assert torch.equal(before, torch.get_rng_state())  # forking leaves the default stream alone
torch.manual_seed(11)
assert torch.equal(first, torch.rand(4)) and not torch.equal(first, second)
print("OK")
"""


def test_redirections_in_fresh_process():
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("OK")
