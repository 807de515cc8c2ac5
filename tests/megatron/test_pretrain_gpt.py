"""Megatron-LM's own ``pretrain_gpt.py``, patched, trained on CPU with gloo in 4 processes.

The tree comes from ``MEGATRON_LM_DIR`` (default ``../shared/megatron-lm`` beside the checkout);
it is copied to a temporary folder and patched there with ``scripts/apply_megatron_patch.sh``.
Without a tree the tests skip, saying so.

``--ckpt-strategy moevement`` must not change training: the loss lines and the final model,
optimizer, RNG and scheduler state (Megatron's own ``--save``, torch format) are bitwise equal to
``--ckpt-strategy default``'s.
"""

import pytest
import torch

from megatron_moevement.harness.megatron_lm import (
    assert_bitwise_equal,
    final_state,
    loss_lines,
    model_args,
    run_pretrain,
)

pytestmark = pytest.mark.multiproc

ITERATIONS = 6
ARGS = [*model_args(ITERATIONS), "--hidden-dropout", "0", "--attention-dropout", "0"]


def test_moevement_does_not_change_megatron_lm_training(megatron_lm, tmp_path):
    default, moevement = tmp_path / "default", tmp_path / "moevement"
    run_pretrain(megatron_lm, default, "default", ARGS)
    run_pretrain(megatron_lm, moevement, "moevement", ARGS)
    losses = loss_lines(default)
    assert sorted(losses) == list(range(1, ITERATIONS + 1))
    assert loss_lines(moevement) == losses
    # MoEvement really ran: it built its strategy and changed schedules on these ranks.
    logs = "".join(p.read_text(errors="replace") for p in (moevement / "logs").glob("*.log"))
    assert "MoEvement" in logs
    a, b = final_state(default, ITERATIONS), final_state(moevement, ITERATIONS)
    n_tensors = sum(torch.is_tensor(v) for v in a.values())
    assert n_tensors > 100
    assert any("distrib_optim" in k for k in a) and any("/rng_state/" in k for k in a)
    assert assert_bitwise_equal(a, b) == len(a)
