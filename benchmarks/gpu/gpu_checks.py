"""The CUDA path on one GPU: snapshot bandwidth and overlap, FP8 through Transformer Engine, NCCL.

Run on a CUDA machine (``bash benchmarks/gpu/run_all.sh``); every check is independent, prints
its figures and goes into one JSON file; a check that cannot run (no TE, one GPU too few) is
recorded as ``skipped`` with the reason, one that fails as ``failed`` with the error.

* ``bandwidth``: device-to-host bytes/s of MoEvement's snapshot copier (pinned host buffers, the
  dedicated copy stream with its event) against a plain ``copy_(non_blocking=True)`` of the same
  bytes into pinned memory (goal: >= 80% of it), and the stall a capture adds to the next
  iteration of a matmul workload (overlap);
* ``overhead``: iteration time of a TE-layer MLP stack trained with Adam, with no checkpointing,
  dense snapshots every iteration and MoEvement-like sparse snapshots (1/W of the operators' full
  state plus the compute weights of the rest), in bf16 and in FP8 (delayed and current scaling),
  ratios side by side, and the bytes of the FP8 compute weights;
* ``fp8_replay``: bitwise rollback and replay of that model under FP8 delayed scaling with FP8
  primary weights (``fp8_model_init``): snapshot, train on, restore through MoEvement's engine
  and loader, retrain, compare weights (data and scales), optimizer state and ``fp8_meta``;
* ``nccl``: two processes on the one GPU with NCCL: all-reduce traffic, then a SIGKILL of one
  rank; records how long the survivor takes to see the failure.

    python benchmarks/gpu/gpu_checks.py --output results/gpu/gpu_checks.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from _results import write_results  # noqa: E402

from megatron_moevement.replay.loader import SlotLoader  # noqa: E402
from megatron_moevement.snapshot.buffers import allocate_host_buffer  # noqa: E402
from megatron_moevement.snapshot.engine import SnapshotEngine  # noqa: E402
from megatron_moevement.snapshot.sharding import ShardPlan  # noqa: E402
from megatron_moevement.state.fp8 import fp8_meta_tensors  # noqa: E402
from megatron_moevement.state.operators import (  # noqa: E402
    Operator,
    OperatorBuffer,
    OperatorParam,
)
from megatron_moevement.state.optim_view import ParamState  # noqa: E402

SINGLE_GPU_SHARDING = SimpleNamespace(
    dp_rank=0, dp_size=1, expert_dp_rank=0, expert_dp_size=1, distributed_optimizer=False
)


class _Registry:
    """The operators of the checks' models (the real registry needs a Megatron GPTModel)."""

    def __init__(self, ops):
        self.operators = ops
        self._by_name = {op.name: op for op in ops}

    def refresh(self):
        pass

    def __getitem__(self, name):
        return self._by_name[name]


class _Schedule:
    def __init__(self, slices):
        self.slices, self.window_size = slices, len(slices)

    def to_dict(self):
        return {"slices": self.slices}


