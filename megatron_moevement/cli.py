"""``moevement-train``: run the local CPU harness from the command line.

Subcommands:

* ``train``: trains the small Megatron-Core MoE GPT on N local processes (gloo) and prints the
  loss of every iteration.
* ``megatron-lm PATH``: the same, with Megatron-LM's own ``pretrain_gpt.py`` from the tree at
  ``PATH`` (copied and patched): a fault-free run and one where a rank is SIGKILLed mid-iteration
  and the job recovers in memory inside Megatron-LM's loop; prints the recovery reports and checks
  Megatron's final checkpoint and log lines against the fault-free run.
* ``demo``: failure and recovery. Trains with MoEvement on N processes plus a spare, SIGKILLs a
  rank mid-iteration, recovers (the spare takes the rank, the state is rebuilt from the sparse
  checkpoints and peer replicas, replay to the last committed iteration), finishes training, and
  checks every tensor bit for bit against a fault-free run. ``--strategy gemini`` runs the
  Gemini-like baseline instead (dense snapshots every ``--baseline-interval`` iterations, global
  rollback: also bitwise equal); ``--strategy moc`` the MoC-like one (non-expert state plus a
  rotating ``--baseline-expert-fraction`` of the experts): its recovery restores stale experts, so
  the demo prints the proportion of lost tokens and checks that the state is *not* bitwise equal.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from megatron_moevement.argtypes import NON_NEGATIVE_INT, POSITIVE_FLOAT, POSITIVE_INT
from megatron_moevement.constants import CKPT_STRATEGIES
from megatron_moevement.harness.faults import FaultSpecError, check_faults_fired, validate_faults
from megatron_moevement.harness.launcher import run_worker_job
from megatron_moevement.harness.layout import ParallelLayout
from megatron_moevement.harness.model import TinyMoEConfig, check_layout
from megatron_moevement.harness.worker import WorkerSpec
from megatron_moevement.megatron.args import (
    MoEvementArgsError,
    add_baseline_args,
    baseline_config_for,
)

DEMO_WINDOW_SIZE = 3
"""MoEvement's window in the demo."""

DEMO_BASELINE_DEFAULTS = dict(interval=4, expert_fraction=0.25)
"""The demo's baseline policy: a dense snapshot every 4 iterations (Gemini), a quarter of the
experts per checkpoint (MoC)."""


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layout", default="pp2xdp2xep2", help="e.g. single, ep2, pp2xdp2xep2")
    parser.add_argument("--iterations", type=POSITIVE_INT, default=10)
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="bf16")
    parser.add_argument("--distributed-optimizer", action="store_true")
    parser.add_argument("--num-layers", type=POSITIVE_INT, default=4)
    parser.add_argument("--num-experts", type=POSITIVE_INT, default=4)
    parser.add_argument("--hidden-size", type=POSITIVE_INT, default=64)
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="keep logs and state dumps here (default: a temporary folder)",
    )
    parser.add_argument(
        "--timeout", type=POSITIVE_FLOAT, default=600.0, help="seconds before giving up"
    )


def _model_from_args(args: argparse.Namespace) -> TinyMoEConfig:
    return TinyMoEConfig(
        num_layers=args.num_layers,
        num_experts=args.num_experts,
        hidden_size=args.hidden_size,
        precision=args.precision,
        use_distributed_optimizer=args.distributed_optimizer,
    )


def _layout_and_model(args: argparse.Namespace) -> tuple[ParallelLayout, TinyMoEConfig]:
    """The parsed layout and model, checked against each other before any process starts."""
    try:
        layout = ParallelLayout.parse(args.layout)
        model = _model_from_args(args)
        check_layout(model, layout)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    return layout, model


def _train(args: argparse.Namespace) -> int:
    layout, model = _layout_and_model(args)
    out = args.output_dir or Path(tempfile.mkdtemp(prefix="moevement-train-"))
    print(
        f"training {args.iterations} iterations on {layout.world_size} CPU processes "
        f"({layout}), logs in {out / 'logs'}",
        flush=True,
    )
    spec = WorkerSpec(layout=layout.to_dict(), model=model.to_dict(), iterations=args.iterations)
    run_worker_job(spec, out, timeout=args.timeout)
    last_rank = layout.world_size - 1
    results = json.loads((out / f"result_rank{last_rank}.json").read_text())
    print(f"{'iteration':>9}  {'loss':>10}  {'grad norm':>10}")
    for row in results:
        print(f"{row['iteration']:>9}  {row['loss']:>10.6f}  {row['grad_norm']:>10.6f}")
    return 0


