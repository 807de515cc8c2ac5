"""Tests for the SLURM sbatch templates and their renderer."""

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_moevement.megatron import slurm
from megatron_moevement.megatron.args import (
    add_moevement_args,
    baseline_config_from_args,
    moevement_config_from_args,
)
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


@pytest.mark.parametrize("strategy", ["gemini", "moc"])
def test_baseline_strategies_render_and_parse(strategy):
    """ckpt_strategy gemini / moc: --ckpt-strategy <name>, no --moevement-window-size (a baseline
    runs with a one-slot window); the policy options come with extra_args."""
    values = dict(VALUES, ckpt_strategy=strategy)
    del values["window_size"]
    option = "--baseline-interval 8" if strategy == "gemini" else "--baseline-expert-fraction 0.5"
    values["extra_args"] = f"--num-layers 24 {option}"
    rendered = render_sbatch(TEMPLATES[0], **values)
    assert "--moevement-window-size" not in rendered
    block = re.search(r"MOEVEMENT_ARGS=\((.*?)\n\)", rendered, re.S).group(1)
    extra = re.search(r"EXTRA_ARGS=\((.*?)\)", rendered).group(1)
    argv = shlex.split(block.replace('"$MOEVEMENT_SPARES"', "n5")) + shlex.split(extra)[2:]
    args = add_moevement_args(argparse.ArgumentParser()).parse_args(argv)
    assert args.ckpt_strategy == strategy
    cfg = moevement_config_from_args(args)
    assert cfg.replication_factor == 2 and cfg.ranks_per_node == 8
    policy = baseline_config_from_args(args)
    assert policy.strategy == strategy
    assert (policy.interval == 8) if strategy == "gemini" else (policy.expert_fraction == 0.5)


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
        (dict(ckpt_strategy="gemini"), "window_size"),  # VALUES sets window_size=4
        (dict(ckpt_strategy="default"), "ckpt_strategy"),
        (dict(ckpt_strategy="checkfreq"), "ckpt_strategy"),
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
    split, the rendezvous environment, the per-task log path and the task agent's command line
    around the training command."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/bash\nprintf 'n1\\nn2\\nn3\\n'\n")
    # srun stand-in: record its options, then run the task command as task 5 / local id 1.
    (bin_dir / "srun").write_text(
        "#!/bin/bash\n"
        'while [[ "$1" == --* ]]; do echo "$1" >> "$OUT/srun_opts"; shift; done\n'
        'SLURM_PROCID=5 SLURM_LOCALID=1 "$@"\n'
    )
    fake_python = bin_dir / "fake_python"
    fake_python.write_text(
        "#!/bin/bash\n"
        'echo "WORLD_SIZE=$WORLD_SIZE LOCAL_WORLD_SIZE=$LOCAL_WORLD_SIZE '
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
        "WORLD_SIZE=8",
        "LOCAL_WORLD_SIZE=4",
        "MASTER=n1:29555",
        "SPARES=n3",
    ]
    opts = (tmp_path / "srun_opts").read_text().split()
    # Every node runs tasks: 2 training nodes + 1 spare node, 4 tasks each, ranks first.
    assert "--nodelist=n[1-3]" in opts and "--ntasks=12" in opts and "--nodes=3" in opts
    assert "--distribution=block" in opts and "--kill-on-bad-exit=0" in opts
    argv = (tmp_path / "argv").read_text().split("\n")
    assert argv[:3] == ["-m", "megatron_moevement.megatron.elastic", "--elastic"]
    worker = argv[argv.index("--") + 1 :]
    # Through the rank entry point, which joins the elastic session (in-memory recovery).
    assert worker[:5] == [
        str(fake_python),
        "-m",
        "megatron_moevement.megatron.launch_local",
        "_rank",
        "/opt/Megatron-LM/pretrain_gpt.py",
    ]
    assert worker[worker.index("--moevement-spares") + 1] == "n3"
    assert worker[worker.index("--ckpt-strategy") + 1] == "moevement"
    # Task 5 of 12 with WORLD_SIZE 8 is a rank (tasks 8..11 are the spare node's).
    assert (log_dir / "77" / "rank5.log").exists()
    # A wrong node count in the allocation is caught before anything starts.
    env["SLURM_JOB_NODELIST"] = "n[1-2]"
    (bin_dir / "scontrol").write_text("#!/bin/bash\nprintf 'n1\\nn2\\n'\n")
    result = subprocess.run(
        ["bash", str(script)], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode != 0 and "expected 3" in result.stderr


def test_spare_tasks_get_the_spare_role(monkeypatch):
    """The task agent's worker environment: tasks below WORLD_SIZE are ranks, the rest spares."""
    from megatron_moevement.megatron.elastic import TaskAgent, log_name

    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("RANK", "99")
    rank = TaskAgent(["w"], task=3, ntasks=6, world_size=4).child_env()
    assert rank["RANK"] == "3" and "MOEVEMENT_SPARE" not in rank and rank["LOCAL_RANK"] == "1"
    assert rank["TORCHELASTIC_USE_AGENT_STORE"] == "True" and rank["MOEVEMENT_ELASTIC"] == "1"
    spare = TaskAgent(["w"], task=5, ntasks=6, world_size=4).child_env()
    assert spare["MOEVEMENT_SPARE"] == "1" and "RANK" not in spare
    assert spare["LOCAL_PROC_ID"] == "5" and spare["WORLD_SIZE"] == "4"
    assert "MOEVEMENT_ELASTIC" not in TaskAgent(["w"], 0, 4, 4, elastic=False).child_env()
    assert [log_name(t, 4) for t in (0, 3, 4, 5)] == [
        "rank0.log",
        "rank3.log",
        "spare0.log",
        "spare1.log",
    ]
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        TaskAgent(["w"], task=0, ntasks=2, world_size=4)
    with pytest.raises(ValueError, match="worker command"):
        TaskAgent([], task=0, ntasks=4, world_size=4)


def test_program_values():
    rendered = render_sbatch(
        TEMPLATES[0], **dict(VALUES, program="module:my_pkg.train", job_timeout_s=600)
    )
    assert 'WORKER=("$PYTHON" -m my_pkg.train "${EXTRA_ARGS[@]}")' in rendered
    assert "elastic --elastic --timeout 600 --log-dir" in rendered
    for bad in ("module:", "module:my-pkg", "torchrun", "module:a..b"):
        with pytest.raises(SbatchTemplateError, match="program"):
            render_sbatch(TEMPLATES[0], **dict(VALUES, program=bad))
    with pytest.raises(SbatchTemplateError, match="job_timeout_s"):
        render_sbatch(TEMPLATES[0], **dict(VALUES, job_timeout_s=0))


# ----------------------------------------------------------------------------- spares (e2e)

FAKE_SRUN = """#!/bin/bash
# srun stand-in: record the options, then start every task of the step on this machine with the
# SLURM variables of a block distribution (the node names resolve to 127.0.0.1 here).
while [[ "$1" == --* ]]; do echo "$1" >> "$OUT/srun_opts"; opts+=("$1"); shift; done
for o in "${opts[@]}"; do
    case "$o" in --ntasks=*) ntasks=${o#*=} ;; --ntasks-per-node=*) per_node=${o#*=} ;; esac
done
pids=()
for ((i = 0; i < ntasks; i++)); do
    SLURM_PROCID=$i SLURM_LOCALID=$((i % per_node)) SLURM_NODEID=$((i / per_node)) \\
        SLURM_NTASKS=$ntasks MASTER_ADDR=127.0.0.1 "$@" &
    pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
exit $status
"""


def _fake_slurm(tmp_path, hosts):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/bash\nprintf '%s\\n' " + " ".join(hosts) + "\n")
    (bin_dir / "srun").write_text(FAKE_SRUN)
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return bin_dir


def _run_script(script, env, timeout):
    """Runs a rendered script in its own session; kills the whole session (every task agent and
    worker, none of which starts a session of its own) when done or on timeout."""
    proc = subprocess.Popen(
        ["bash", str(script)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)


def _env(tmp_path, bin_dir, job_id):
    return {
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin",
        "OUT": str(tmp_path),
        "SLURM_JOB_ID": job_id,
        "SLURM_JOB_NODELIST": "n[1-3]",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "HOME": os.environ.get("HOME", str(tmp_path)),
    }


def _run_resilient_job(tmp_path, faults, job_id, job_timeout_s):
    """Renders the template for 2 training nodes + 1 spare node (2 "GPUs" each), runs the
    harness's resilient job with ``faults`` under a fake srun and checks it exits 0. Returns the
    job's output folder and its log folder."""
    from megatron_moevement.harness.worker import WorkerSpec
    from megatron_moevement.launch.local import free_port
    from tests.conftest import RESILIENT_ITERATIONS, RESILIENT_LAYOUT, RESILIENT_MODEL

    out = tmp_path / "out"
    out.mkdir()
    spec = WorkerSpec(
        job="resilient",
        layout=RESILIENT_LAYOUT,
        model=RESILIENT_MODEL,
        iterations=RESILIENT_ITERATIONS,
        output_dir=str(out),
        timeout_s=60,
        moevement=dict(window_size=3, replication_factor=1, faults=faults),
    )
    spec_path = spec.save(tmp_path / "spec.json")
    bin_dir = _fake_slurm(tmp_path, ["n1", "n2", "n3"])
    log_dir = tmp_path / "logs"
    values = dict(
        VALUES,
        nodes=2,
        spare_nodes=1,
        gpus_per_node=2,
        replication_factor=1,
        log_dir=str(log_dir),
        python=sys.executable,
        master_port=free_port(),
        program="module:megatron_moevement.harness.worker",
        extra_args=str(spec_path),
        job_timeout_s=job_timeout_s,
    )
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch(TEMPLATES[0], **values))
    code, output = _run_script(script, _env(tmp_path, bin_dir, job_id), timeout=job_timeout_s + 60)
    logs = log_dir / job_id
    assert code == 0, output + "".join(
        f"\n--- {p.name} ---\n" + "\n".join(p.read_text().splitlines()[-20:])
        for p in sorted(logs.glob("*.log"))
    )
    return out, logs


@pytest.mark.multiproc
@pytest.mark.timeout(400)
def test_spare_node_takes_over_a_killed_rank(tmp_path, fault_free_pp2xdp2xep2):
    """The rendered template on 2 training nodes + 1 spare node (2 "GPUs" each) under a fake srun:
    rank 1 is SIGKILLed mid-iteration; spare task 4 (on the spare node) takes its place through
    the same store protocol as a local spare, the job finishes with status 0, and every rank's
    state is bitwise equal to a fault-free run."""
    from tests.conftest import assert_states_bitwise_equal, load_states

    faults = [dict(rank=1, iteration=6, phase="microbatch2")]
    out, logs = _run_resilient_job(tmp_path, faults, "91", job_timeout_s=300)
    opts = (tmp_path / "srun_opts").read_text().split()
    assert "--ntasks=6" in opts and "--nodelist=n[1-3]" in opts and "--distribution=block" in opts
    assert sorted(p.name for p in logs.glob("*.log")) == [
        "rank0.log",
        "rank1.log",
        "rank2.log",
        "rank3.log",
        "spare0.log",
        "spare1.log",
    ]
    assert "takes rank 1 in generation 1" in (logs / "spare0.log").read_text()
    assert "ended without needing it" in (logs / "spare1.log").read_text()
    assert_states_bitwise_equal(load_states(out, 4), fault_free_pp2xdp2xep2)
    reports = [json.loads((out / f"recovery_rank{r}.json").read_text()) for r in range(4)]
    assert reports[1]["joined_as_spare"]
    assert all(rep["reports"][-1]["failed_ranks"] == [1] for rep in reports)
    assert all(rep["reports"][-1]["scope"] == "scoped" for rep in reports)


@pytest.mark.multiproc
@pytest.mark.timeout(500)
def test_spare_pool_is_refilled_on_the_failed_tasks_node(tmp_path, fault_free_pp2xdp2xep2):
    """Two spare tasks, three failures: after each failure the failed task's agent (its node is
    healthy) starts a new spare worker, and the third failure is taken by such a worker (process
    id task + SLURM_NTASKS); the job finishes bitwise equal to a fault-free run."""
    from tests.conftest import assert_states_bitwise_equal, load_states

    faults = [
        dict(rank=1, iteration=3, phase="microbatch1"),
        dict(rank=2, iteration=5, phase="microbatch0", generation=1),
        dict(rank=3, iteration=8, phase="microbatch1", generation=2),
    ]
    out, logs = _run_resilient_job(tmp_path, faults, "93", job_timeout_s=400)
    coordinator = (logs / "rank0.log").read_text()
    assert "ranks [3] failed; generation 3 with spares [7]" in coordinator, coordinator[-3000:]
    assert "refilling the pool" in (logs / "rank1.log").read_text()
    assert_states_bitwise_equal(load_states(out, 4), fault_free_pp2xdp2xep2)


def test_pretrain_gpt_with_a_baseline_reserves_spares_and_a_failure_ends_the_job(tmp_path):
    """With a baseline strategy Megatron-LM's pretrain_gpt.py cannot take over a rank mid-job:
    spare tasks start with the spare role but no worker, and the first failed rank ends the job
    at once: the coordinator kills the other workers by pid and srun's status is non-zero."""
    from megatron_moevement.launch.local import free_port

    megatron_dir = tmp_path / "Megatron-LM"
    megatron_dir.mkdir()
    # Rank 2 fails as soon as the other ranks have started (each leaves a marker after its
    # first line, so the coordinator cannot kill one before it printed); they would train
    # "forever".
    markers = tmp_path / "started"
    markers.mkdir()
    (megatron_dir / "pretrain_gpt.py").write_text(
        "import os, pathlib, sys, time\n"
        "rank = os.environ.get('RANK')\n"
        "print('STUB', rank, os.environ.get('MOEVEMENT_SPARE'), flush=True)\n"
        f"markers = pathlib.Path({str(markers)!r})\n"
        "(markers / str(rank)).touch()\n"
        "if rank != '2':\n"
        "    time.sleep(300)\n"
        "deadline = time.monotonic() + 30\n"
        "while len(list(markers.iterdir())) < 4 and time.monotonic() < deadline:\n"
        "    time.sleep(0.05)\n"
        "sys.exit(3)\n"
    )
    bin_dir = _fake_slurm(tmp_path, ["n1", "n2", "n3"])
    log_dir = tmp_path / "logs"
    values = dict(
        VALUES,
        nodes=2,
        spare_nodes=1,
        gpus_per_node=2,
        replication_factor=1,
        log_dir=str(log_dir),
        python=sys.executable,
        master_port=free_port(),
        megatron_dir=str(megatron_dir),
        data_path="mock",
        extra_args="",
        ckpt_strategy="gemini",
        window_size=None,
    )
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch(TEMPLATES[0], **values))
    start = time.monotonic()
    code, output = _run_script(script, _env(tmp_path, bin_dir, "92"), timeout=120)
    assert code != 0
    assert time.monotonic() - start < 60  # not the workers' 300 s
    logs = log_dir / "92"
    assert "reserved" in (logs / "spare0.log").read_text()
    assert "STUB" not in (logs / "spare0.log").read_text()
    coordinator = (logs / "rank0.log").read_text()
    assert "ranks [2] failed" in coordinator and "cannot take over a rank" in coordinator
    for rank in (0, 1, 3):
        assert f"STUB {rank} None" in (logs / f"rank{rank}.log").read_text()
