"""Tests for the local launcher (no processes are started here)."""

import argparse
import json
import sys

import pytest

from megatron_moevement.baselines import BaselineConfig
from megatron_moevement.megatron import launch_local
from megatron_moevement.megatron.args import (
    add_moevement_args,
    baseline_config_from_args,
    moevement_config_from_args,
)


def test_moevement_flags_parse_with_the_args_provider():
    flags = launch_local.moevement_flags(4, "3", 2, "8GiB")
    cfg = moevement_config_from_args(
        add_moevement_args(argparse.ArgumentParser()).parse_args(flags)
    )
    assert cfg.window_size == 3 and cfg.replication_factor == 2 and cfg.ranks_per_node == 4
    assert cfg.host_memory_budget_bytes == 8 * 2**30


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(window_size="often"), "--window-size"),
        (dict(window_size="0"), "window-size"),
        (dict(host_memory_budget="lots"), "--host-memory-budget"),
        (dict(replication_factor=4), "--replication-factor"),
        (dict(replication_factor=-1), "replication-factor"),
    ],
)
def test_moevement_flags_reject_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        launch_local.moevement_flags(4, **kwargs)


@pytest.mark.parametrize("strategy", ["gemini", "moc"])
def test_baseline_flags_parse_with_the_args_provider(strategy):
    flags = launch_local.moevement_flags(4, None, 2, "8GiB", ckpt_strategy=strategy)
    assert flags[:2] == ["--ckpt-strategy", strategy]
    assert "--moevement-window-size" not in flags  # a baseline runs with a one-slot window
    args = add_moevement_args(argparse.ArgumentParser()).parse_args(flags)
    cfg = moevement_config_from_args(args)
    assert cfg.replication_factor == 2 and cfg.ranks_per_node == 4
    assert cfg.host_memory_budget_bytes == 8 * 2**30
    assert baseline_config_from_args(args) == BaselineConfig(strategy=strategy)


def test_moevement_is_the_default_strategy():
    flags = launch_local.moevement_flags(2)
    assert flags[:4] == ["--ckpt-strategy", "moevement", "--moevement-window-size", "auto"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(ckpt_strategy="gemini", window_size="3"), "--window-size"),
        (dict(ckpt_strategy="moc", window_size="auto"), "--window-size"),
        (dict(ckpt_strategy="default"), "--ckpt-strategy"),
        (dict(ckpt_strategy="checkfreq"), "--ckpt-strategy"),
        (dict(ckpt_strategy="moc", replication_factor=4), "--replication-factor"),
    ],
)
def test_baseline_flags_reject_bad_combinations(kwargs, match):
    with pytest.raises(ValueError, match=match):
        launch_local.moevement_flags(4, **kwargs)


def test_build_job_with_a_baseline(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("")
    job = launch_local.build_job(
        str(script), ["--baseline-interval", "8"], nprocs=2, ckpt_strategy="gemini"
    )
    tail = job.args[2:]
    assert tail[:2] == ["--baseline-interval", "8"]
    assert tail[tail.index("--ckpt-strategy") + 1] == "gemini"
    args = add_moevement_args(argparse.ArgumentParser()).parse_args(tail)
    assert baseline_config_from_args(args) == BaselineConfig(strategy="gemini", interval=8)


def test_launcher_command_line_takes_the_strategy():
    args = launch_local._parser().parse_args(["--nprocs", "2", "--ckpt-strategy", "moc", "t.py"])
    assert args.ckpt_strategy == "moc" and args.window_size is None
    assert launch_local._parser().parse_args(["--nprocs", "2", "t.py"]).ckpt_strategy == "moevement"
    with pytest.raises(SystemExit):
        launch_local._parser().parse_args(["--nprocs", "2", "--ckpt-strategy", "default", "t.py"])


def test_build_job(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("")
    job = launch_local.build_job(str(script), ["--num-layers", "2"], nprocs=4, spares=1)
    assert job.nprocs == 5 and job.spares == 1 and not job.procs
    assert job.module == "megatron_moevement.megatron.launch_local"
    assert job.args[:4] == [launch_local.RANK_COMMAND, str(script), "--num-layers", "2"]
    assert job.args[job.args.index("--ckpt-strategy") + 1] == "moevement"
    assert job.env["LOCAL_WORLD_SIZE"] == "4"
    plain = launch_local.build_job(str(script), ["--x"], nprocs=2, moevement=False)
    assert plain.args == [launch_local.RANK_COMMAND, str(script), "--x"]


def test_build_job_errors(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("")
    with pytest.raises(ValueError, match="does not exist"):
        launch_local.build_job(str(tmp_path / "missing.py"), [], nprocs=2)
    with pytest.raises(ValueError, match="--nprocs"):
        launch_local.build_job(str(script), [], nprocs=0)
    with pytest.raises(ValueError, match="--spares"):
        launch_local.build_job(str(script), [], nprocs=2, spares=-1)
    with pytest.raises(ValueError, match="--ckpt-strategy"):
        launch_local.build_job(str(script), ["--ckpt-strategy", "default"], nprocs=2)


@pytest.fixture
def script(tmp_path):
    out = tmp_path / "seen.json"
    path = tmp_path / "train.py"
    path.write_text(
        "import json, os, sys\n"
        f"json.dump(dict(argv=sys.argv, local_rank=os.environ.get('LOCAL_RANK'), "
        f"path0=sys.path[0]), open({str(out)!r}, 'w'))\n"
        "if '--fail' in sys.argv:\n"
        "    sys.exit(3)\n"
    )
    return path, out


def test_run_rank_runs_the_script_as_main(script, monkeypatch):
    path, out = script
    monkeypatch.setenv("RANK", "2")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("MOEVEMENT_SPARE", raising=False)
    argv, syspath = list(sys.argv), list(sys.path)
    assert launch_local.run_rank(str(path), ["--a", "1"]) == 0
    seen = json.loads(out.read_text())
    assert seen["argv"] == [str(path), "--a", "1"]
    assert seen["local_rank"] == "2" and seen["path0"] == str(path.parent)
    assert sys.argv == argv and sys.path == syspath
    assert launch_local.run_rank(str(path), ["--fail"]) == 3


def test_spare_without_elastic_agent_does_not_run_the_script(script, monkeypatch, caplog):
    path, out = script
    monkeypatch.setenv("MOEVEMENT_SPARE", "1")
    monkeypatch.delenv("MOEVEMENT_ELASTIC", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert launch_local.run_rank(str(path), []) == 0
    assert not out.exists()
    assert "no elastic agent" in caplog.text


def test_rank_without_rank_env(script, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("MOEVEMENT_SPARE", raising=False)
    with pytest.raises(RuntimeError, match="RANK"):
        launch_local.run_rank(str(script[0]), [])