def _demo_policy(args: argparse.Namespace):
    """The demo's :class:`~megatron_moevement.baselines.BaselineConfig` (``None`` for
    MoEvement) and window size; exits with a message naming the option on a bad combination."""
    if args.strategy != "moevement" and args.window_size is not None:
        raise SystemExit(
            f"--window-size has no effect with --strategy {args.strategy}, which runs with a "
            "one-slot window. Fix: drop --window-size, or use --strategy moevement."
        )
    try:
        baseline = baseline_config_for(args.strategy, args, "--strategy", DEMO_BASELINE_DEFAULTS)
    except MoEvementArgsError as exc:
        raise SystemExit(str(exc)) from None
    window = 1 if baseline is not None else (args.window_size or DEMO_WINDOW_SIZE)
    return baseline, window


def _moc_verdict(out: Path, world: int, compared: int, differing: list[str]) -> int:
    """MoC's step 3: prints the lost tokens and whether the state differs, as it should."""
    stats = [
        json.loads((out / "recovered" / f"recovery_rank{r}.json").read_text())["stats"]
        for r in range(world)
    ]
    accounts = {json.dumps(s.get("recoveries"), sort_keys=True) for s in stats}
    s = stats[0]
    lost, total, plt = s["lost_tokens"], s["total_tokens"], s["proportion_lost_tokens"]
    stale = {e: n for event in s["recoveries"] for e, n in event["stale_experts"].items()}
    print(
        f"  lost tokens: {lost} of {total} token-to-expert assignments, proportion of lost "
        f"tokens {100 * plt:.2f}%; {len(stale)} expert(s) restored stale "
        f"(by up to {max(stale.values(), default=0)} iteration(s))"
    )
    if len(accounts) != 1:
        print("  MISMATCH: the ranks report different lost-token accounting")
        return 1
    if lost > 0 and differing:
        print(
            f"  not bitwise equal, as expected for MoC: {len(differing)} of {compared} tensors "
            f"differ (the stale experts' lost updates, and what trained on them). Outputs in {out}"
        )
        return 0
    if lost == 0 and not differing:
        print(f"  bitwise equal: no token was lost, all {compared} tensors match. Outputs in {out}")
        return 0
    if differing:
        print(f"  MISMATCH: no token was lost, yet {len(differing)} of {compared} tensors differ")
    else:
        print(f"  UNEXPECTED: {lost} tokens were lost, yet all {compared} tensors are equal")
    return 1


