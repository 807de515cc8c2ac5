"""Megatron-LM's own ``pretrain_gpt.py`` (patched) on 4 local CPU ranks, end to end: the model
and options, patching a tree, running a job (optionally with a spare and a fault), and reading
its log lines, recovery reports and final checkpoint. Used by ``moevement-train megatron-lm`` and
the Megatron-LM tests."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import torch

from megatron_moevement.harness import megatron_faults
from megatron_moevement.megatron.launch_local import build_job, run_job

ROOT = Path(__file__).resolve().parents[2]
APPLY_PATCH = ROOT / "scripts" / "apply_megatron_patch.sh"


def model_args(iterations: int) -> list[str]:
    """A small MoE GPT on PP2 x DP2 x EP2 (4 ranks), bf16 with the distributed optimizer, mock
    data, and the options Megatron-LM needs on CPU (local layers, gloo, no fused CUDA kernels)."""
    return f"""
--num-layers 4 --hidden-size 64 --ffn-hidden-size 128 --num-attention-heads 4
--seq-length 32 --max-position-embeddings 32 --micro-batch-size 2 --global-batch-size 8
--num-experts 4 --moe-router-topk 2 --moe-token-dispatcher-type alltoall
--pipeline-model-parallel-size 2 --expert-model-parallel-size 2
--bf16 --use-distributed-optimizer
--lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-iters 2 --weight-decay 0.01
--clip-grad 1.0 --train-iters {iterations} --mock-data --tokenizer-type NullTokenizer
--vocab-size 128 --seed 1234 --log-interval 1 --eval-interval 1000 --eval-iters 0
--transformer-impl local --distributed-backend gloo --disable-bias-linear
--no-masked-softmax-fusion --no-bias-dropout-fusion --no-bias-swiglu-fusion
--no-gradient-accumulation-fusion --no-rope-fusion --no-persist-layer-norm
--use-cpu-initialization --ckpt-format torch --save-interval 1000
""".split()


LOG_LINE = re.compile(r" iteration\s+(\d+)/\s*\d+ \|(.*)")
TIMING = re.compile(r"elapsed time per iteration \(ms\): \S+ \|")
LOSS = re.compile(r"lm loss: (\S+)")


def patch_tree(source: Path, dest: Path) -> Path:
    """Copies the Megatron-LM tree ``source`` to ``dest`` and applies MoEvement's patch there;
    returns ``dest``."""
    source = Path(source)
    if not (source / "pretrain_gpt.py").is_file():
        raise FileNotFoundError(
            f"{source} is not a Megatron-LM tree (no pretrain_gpt.py). Fix: pass a checkout of "
            "NVIDIA/Megatron-LM at core_v0.16.1."
        )
    shutil.copytree(source, dest)
    for path in [dest, *Path(dest).rglob("*")]:
        path.chmod(path.stat().st_mode | 0o200)  # the source may be read-only
    result = subprocess.run(["bash", str(APPLY_PATCH), str(dest)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"patching {dest} failed: {result.stdout}{result.stderr}")
    return Path(dest)


def run_pretrain(
    tree: Path,
    out: Path,
    strategy: str,
    args: list[str],
    *,
    window: str = "2",
    spares: int = 0,
    elastic: bool = False,
    faults: list | None = None,
    timeout: float = 600,
    replication_factor: int = 1,
) -> list[dict]:
    """Runs pretrain_gpt.py on 4 local ranks (+ ``spares``), saving to ``out/ckpt`` with logs in
    ``out/logs``; returns the elastic coordinator's failure records."""
    args = [*args, "--save", str(out / "ckpt")]
    moevement = strategy != "default"
    if not moevement:
        args += ["--ckpt-strategy", "default"]
    job = build_job(
        str(tree / "pretrain_gpt.py"),
        args,
        nprocs=4,
        spares=spares,
        log_dir=out / "logs",
        moevement=moevement,
        window_size=window if strategy == "moevement" else None,
        replication_factor=replication_factor,
        ckpt_strategy=strategy if moevement else "moevement",
    )
    if faults:
        job.env = dict(
            job.env,
            MOEVEMENT_FAULT_INJECTION=json.dumps(faults),
            MOEVEMENT_WORKER_HOOK=megatron_faults.HOOK,
        )
    return run_job(job, timeout=timeout, elastic=elastic)


def log_lines(out: Path, allow_repeats: bool = False) -> dict[int, str]:
    """Each iteration's log line (without its timing), by iteration (the printing rank may have
    been replaced by a spare: all logs are read).

    Raises:
        ValueError: An iteration's line was printed twice (unless ``allow_repeats``: a restart
            from ``--load`` trains some iterations again; the last line counts).
    """
    lines: dict[int, str] = {}
    for log in sorted((out / "logs").glob("proc*.log")):
        for match in LOG_LINE.finditer(log.read_text(errors="replace")):
            it = int(match.group(1))
            if it in lines and not allow_repeats:
                raise ValueError(f"iteration {it} was printed twice ({log})")
            lines[it] = TIMING.sub("", match.group(2)).strip()
    return lines


