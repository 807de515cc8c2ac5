"""Megatron-LM's own ``pretrain_gpt.py``, patched, trained on CPU with gloo in 4 processes.

The tree comes from ``MEGATRON_LM_DIR`` (default ``../shared/megatron-lm`` beside the checkout);
it is copied to a temporary folder and patched there with ``scripts/apply_megatron_patch.sh``.
Without a tree the tests skip, saying so.

``--ckpt-strategy moevement`` must not change training: the loss lines and the final model,
optimizer, RNG and scheduler state (Megatron's own ``--save``, torch format) are bitwise equal to
``--ckpt-strategy default``'s.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from megatron_moevement.megatron.launch_local import build_job

pytestmark = pytest.mark.multiproc

ROOT = Path(__file__).resolve().parents[2]
TREE = Path(os.environ.get("MEGATRON_LM_DIR", ROOT.parent / "shared" / "megatron-lm"))
ITERATIONS = 6

# A small MoE GPT on PP2 x DP2 x EP2 (4 ranks), bf16 with the distributed optimizer, mock data,
# and the options Megatron-LM needs on CPU (local layers, gloo, no fused CUDA kernels).
MODEL_ARGS = f"""
--num-layers 4 --hidden-size 64 --ffn-hidden-size 128 --num-attention-heads 4
--seq-length 32 --max-position-embeddings 32 --micro-batch-size 2 --global-batch-size 8
--num-experts 4 --moe-router-topk 2 --moe-token-dispatcher-type alltoall
--pipeline-model-parallel-size 2 --expert-model-parallel-size 2
--bf16 --use-distributed-optimizer
--lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-iters 2 --weight-decay 0.01
--clip-grad 1.0 --train-iters {ITERATIONS} --mock-data --tokenizer-type NullTokenizer
--vocab-size 128 --seed 1234 --log-interval 1 --eval-interval 1000 --eval-iters 0
--transformer-impl local --distributed-backend gloo --disable-bias-linear
--no-masked-softmax-fusion --no-bias-dropout-fusion --no-bias-swiglu-fusion
--no-gradient-accumulation-fusion --no-rope-fusion --no-persist-layer-norm
--use-cpu-initialization --hidden-dropout 0 --attention-dropout 0
--ckpt-format torch --save-interval 1000
""".split()

LOSS_LINE = re.compile(r"iteration\s+(\d+)/\s*\d+ \| consumed samples:.*?lm loss: (\S+)")


@pytest.fixture(scope="module")
def megatron_lm(tmp_path_factory):
    """A patched copy of Megatron-LM's tree."""
    if not (TREE / "pretrain_gpt.py").is_file():
        pytest.skip(
            f"no Megatron-LM tree at {TREE}: set MEGATRON_LM_DIR to a Megatron-LM checkout at "
            "core_v0.16.1 to run Megatron-LM's pretrain_gpt.py"
        )
    tree = tmp_path_factory.mktemp("megatron-lm") / "Megatron-LM"
    shutil.copytree(TREE, tree)
    for path in [tree, *tree.rglob("*")]:
        path.chmod(path.stat().st_mode | 0o200)  # the shared tree is read-only
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "apply_megatron_patch.sh"), str(tree)],
        check=True,
        capture_output=True,
    )
    return tree


def run_pretrain(tree: Path, out: Path, strategy: str, extra=()) -> Path:
    """Runs pretrain_gpt.py on 4 local ranks; returns the folder with logs and checkpoint."""
    args = [*MODEL_ARGS, "--save", str(out / "ckpt"), *extra]
    moevement = strategy != "default"
    if not moevement:
        args += ["--ckpt-strategy", "default"]
    job = build_job(
        str(tree / "pretrain_gpt.py"),
        args,
        nprocs=4,
        log_dir=out / "logs",
        moevement=moevement,
        window_size="2" if strategy == "moevement" else None,
        ckpt_strategy=strategy if moevement else "moevement",
    )
    with job:
        job.check(timeout=600)
    return out


def loss_lines(out: Path) -> dict[int, str]:
    lines = {}
    for log in sorted((out / "logs").glob("proc*.log")):
        for match in LOSS_LINE.finditer(log.read_text(errors="replace")):
            it = int(match.group(1))
            assert it not in lines, f"iteration {it} printed twice"
            lines[it] = match.group(2)
    return lines


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


def final_state(out: Path) -> dict:
    """Every tensor and scalar of Megatron's final checkpoint, except its recorded arguments."""
    ckpt = out / "ckpt" / f"iter_{ITERATIONS:07d}"
    state = {}
    for path in sorted(ckpt.rglob("*.pt")):
        data = torch.load(path, map_location="cpu", weights_only=False)
        if isinstance(data, dict):
            data.pop("args", None)  # the command lines differ by --ckpt-strategy and --save
        rel = path.relative_to(ckpt)
        state.update({f"{rel}{k}": v for k, v in leaves(data)})
    return state


def assert_bitwise_equal(a: dict, b: dict) -> int:
    assert a.keys() == b.keys()
    differ = []
    for key, va in a.items():
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
    assert not differ, f"{len(differ)} of {len(a)} entries differ, e.g. {differ[:5]}"
    return len(a)


def test_moevement_does_not_change_megatron_lm_training(megatron_lm, tmp_path):
    default = run_pretrain(megatron_lm, tmp_path / "default", "default")
    moevement = run_pretrain(megatron_lm, tmp_path / "moevement", "moevement")
    losses = loss_lines(default)
    assert sorted(losses) == list(range(1, ITERATIONS + 1))
    assert loss_lines(moevement) == losses
    # MoEvement really ran: it built its strategy and changed schedules on these ranks.
    logs = "".join(p.read_text(errors="replace") for p in (moevement / "logs").glob("*.log"))
    assert "MoEvement" in logs
    a, b = final_state(default), final_state(moevement)
    n_tensors = sum(torch.is_tensor(v) for v in a.values())
    assert n_tensors > 100
    assert any("distrib_optim" in k for k in a) and any("/rng_state/" in k for k in a)
    assert assert_bitwise_equal(a, b) == len(a)