def _demo(args: argparse.Namespace) -> int:
    import torch

    from megatron_moevement.harness.launcher import run_elastic_job

    layout, model = _layout_and_model(args)
    baseline, window = _demo_policy(args)
    if layout.world_size < 2:
        raise SystemExit(
            f"--layout {args.layout}: the demo needs at least 2 ranks (a single rank has no peer "
            "to hold its sparse checkpoints, so its failure is not recoverable in memory). Fix: "
            "use e.g. --layout ep2 or pp2xdp2xep2."
        )
    if not 0 <= args.kill_rank < layout.world_size:
        raise SystemExit(
            f"--kill-rank {args.kill_rank} is not a rank of {layout} "
            f"(0..{layout.world_size - 1})"
        )
    if not 0 <= args.kill_iteration < args.iterations:
        raise SystemExit(
            f"--kill-iteration must lie in [0, {args.iterations}): the kill must happen before "
            "the run ends (a kill before the first checkpoint persisted is recovered from the "
            "job's initial state)"
        )
    fault = dict(rank=args.kill_rank, iteration=args.kill_iteration, phase=args.phase)
    try:
        validate_faults([fault], layout.world_size, args.iterations, model.num_microbatches)
    except FaultSpecError as exc:
        raise SystemExit(f"--phase/--kill-rank/--kill-iteration: {exc}") from None
    out = args.output_dir or Path(tempfile.mkdtemp(prefix="moevement-demo-"))
    world = layout.world_size
    print(
        f"[1/3] fault-free reference: {args.iterations} iterations on {world} processes "
        f"({layout})",
        flush=True,
    )
    ref_spec = WorkerSpec(
        layout=layout.to_dict(),
        model=model.to_dict(),
        iterations=args.iterations,
        log_level="WARNING",
    )
    run_worker_job(ref_spec, out / "fault_free", timeout=args.timeout)
    if baseline is None:
        run = f"MoEvement run (W={window}, r=1, 1 spare)"
        fields = dict(window_size=window)
    else:
        run = (
            f"Gemini-like run (a dense snapshot every {baseline.interval} iteration(s), global "
            "rollback, r=1, 1 spare)"
            if baseline.strategy == "gemini"
            else f"MoC-like run (non-expert state + {100 * baseline.expert_fraction:g}% of the "
            "experts every iteration, r=1, 1 spare)"
        )
        policy = {k: v for k, v in baseline.to_dict().items() if k != "strategy"}
        fields = dict(strategy=baseline.strategy, baseline=policy)
    print(
        f"[2/3] {run}; SIGKILL of rank {args.kill_rank} at iteration {args.kill_iteration} "
        f"({args.phase})",
        flush=True,
    )
    spec = WorkerSpec(
        job="resilient",
        layout=layout.to_dict(),
        model=model.to_dict(),
        iterations=args.iterations,
        log_level="WARNING",
        timeout_s=60,
        moevement=dict(fields, replication_factor=1, faults=[fault]),
    )
    agent = run_elastic_job(
        spec, out / "recovered", timeout=args.timeout, spares=1, check_faults=False
    )
    try:  # a fault that never fired would make this a fault-free run claiming a recovery
        check_faults_fired([fault], out / "recovered", agent.failures)
    except AssertionError as exc:
        print(f"  FAILED: {exc}", flush=True)
        return 1
    for f in agent.failures:
        print(
            f"  agent: rank {f['rank']} (pid {f['pid']}) died with code {f['code']}; spare "
            f"process {f['spare']} took it (generation {f['generation']})"
        )
    print("  recovery report:")
    print(
        f"  {'rank':>4} {'spare':>5} {'scope':>6} {'from':>8} {'replayed':>14} "
        f"{'detect':>7} {'rebuild':>7} {'fetch':>7} {'replay':>7}"
    )
    for rank in range(world):
        rep = json.loads((out / "recovered" / f"recovery_rank{rank}.json").read_text())
        for r in rep["reports"]:
            t = r["times_s"]
            replayed = ",".join(str(i) for i in r["iterations_replayed"]) or "-"
            # Where the rolled-back state came from: the state after iteration N, or the
            # job's initial state (a failure before the first checkpoint persisted).
            source = "initial" if r["tier"] == "initial-state" else f"it {r['window_start']}"
            if rank not in r["scope_ranks"]:
                source = "live"  # outside the scope: kept its own state, replayed nothing
            print(
                f"  {rank:>4} {str(r['spare']):>5} {r['scope']:>6} {source:>8} "
                f"{replayed:>14} {t['detect']:>6.3f}s {t['rebuild']:>6.3f}s "
                f"{t['fetch']:>6.3f}s {t['replay']:>6.3f}s"
            )
    moc = baseline is not None and baseline.strategy == "moc"
    print(
        (
            "[3/3] comparison with the fault-free run (MoC loses tokens: not expected to be "
            "bitwise equal)"
            if moc
            else "[3/3] bitwise check against the fault-free run"
        ),
        flush=True,
    )
    compared, differing = 0, []
    for rank in range(world):
        a = torch.load(out / "fault_free" / f"state_rank{rank}.pt")
        b = torch.load(out / "recovered" / f"state_rank{rank}.pt")
        for key in a:
            compared += 1
            if key not in b or not torch.equal(
                a[key].reshape(-1).view(torch.uint8), b[key].reshape(-1).view(torch.uint8)
            ):
                differing.append(f"rank {rank} {key}")
    if moc:
        return _moc_verdict(out, world, compared, differing)
    if differing:
        print(f"  MISMATCH: {len(differing)} of {compared} tensors differ, e.g. {differing[:3]}")
        return 1
    print(
        f"  bitwise equal: all {compared} tensors (params, FP32 main params, optimizer "
        f"moments, steps, buffers, RNG states) on {world} ranks. Outputs in {out}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``moevement-train`` command line (subcommands ``train`` and ``demo``)."""
    parser = argparse.ArgumentParser(
        prog="moevement-train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train the harness model and print the loss")
    _add_model_args(train)
    train.set_defaults(func=_train)
    demo = sub.add_parser("demo", help="train, SIGKILL a rank, recover, check bitwise")
    _add_model_args(demo)
    demo.add_argument(
        "--strategy",
        choices=CKPT_STRATEGIES,
        default="moevement",
        help="moevement (default), or the gemini / moc baseline (docs/baselines.md)",
    )
    demo.add_argument(
        "--window-size",
        type=POSITIVE_INT,
        default=None,
        help=f"MoEvement window W (default: {DEMO_WINDOW_SIZE}; moevement only)",
    )
    add_baseline_args(demo, DEMO_BASELINE_DEFAULTS)
    demo.add_argument("--kill-rank", type=NON_NEGATIVE_INT, default=1)
    demo.add_argument("--kill-iteration", type=NON_NEGATIVE_INT, default=7)
    demo.add_argument(
        "--phase",
        default="microbatch2",
        help="where the victim dies: before | microbatch<k> | backward<k> | optimizer_step | "
        "after_step | after_snapshot (k < the number of microbatches)",
    )
    demo.set_defaults(func=_demo, iterations=10, distributed_optimizer=True)
    mlm = sub.add_parser(
        "megatron-lm",
        help="Megatron-LM's pretrain_gpt.py end to end: fault-free, SIGKILL a rank, recover in "
        "memory inside its loop, check bitwise",
    )
    mlm.add_argument(
        "megatron_lm",
        type=Path,
        help="a Megatron-LM checkout at core_v0.16.1 (copied and patched, not changed)",
    )
    mlm.add_argument("--iterations", type=POSITIVE_INT, default=8, help="--train-iters")
    mlm.add_argument("--window-size", type=POSITIVE_INT, default=2)
    mlm.add_argument("--kill-rank", type=NON_NEGATIVE_INT, default=1, help="rank 0-3")
    mlm.add_argument("--kill-iteration", type=NON_NEGATIVE_INT, default=4, help="0-based iteration")
    mlm.add_argument(
        "--phase",
        default="microbatch1",
        help="where the victim dies: before | microbatch<k> (k < 2) | after_step | after_snapshot",
    )
    mlm.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="keep the patched tree, logs and checkpoints here (default: a temporary folder)",
    )
    mlm.add_argument("--timeout", type=POSITIVE_FLOAT, default=900.0)
    mlm.set_defaults(func=_megatron_lm)
    return parser


