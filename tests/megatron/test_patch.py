"""Tests for the Megatron-LM patch and scripts/apply_megatron_patch.sh."""

import os
import re
import subprocess
from pathlib import Path

import pytest

from megatron_moevement.megatron import glue

ROOT = Path(__file__).resolve().parents[2]
PATCH = ROOT / "patches" / "megatron-lm-core_v0.16.1-moevement.patch"
APPLY = ROOT / "scripts" / "apply_megatron_patch.sh"
RELEASE_TAG = "core_v0.16.1"
# A bare Megatron-LM git directory holding tag core_v0.16.1 (optional; tests skip without it).
MEGATRON_GIT_DIR = Path(
    os.environ.get("MOEVEMENT_MEGATRON_LM_GIT_DIR", "/work/.mirror/NVIDIA+Megatron-LM/repo")
)
PATCHED_FILES = ["pretrain_gpt.py", "megatron/training/training.py"]


def added_lines():
    return [
        line[1:]
        for line in PATCH.read_text().splitlines()
        if line.startswith("+") and not line.startswith("+++")
    ]


def test_patch_touches_only_the_two_files():
    files = re.findall(r"^diff --git a/(\S+) b/", PATCH.read_text(), re.M)
    assert sorted(files) == sorted(PATCHED_FILES)


def test_patch_calls_only_public_glue_functions():
    calls = {m for line in added_lines() for m in re.findall(r"moevement_glue\.(\w+)", line)}
    assert calls == {
        "extra_args_provider",
        "recover_or_load",
        "maybe_build_strategy",
        "install_p2p_logging",
        "wrap_forward_backward_func",
        "CONTEXT_KEY",
        "after_optimizer_step",
        "strategy_from",
        "shutdown",
        "wrap_pretrain",
        "recover_after_restart",
        "replay_after_restart",
    }
    for name in calls:
        assert name in glue.__all__, name


# Added lines that do not mention MoEvement: continuation lines of a multi-line call.
CONTINUATION_LINES = {
    "args,",
    "load_checkpoint,",
    ")",
    "),",
    "add_modelopt_args if has_nvidia_modelopt else None",
    "moevement_glue.strategy_from(checkpointing_context), iteration,",
    "num_floating_point_operations_so_far,",
    "iteration, forward_step_func, train_data_iterator, model, optimizer, opt_param_scheduler,",
    "forward_backward_func,",
}


def test_patch_hunks_are_small():
    lines = added_lines()
    # Eight call sites (the restart engine and the two recovery phases included), each a call
    # of one glue function: the logic lives in megatron_moevement, where it is tested.
    assert len(lines) <= 45
    for line in lines:
        text = line.strip()
        assert not text or "moevement" in text.lower() or text in CONTINUATION_LINES, line


def test_scripts_are_valid_bash():
    for script in (APPLY, ROOT / "scripts" / "launch_local.sh"):
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert os.access(script, os.X_OK), f"{script} is not executable"


def run_apply(*args):
    return subprocess.run(
        ["bash", str(APPLY), *map(str, args)], capture_output=True, text=True, timeout=60
    )


def fake_checkout(path: Path, minor: int) -> Path:
    (path / "megatron" / "core").mkdir(parents=True)
    (path / "megatron" / "training").mkdir(parents=True)
    (path / "megatron" / "core" / "package_info.py").write_text(
        f"MAJOR = 0\nMINOR = {minor}\nPATCH = 1\nPRE_RELEASE = ''\n"
    )
    (path / "pretrain_gpt.py").write_text("")
    (path / "megatron" / "training" / "training.py").write_text("")
    return path


def test_apply_refuses_other_releases(tmp_path):
    result = run_apply(fake_checkout(tmp_path / "mlm", minor=15))
    assert result.returncode != 0
    assert "0.15.1" in result.stderr and RELEASE_TAG in result.stderr


def test_apply_refuses_non_checkouts(tmp_path):
    result = run_apply(tmp_path)
    assert result.returncode != 0 and "package_info.py" in result.stderr
    result = run_apply()
    assert result.returncode != 0 and "no Megatron-LM directory" in result.stderr


def test_apply_reports_a_patch_that_does_not_apply(tmp_path):
    result = run_apply("--check", fake_checkout(tmp_path / "mlm", minor=16))
    assert result.returncode != 0 and "does not apply" in result.stderr


@pytest.fixture
def release_checkout(tmp_path):
    """The files the patch touches, from Megatron-LM's core_v0.16.1 tag."""
    if not (MEGATRON_GIT_DIR / "packed-refs").exists() and not (MEGATRON_GIT_DIR / "HEAD").exists():
        pytest.skip(f"no Megatron-LM git directory at {MEGATRON_GIT_DIR}")
    dest = tmp_path / "Megatron-LM"
    dest.mkdir()
    paths = [*PATCHED_FILES, "megatron/core/package_info.py"]
    archive = subprocess.run(
        ["git", f"--git-dir={MEGATRON_GIT_DIR}", "archive", RELEASE_TAG, *paths],
        capture_output=True,
        timeout=60,
    )
    if archive.returncode != 0:
        pytest.skip(f"tag {RELEASE_TAG} not in {MEGATRON_GIT_DIR}")
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def test_patch_applies_to_the_release(release_checkout):
    result = run_apply("--check", release_checkout)
    assert result.returncode == 0 and "applies cleanly" in result.stdout, result.stderr
    result = run_apply(release_checkout)
    assert result.returncode == 0, result.stderr
    training = (release_checkout / "megatron/training/training.py").read_text()
    assert "moevement_glue.after_optimizer_step(" in training
    # The wrapper is applied where train() gets its schedule, after the CUDA-graph wrapper.
    get_fbf = training.index("forward_backward_func = get_forward_backward_func()")
    wrap = training.index("moevement_glue.wrap_forward_backward_func(")
    assert get_fbf < wrap < training.index("def get_e2e_base_metrics", get_fbf)
    compile(training, "training.py", "exec")
    compile((release_checkout / "pretrain_gpt.py").read_text(), "pretrain_gpt.py", "exec")
    again = run_apply(release_checkout)
    assert again.returncode == 0 and "already applied" in again.stdout
    result = run_apply("--reverse", release_checkout)
    assert result.returncode == 0, result.stderr
    assert "moevement" not in (release_checkout / "pretrain_gpt.py").read_text()