def _timed(fn, repeats: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


# ------------------------------------------------------------------------------ bandwidth
def check_bandwidth(args) -> dict:
    nbytes = args.bandwidth_mb << 20
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    pinned = allocate_host_buffer(nbytes)
    plain = _timed(lambda: pinned.copy_(src.view(torch.uint8), non_blocking=True), 5)
    op = Operator("w", "dense", 0, params=[OperatorParam("w", torch.nn.Parameter(src))])
    registry = _Registry([op])
    plan = ShardPlan(full_state=set(), compute={"w"}, owner_of={"w": 0})
    engine = SnapshotEngine(registry, plan, rank=0)
    window = [0]

    def capture():
        ckpt = engine.begin_window(_Schedule([["w"]]), start_iteration=window[0], window=window[0])
        engine.capture(ckpt, 0, window[0])
        engine.wait_for_copies()
        torch.cuda.current_stream().synchronize()
        window[0] += 1

    capture()  # allocates the pinned slot buffers
    capture()
    ours = _timed(capture, 5)
    engine.drain()
    # Overlap: a matmul "iteration", alone and right after a capture that copies meanwhile.
    a = torch.randn(args.matmul_size, args.matmul_size, device="cuda", dtype=torch.bfloat16)

    def iteration():
        for _ in range(8):
            torch.mm(a, a)

    alone = _timed(iteration, 5)

    def iteration_with_capture():
        ckpt = engine.begin_window(_Schedule([["w"]]), start_iteration=window[0], window=window[0])
        engine.capture(ckpt, 0, window[0])
        window[0] += 1
        iteration()
        engine.wait_for_copies()

    with_capture = _timed(iteration_with_capture, 5)
    engine.drain()
    engine.shutdown()
    return dict(
        bytes=nbytes,
        plain_copy_bytes_per_s=nbytes / plain,
        copier_bytes_per_s=nbytes / ours,
        copier_vs_plain=plain / ours,
        goal_met=plain / ours >= 0.8,
        iteration_s=alone,
        iteration_with_capture_s=with_capture,
        stall_per_iteration_s=max(0.0, with_capture - alone),
        copy_alone_s=ours,
    )


# ------------------------------------------------------------------------------ TE model
def _te():
    import transformer_engine.pytorch as te
    from transformer_engine.common import recipe

    return te, recipe


def _recipe(kind: str):
    te, recipe = _te()
    if kind == "delayed":
        return recipe.DelayedScaling(amax_history_len=16)
    return recipe.Float8CurrentScaling()


def _build(args, fp8_weights: bool, recipe_kind: str | None):
    te, _ = _te()
    torch.manual_seed(1234)
    ctx = (
        te.fp8_model_init(enabled=True, recipe=_recipe(recipe_kind))
        if fp8_weights
        else torch.no_grad()
    )
    with ctx:
        layers = torch.nn.ModuleList(
            te.Linear(args.hidden, args.hidden, bias=False, params_dtype=torch.bfloat16)
            for _ in range(args.layers)
        ).cuda()
    # FP32 main weights (an FP8 primary weight's .float() dequantizes it).
    mains = [p.detach().float().clone() for p in layers.parameters()]
    opt = torch.optim.Adam([torch.nn.Parameter(m) for m in mains], lr=1e-3)
    return layers, opt


def _operators(layers, opt) -> list[Operator]:
    ops = []
    params = list(layers.parameters())
    for i, (p, main) in enumerate(zip(params, opt.param_groups[0]["params"])):
        state = ParamState(p, main, opt.state.setdefault(main, {}))
        op = Operator(f"layer{i}.dense", "dense", i, params=[OperatorParam(f"l{i}.w", p, state)])
        for path, _ in fp8_meta_tensors(layers[i]):
            op.buffers.append(OperatorBuffer(f"l{i}.{path}", layers[i], path))
        ops.append(op)
    return ops


def _train_step(layers, opt, x, recipe_kind):
    te, _ = _te()
    with te.fp8_autocast(
        enabled=recipe_kind is not None, fp8_recipe=_recipe(recipe_kind or "delayed")
    ):
        h = x
        for layer in layers:
            h = torch.nn.functional.gelu(layer(h))
    loss = h.float().pow(2).mean()
    loss.backward()
    with torch.no_grad():
        for p, main in zip(layers.parameters(), opt.param_groups[0]["params"]):
            main.grad = p.grad.float() if p.grad is not None else torch.zeros_like(main)
            p.grad = None
        opt.step()
        opt.zero_grad(set_to_none=True)
        for p, main in zip(layers.parameters(), opt.param_groups[0]["params"]):
            p.copy_(main)  # re-quantizes an FP8 primary weight (new data and scale)
    return loss.item()


def check_overhead(args) -> dict:
    out = {}
    for precision, recipe_kind, fp8_weights in (
        ("bf16", None, False),
        ("fp8-delayed", "delayed", True),
        ("fp8-current", "current", True),
    ):
        layers, opt = _build(args, fp8_weights, recipe_kind)
        x = torch.randn(args.tokens, args.hidden, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            _train_step(layers, opt, x, recipe_kind)
        ops = _operators(layers, opt)
        names = [op.name for op in ops]
        registry = _Registry(ops)
        result = dict(compute_weight_bytes=sum(op.compute_bytes for op in ops))
        result["params"] = sum(p.numel() for p in layers.parameters())
        result["compute_bytes_per_param"] = result["compute_weight_bytes"] / result["params"]
        for mode in ("none", "dense", "moevement"):
            window = 1 if mode == "dense" else args.window
            slices = [names[k::window] for k in range(window)]
            plan = ShardPlan(full_state=set(names), compute=set(names), owner_of={})
            engine = SnapshotEngine(registry, plan, rank=0)
            times, state = [], dict(ckpt=None, it=0)

            def step():
                engine.wait_for_copies()
                _train_step(layers, opt, x, recipe_kind)
                if mode == "none":
                    return
                k = state["it"] % window
                if k == 0:
                    state["ckpt"] = engine.begin_window(_Schedule(slices), state["it"], state["it"])
                engine.capture(state["ckpt"], k, state["it"])
                state["it"] += 1

            for _ in range(2 * window + 2):
                step()
            for _ in range(args.iterations):
                times.append(_timed(step, 1))
            engine.drain()
            engine.shutdown()
            result[mode] = dict(median_iteration_s=sorted(times)[len(times) // 2])
        base = result["none"]["median_iteration_s"]
        for mode in ("dense", "moevement"):
            result[mode]["ratio_to_none"] = result[mode]["median_iteration_s"] / base
        out[precision] = result
    return out


def _snapshot_state(layers, opt):
    state = {
        f"w{i}": [t.clone() for t in (p._data, p._scale_inv)]
        for i, p in enumerate(layers.parameters())
    }
    for i, layer in enumerate(layers):
        meta = layer.fp8_meta["scaling_fwd"]
        state[f"meta{i}"] = [meta.scale.clone(), meta.amax_history.clone()]
    for i, main in enumerate(opt.param_groups[0]["params"]):
        state[f"main{i}"] = [main.detach().clone()] + [
            v.clone() for _, v in sorted(opt.state[main].items()) if torch.is_tensor(v)
        ]
    return state


def check_fp8_replay(args) -> dict:
    layers, opt = _build(args, True, "delayed")
    x = [
        torch.randn(args.tokens, args.hidden, device="cuda", dtype=torch.bfloat16) for _ in range(6)
    ]
    for it in range(3):
        _train_step(layers, opt, x[it], "delayed")
    ops = _operators(layers, opt)
    names = [op.name for op in ops]
    registry = _Registry(ops)
    plan = ShardPlan(full_state=set(names), compute=set(names), owner_of={n: 0 for n in names})
    engine = SnapshotEngine(registry, plan, rank=0)
    ckpt = engine.begin_window(_Schedule([names]), 3, 0)
    engine.capture(ckpt, 0, 2)
    engine.drain()
    losses = [_train_step(layers, opt, x[it], "delayed") for it in range(3, 6)]
    reference = _snapshot_state(layers, opt)
    SlotLoader(registry, plan, SINGLE_GPU_SHARDING, None).apply(ckpt, 0)
    replayed = [_train_step(layers, opt, x[it], "delayed") for it in range(3, 6)]
    after = _snapshot_state(layers, opt)
    differ = [
        k for k in reference if not all(torch.equal(a, b) for a, b in zip(reference[k], after[k]))
    ]
    engine.shutdown()
    return dict(
        losses=losses,
        replayed_losses=replayed,
        tensors_compared=sum(len(v) for v in reference.values()),
        differ=differ,
        bitwise_equal=not differ and losses == replayed,
    )


# ------------------------------------------------------------------------------ NCCL
_NCCL_WORKER = r"""
import os, sys, time, torch, torch.distributed as dist
from datetime import timedelta
dist.init_process_group("nccl", timeout=timedelta(seconds=60))
rank = dist.get_rank()
torch.cuda.set_device(0)
t = torch.ones(1 << 20, device="cuda")
for _ in range(20):
    dist.all_reduce(t)
torch.cuda.synchronize()
print("ready", flush=True)
if rank == 1:
    time.sleep(3600)
time.sleep(2.0)
start = time.perf_counter()
try:
    dist.all_reduce(t)
    torch.cuda.synchronize()
    print("no error", flush=True)
except Exception as exc:
    print(f"detected {time.perf_counter() - start:.3f} {type(exc).__name__}", flush=True)
os._exit(0)
"""


def check_nccl(args) -> dict:
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port), WORLD_SIZE="2")
    env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "1"
    env["NCCL_P2P_DISABLE"] = "1"  # two ranks on one device
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _NCCL_WORKER],
            env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for r in range(2)
    ]
    try:
        lines = [p.stdout.readline().strip() for p in procs]
        if lines != ["ready", "ready"]:
            return dict(status="failed", output=lines)
        procs[1].send_signal(signal.SIGKILL)
        out, _ = procs[0].communicate(timeout=120)
        return dict(all_reduce_ok=True, survivor=out.strip().splitlines()[-1:])
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)


CHECKS = dict(
    bandwidth=check_bandwidth,
    overhead=check_overhead,
    fp8_replay=check_fp8_replay,
    nccl=check_nccl,
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", default="", help=f"comma-separated subset of {list(CHECKS)}")
    parser.add_argument("--bandwidth-mb", type=int, default=1024)
    parser.add_argument("--matmul-size", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--port", type=int, default=29611)
    parser.add_argument("--output", type=Path, default=Path("results/gpu/gpu_checks.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: these checks measure the CUDA path and need a GPU")
    results = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__)
    for name in [n for n in (args.only.split(",") if args.only else CHECKS) if n]:
        print(f"== {name}", flush=True)
        try:
            if name in ("overhead", "fp8_replay"):
                _te()
            results[name] = dict(status="ok", **CHECKS[name](args))
        except ImportError as exc:
            results[name] = dict(status="skipped", reason=f"Transformer Engine missing: {exc}")
        except Exception as exc:  # recorded, and the other checks still run
            results[name] = dict(status="failed", error=repr(exc), trace=traceback.format_exc())
        print(json.dumps(results[name], indent=1, default=str)[:4000], flush=True)
    write_results(args.output, results)


if __name__ == "__main__":
    main()