def _megatron_lm(args: argparse.Namespace) -> int:
    from megatron_moevement.harness.megatron_lm import run_recovery_demo

    if args.kill_rank > 3:
        raise SystemExit(f"--kill-rank {args.kill_rank}: the job has ranks 0-3")
    if args.kill_iteration >= args.iterations:
        raise SystemExit(
            f"--kill-iteration {args.kill_iteration} is not below --iterations {args.iterations}"
        )
    try:
        validate_faults(
            [{"rank": args.kill_rank, "iteration": args.kill_iteration, "phase": args.phase}],
            4,
            args.iterations,
            2,
        )
    except FaultSpecError as exc:
        raise SystemExit(str(exc)) from None
    if not (args.megatron_lm / "pretrain_gpt.py").is_file():
        raise SystemExit(
            f"{args.megatron_lm} is not a Megatron-LM tree (no pretrain_gpt.py). Fix: pass a "
            "checkout of NVIDIA/Megatron-LM at core_v0.16.1."
        )
    with tempfile.TemporaryDirectory(prefix="moevement-megatron-lm-") as tmp:
        out = args.output_dir or Path(tmp)
        result = run_recovery_demo(
            args.megatron_lm,
            out,
            victim=args.kill_rank,
            iteration=args.kill_iteration,
            phase=args.phase,
            iterations=args.iterations,
            window=str(args.window_size),
            timeout=args.timeout,
            progress=lambda message: print(f"[megatron-lm] {message}", flush=True),
        )
    for failure in result["failures"]:
        print(
            f"rank {failure['rank']} died (exit {failure['code']}); spare process "
            f"{failure['spare']} took it in generation {failure['generation']}"
        )
    for rank, reports in sorted(result["reports"].items()):
        for r in reports:
            times = " ".join(f"{k} {v:.2f}s" for k, v in r.get("times_s", {}).items())
            print(
                f"rank {rank}: {r['path']} recovery of ranks {r.get('scope_ranks')} "
                f"({r.get('tier')}), replayed {[i + 1 for i in r.get('iterations_replayed', [])]}"
                f"{' (spare)' if r.get('spare') else ''}; {times}"
            )
    print(f"log lines equal to the fault-free run's: {result['log_lines_equal']}")
    if result["bitwise_equal"]:
        print(
            f"bitwise equal: all {result['entries']} entries of Megatron's final checkpoint "
            "(model, distributed optimizer, RNG, scheduler, counters)"
        )
    else:
        print(
            f"NOT bitwise equal: {len(result['differing'])} entries differ, e.g. "
            f"{result['differing'][:5]}"
        )
    return 0 if result["bitwise_equal"] and result["log_lines_equal"] else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