def loss_lines(out: Path) -> dict[int, str]:
    """Each iteration's printed ``lm loss``."""
    return {it: LOSS.search(line).group(1) for it, line in log_lines(out).items()}


def recovery_reports(out: Path) -> dict[int, list[dict]]:
    """Every rank's recovery reports (``recovery_rank<R>.jsonl`` in the log folder)."""
    reports: dict[int, list[dict]] = {}
    for path in sorted((out / "logs").glob("recovery_rank*.jsonl")):
        rank = int(path.stem.removeprefix("recovery_rank"))
        reports[rank] = [json.loads(line) for line in path.read_text().splitlines() if line]
    return reports


def leaves(obj, prefix=""):
    """``(path, value)`` of every tensor and scalar in a nested checkpoint structure."""
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        if torch.is_tensor(obj) or isinstance(obj, (int, float, str, bool)) or obj is None:
            yield prefix, obj
        return
    for k, v in items:
        yield from leaves(v, f"{prefix}/{k}")


COUNTER_ARGS = ("iteration", "consumed_train_samples", "skipped_train_samples")


def final_state(out: Path, iterations: int) -> dict:
    """Every tensor and scalar of Megatron's final checkpoint: model, optimizer, RNG, scheduler,
    counters; of the recorded arguments only Megatron's counters (the command lines differ)."""
    ckpt = out / "ckpt" / f"iter_{iterations:07d}"
    state = {}
    for path in sorted(ckpt.rglob("*.pt")):
        data = torch.load(path, map_location="cpu", weights_only=False)
        if isinstance(data, dict) and "args" in data:
            recorded = data.pop("args")
            data["counters"] = {k: getattr(recorded, k, None) for k in COUNTER_ARGS}
        rel = path.relative_to(ckpt)
        state.update({f"{rel}{k}": v for k, v in leaves(data)})
    return state


def differing_entries(a: dict, b: dict) -> list[str]:
    """The keys whose entries differ (tensors compared byte for byte, missing keys included)."""
    differ = sorted(set(a) ^ set(b))
    for key, va in a.items():
        if key not in b:
            continue
        vb = b[key]
        if torch.is_tensor(va):
            same = (
                va.dtype == vb.dtype
                and va.shape == vb.shape
                and torch.equal(
                    va.reshape(-1).view(torch.uint8) if va.numel() else va,
                    vb.reshape(-1).view(torch.uint8) if vb.numel() else vb,
                )
            )
        else:
            same = va == vb
        if not same:
            differ.append(key)
    return differ


def assert_bitwise_equal(a: dict, b: dict) -> int:
    """Every entry equal, tensors byte for byte; returns the number of entries."""
    differ = differing_entries(a, b)
    assert not differ, f"{len(differ)} of {len(a)} entries differ, e.g. {differ[:5]}"
    return len(a)


def run_recovery_demo(
    source_tree: Path,
    output_dir: Path,
    *,
    victim: int = 1,
    iteration: int = 4,
    phase: str = "microbatch1",
    iterations: int = 8,
    window: str = "2",
    timeout: float = 900,
    progress=lambda message: None,
) -> dict:
    """Megatron-LM's ``pretrain_gpt.py`` end to end: patches a copy of ``source_tree``, runs the
    small MoE GPT on PP2 x DP2 x EP2 with one spare, fault-free and with a SIGKILL of ``victim``
    at ``phase`` of 0-based ``iteration``, and compares the two.

    Returns:
        ``{"failures", "reports", "log_lines_equal", "entries", "differing", "bitwise_equal"}``:
        the coordinator's failure records, every rank's recovery reports, whether every
        iteration's log line is the same, the number of final-checkpoint entries compared and
        those that differ.
    """
    output_dir = Path(output_dir)
    progress(f"patching a copy of {source_tree}")
    tree = patch_tree(source_tree, output_dir / "Megatron-LM")
    args = [*model_args(iterations), "--untie-embeddings-and-output-weights"]
    progress(f"fault-free run ({iterations} iterations, logs in {output_dir / 'fault-free'})")
    reference = output_dir / "fault-free"
    run_pretrain(tree, reference, "moevement", args, window=window, spares=1, elastic=True)
    recovered = output_dir / "recovered"
    fault = {"rank": victim, "iteration": iteration, "phase": phase}
    progress(f"run with a SIGKILL of rank {victim} at iteration {iteration + 1} ({phase})")
    failures = run_pretrain(
        tree,
        recovered,
        "moevement",
        args,
        window=window,
        spares=1,
        elastic=True,
        faults=[fault],
        timeout=timeout,
    )
    a, b = final_state(reference, iterations), final_state(recovered, iterations)
    differing = differing_entries(a, b)
    return dict(
        failures=failures,
        reports=recovery_reports(recovered),
        log_lines_equal=log_lines(reference) == log_lines(recovered),
        entries=len(a),
        differing=differing,
        bitwise_equal=not differing and bool(a),
    )
