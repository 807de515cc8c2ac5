"""Tests for the SLURM sbatch templates and their renderer."""

import argparse
import re
import shlex
import subprocess

import pytest

from megatron_moevement.megatron import slurm
from megatron_moevement.megatron.args import add_moevement_args, moevement_config_from_args
from megatron_moevement.megatron.slurm import SbatchTemplateError, render_sbatch

TEMPLATES = slurm.available_templates()

VALUES = dict(
    nodes=4,
    spare_nodes=2,
    gpus_per_node=8,
    megatron_dir="/opt/Megatron-LM",
    data_path="0.3 /data/a_text_document 0.7 /data/b_text_document",
    log_dir="/shared/logs/moe",
    host_memory_budget="256GiB",
    replication_factor=2,
    window_size=4,
    partition="gpu",
    extra_args="--num-layers 24 --num-experts 64 --save /ckpt --lr '3e-4' --moevement-ordering ema",
)


def test_templates_are_bundled():
    assert [p.name for p in TEMPLATES] == ["moevement_pretrain.sbatch.template"]


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_render_fills_every_placeholder_and_is_valid_bash(template, tmp_path):
    rendered = render_sbatch(template, **VALUES)
    assert "{{" not in rendered and "}}" not in rendered
    assert slurm.template_placeholders(template) <= set(slurm.SbatchValues(**VALUES).placeholders())
    out = tmp_path / "job.sbatch"
    out.write_text(rendered)
    check = subprocess.run(["bash", "-n", str(out)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    assert "#SBATCH --nodes=6\n" in rendered  # training + spare nodes
    assert "#SBATCH --ntasks-per-node=8\n" in rendered
    assert "#SBATCH --partition=gpu\n" in rendered
    assert "MOEVEMENT_SPARES" in rendered and "MASTER_ADDR" in rendered
    assert "rank${SLURM_PROCID}.log" in rendered
    assert "--data-path 0.3 /data/a_text_document" in rendered


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_rendered_moevement_flags_parse(template):
    """The MOEVEMENT_ARGS array of the rendered script is accepted by the args provider."""
    rendered = render_sbatch(template, **VALUES)
    block = re.search(r"MOEVEMENT_ARGS=\((.*?)\n\)", rendered, re.S).group(1)
    argv = shlex.split(block.replace('"$MOEVEMENT_SPARES"', "n5,n6"))
    args = add_moevement_args(argparse.ArgumentParser()).parse_args(argv)
    cfg = moevement_config_from_args(args)
    assert cfg.window_size == 4 and cfg.replication_factor == 2 and cfg.ranks_per_node == 8
    assert cfg.host_memory_budget_bytes == 256 * 2**30
    assert args.moevement_spares == "n5,n6"


def test_mock_data_and_defaults():
    values = dict(VALUES, data_path="mock", spare_nodes=0, replication_factor=1)
    del values["partition"], values["window_size"], values["host_memory_budget"]
    rendered = render_sbatch(TEMPLATES[0], **values)
    assert "DATA_ARGS=(--mock-data)" in rendered
    assert "--moevement-window-size auto" in rendered
    assert "--moevement-host-memory-budget-bytes none" in rendered
    assert "#SBATCH --partition" not in rendered


def test_missing_values_are_named():
    with pytest.raises(SbatchTemplateError, match=r"megatron_dir.*--megatron-dir"):
        render_sbatch(TEMPLATES[0], nodes=1, gpus_per_node=8, data_path="mock", log_dir="/l")


def test_unknown_values_are_named():
    with pytest.raises(SbatchTemplateError, match="nodez"):
        render_sbatch(TEMPLATES[0], nodez=3, **VALUES)


def test_unknown_placeholder_in_template(tmp_path):
    bad = tmp_path / "bad.sbatch.template"
    bad.write_text("#!/bin/bash\n#SBATCH --nodes={{nodes}}\necho {{ num_gpus }}\n")
    with pytest.raises(SbatchTemplateError, match=r"\{\{num_gpus\}\}"):
        render_sbatch(bad, **VALUES)


def test_malformed_placeholder_in_template(tmp_path):
    bad = tmp_path / "bad.sbatch.template"
    bad.write_text("#!/bin/bash\necho {{nodes}}\necho {{9lives}}\n")
    with pytest.raises(SbatchTemplateError, match="line 3"):
        render_sbatch(bad, **VALUES)


def test_missing_template():
    with pytest.raises(SbatchTemplateError, match="does not exist"):
        render_sbatch("/nonexistent.sbatch.template", **VALUES)


@pytest.mark.parametrize(
    "override, match",
    [
        (dict(megatron_dir="/opt/Megatron LM"), "megatron_dir"),
        (dict(log_dir="/logs/$USER"), "log_dir"),
        (dict(data_path="/data/a;rm"), "data_path"),
        (dict(nodes=0), "nodes"),
        (dict(spare_nodes=-1), "spare_nodes"),
        (dict(ranks_per_node=4), "ranks_per_node"),
        (dict(replication_factor=32), "replication_factor"),
        (dict(window_size=0), "window_size"),
        (dict(window_size="fixed"), "window_size"),
        (dict(host_memory_budget="lots"), "host_memory_budget"),
        (dict(master_port=80), "master_port"),
        (dict(job_name="my job"), "job_name"),
        (dict(time_limit="soon"), "time_limit"),
        (dict(extra_args="--lr '3e-4"), "extra_args"),
    ],
)
def test_invalid_values(override, match):
    with pytest.raises(SbatchTemplateError, match=match):
        render_sbatch(TEMPLATES[0], **dict(VALUES, **override))


def test_cli_render_and_placeholders(tmp_path, capsys):
    out = tmp_path / "job.sbatch"
    argv = ["render", str(TEMPLATES[0]), "-o", str(out), "--nodes", "2", "--gpus-per-node", "4"]
    argv += ["--megatron-dir", "/m", "--data-path", "mock", "--log-dir", "/l"]
    argv += ["--spare-nodes", "1", "--host-memory-budget", "8GiB", "--extra-args=--num-layers 2"]
    assert slurm.main(argv) == 0
    text = out.read_text()
    assert "#SBATCH --nodes=3" in text and "EXTRA_ARGS=(--num-layers 2)" in text
    assert slurm.main(["placeholders", str(TEMPLATES[0])]) == 0
    listed = capsys.readouterr().out.split("\n")
    assert "nodes" in listed and "total_nodes  (derived)" in listed


def test_cli_reports_missing_values(capsys):
    with pytest.raises(SystemExit):
        slurm.main(["render", str(TEMPLATES[0]), "--nodes", "2", "--gpus-per-node", "4"])
    assert "--megatron-dir" in capsys.readouterr().err


def test_rendered_script_runs_with_fake_slurm(tmp_path):
    """Runs the rendered script with stand-ins for scontrol, srun and python: checks the node
    split, the rendezvous environment, the per-rank log path and the training command."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/bash\nprintf 'n1\\nn2\\nn3\\n'\n")
    # srun stand-in: record its options, then run the task command as rank 5 / local rank 1.
    (bin_dir / "srun").write_text(
        "#!/bin/bash\n"
        'while [[ "$1" == --* ]]; do echo "$1" >> "$OUT/srun_opts"; shift; done\n'
        'SLURM_PROCID=5 SLURM_LOCALID=1 "$@"\n'
    )
    fake_python = bin_dir / "fake_python"
    fake_python.write_text(
        "#!/bin/bash\n"
        'echo "RANK=$RANK LOCAL_RANK=$LOCAL_RANK WORLD_SIZE=$WORLD_SIZE '
        'MASTER=$MASTER_ADDR:$MASTER_PORT SPARES=$MOEVEMENT_SPARES" > "$OUT/env"\n'
        'printf "%s\\n" "$@" > "$OUT/argv"\n'
    )
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    log_dir = tmp_path / "logs"
    values = dict(VALUES, nodes=2, spare_nodes=1, gpus_per_node=4, replication_factor=1)
    values.update(log_dir=str(log_dir), python=str(fake_python), master_port=29555)
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch(TEMPLATES[0], **values))
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "OUT": str(tmp_path),
        "SLURM_JOB_ID": "77",
        "SLURM_JOB_NODELIST": "n[1-3]",
    }
    result = subprocess.run(
        ["bash", str(script)], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "env").read_text().split() == [
        "RANK=5",
        "LOCAL_RANK=1",
        "WORLD_SIZE=8",
        "MASTER=n1:29555",
        "SPARES=n3",
    ]
    opts = (tmp_path / "srun_opts").read_text().split()
    assert "--nodelist=n1,n2" in opts and "--ntasks=8" in opts and "--kill-on-bad-exit=0" in opts
    argv = (tmp_path / "argv").read_text().split("\n")
    assert argv[0] == "/opt/Megatron-LM/pretrain_gpt.py"
    assert argv[argv.index("--moevement-spares") + 1] == "n3"
    assert argv[argv.index("--ckpt-strategy") + 1] == "moevement"
    assert (log_dir / "77" / "rank5.log").exists()
    # A wrong node count in the allocation is caught before anything starts.
    env["SLURM_JOB_NODELIST"] = "n[1-2]"
    (bin_dir / "scontrol").write_text("#!/bin/bash\nprintf 'n1\\nn2\\n'\n")
    result = subprocess.run(
        ["bash", str(script)], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode != 0 and "expected 3" in result.stderr
