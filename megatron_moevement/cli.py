"""``moevement-train``: run the local CPU harness from the command line.

Subcommands:

* ``train``: trains the small Megatron-Core MoE GPT on N local processes (gloo) and prints the
  loss of every iteration.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from megatron_moevement.harness.launcher import run_worker_job
from megatron_moevement.harness.layout import ParallelLayout
from megatron_moevement.harness.model import TinyMoEConfig
from megatron_moevement.harness.worker import WorkerSpec


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layout", default="pp2xdp2xep2", help="e.g. single, ep2, pp2xdp2xep2")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="bf16")
    parser.add_argument("--distributed-optimizer", action="store_true")
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--num-experts", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="keep logs and state dumps here (default: a temporary folder)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before giving up")


def _train(args: argparse.Namespace) -> int:
    layout = ParallelLayout.parse(args.layout)
    model = TinyMoEConfig(
        num_layers=args.num_layers,
        num_experts=args.num_experts,
        hidden_size=args.hidden_size,
        precision=args.precision,
        use_distributed_optimizer=args.distributed_optimizer,
    )
    out = args.output_dir or Path(tempfile.mkdtemp(prefix="moevement-train-"))
    print(f"training {args.iterations} iterations on {layout.world_size} CPU processes "
          f"({layout}), logs in {out / 'logs'}", flush=True)
    spec = WorkerSpec(layout=layout.to_dict(), model=model.to_dict(), iterations=args.iterations)
    run_worker_job(spec, out, timeout=args.timeout)
    last_rank = layout.world_size - 1
    results = json.loads((out / f"result_rank{last_rank}.json").read_text())
    print(f"{'iteration':>9}  {'loss':>10}  {'grad norm':>10}")
    for row in results:
        print(f"{row['iteration']:>9}  {row['loss']:>10.6f}  {row['grad_norm']:>10.6f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moevement-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train the harness model and print the loss")
    _add_model_args(train)
    train.set_defaults(func=_train)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
