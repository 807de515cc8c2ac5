"""The ``moevement-sim`` command line."""

from __future__ import annotations

import json

import pytest

from megatron_moevement.sim.cli import main
from megatron_moevement.sim.report import matplotlib_available

from .conftest import toy_scenario


def test_run_preset_writes_json_png_and_table(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--preset", "gpt-moe", "--mtbf", "1h,10m", "--out", str(out), "-q"]) == 0
    table = capsys.readouterr().out
    for label in ("CheckFreq", "Gemini", "MoC", "MoEvement"):
        assert label in table
    assert "1h" in table and "10m" in table
    data = json.loads((out / "ettr.json").read_text())
    evaluations = data["results"][0]["evaluations"]
    assert {e["strategy"] for e in evaluations} == {"checkfreq", "gemini", "moc", "moevement"}
    assert len(evaluations) == 8
    if matplotlib_available():
        assert (out / "ettr_vs_mtbf.png").stat().st_size > 1000
    else:  # pragma: no cover - depends on the environment
        assert not (out / "ettr_vs_mtbf.png").exists()


def test_run_without_matplotlib_still_writes_json(tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    out = tmp_path / "out"
    assert main(["run", "--preset", "moe-llava", "--mtbf", "30m", "--out", str(out), "-q"]) == 0
    assert (out / "ettr.json").exists() and not (out / "ettr_vs_mtbf.png").exists()
    assert "matplotlib is not installed" in capsys.readouterr().out


def test_run_spec_file_with_monte_carlo_and_overrides(tmp_path, capsys):
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps(toy_scenario().to_dict()))
    out = tmp_path / "o"
    argv = ["run", "--spec", str(spec), "--mtbf", "20m", "--out", str(out), "--no-plot"]
    argv += ["--monte-carlo", "--trials", "5", "--set", "restart_s=1", "--seed", "2", "-q"]
    assert main(argv) == 0
    data = json.loads((out / "ettr.json").read_text())["results"][0]
    assert data["config"]["restart_s"] == 1 and data["config"]["mc_trials"] == 5
    assert all(e["ettr_mc"] is not None for e in data["evaluations"])
    assert "ETTR(MC)" in capsys.readouterr().out


def test_paper_table3_subcommand(tmp_path, capsys):
    out = tmp_path / "t3.json"
    assert main(["paper-table3", "--out", str(out), "--no-model", "-q"]) == 0
    text = capsys.readouterr().out
    assert "Table 3" in text and "max |dev|" in text
    data = json.loads(out.read_text())
    assert len(data["rows"]) == 80 and data["summary"]["fed"]["overall"]["count"] == 80


def test_trace_presets_and_schema_subcommands(tmp_path, capsys):
    trace = tmp_path / "trace.txt"
    trace.write_text("10m\n1h\n7200\n")
    out = tmp_path / "trace.json"
    argv = ["trace", "--preset", "qwen-moe", "--failures-file", str(trace), "--horizon", "3h"]
    assert main(argv + ["--out", str(out), "-q"]) == 0
    assert json.loads(out.read_text())["failures_s"] == [600.0, 3600.0, 7200.0]
    assert main(["presets", "-q"]) == 0
    assert main(["profile-schema", "-q"]) == 0
    printed = capsys.readouterr().out
    assert "deepseek-moe-671b" in printed and '"forward_s"' in printed


@pytest.mark.parametrize(
    "argv",
    [
        ["--preset", "no-such-model"],
        ["run"],
        ["run", "--preset", "gpt-moe", "--strategies", "magic"],
        ["run", "--preset", "gpt-moe", "--set", "nonsense=1"],
        ["run", "--preset", "gpt-moe", "--mtbf", "soon"],
    ],
)
def test_bad_input_exits_with_status_2(argv, tmp_path, capsys):
    assert main(argv + ["--out", str(tmp_path), "-q"]) == 2
    assert "error" in capsys.readouterr().err
