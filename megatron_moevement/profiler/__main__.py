"""``python -m megatron_moevement.profiler``: profile the harness model, write the profile JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from megatron_moevement.argtypes import NON_NEGATIVE_INT, POSITIVE_INT
from megatron_moevement.logging_utils import configure_logging
from megatron_moevement.profiler.run import profile_harness


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layout", default="pp2xdp2xep2", help="e.g. pp2xdp2xep2, ep2, 1")
    parser.add_argument(
        "--model", default="{}", help='TinyMoEConfig fields as JSON, e.g. \'{"precision": "bf16"}\''
    )
    parser.add_argument(
        "--iterations",
        type=POSITIVE_INT,
        default=8,
        help="iterations per measurement (plain, instrumented, frozen)",
    )
    parser.add_argument("--warmup", type=NON_NEGATIVE_INT, default=3)
    parser.add_argument("--output", type=Path, default=Path("results/profile.json"))
    args = parser.parse_args(argv)
    configure_logging("WARNING")
    profile = profile_harness(
        args.layout, json.loads(args.model), args.iterations, args.warmup, args.output
    )
    print(
        f"{'stage':>5} {'fwd ms':>8} {'in-grad ms':>11} {'w-grad ms':>10} {'opt ms':>7} "
        f"{'sync ms':>8} {'p2p ms':>7}"
    )
    for s, st in enumerate(profile.stages):
        print(
            f"{s:>5} {1e3 * st.forward_s:>8.2f} {1e3 * st.backward_s:>11.2f} "
            f"{1e3 * st.weight_grad_s:>10.2f} {1e3 * st.optimizer_s:>7.2f} "
            f"{1e3 * st.grad_sync_s:>8.2f} {1e3 * st.p2p_s:>7.3f}"
        )
    m = profile.metadata["measurements"]
    print(
        f"iteration {m['iteration_s']:.4f} s, snapshot {m['snapshot_bandwidth'] / 1e9:.2f} GB/s,"
        f" replication {m['replication_bandwidth'] / 1e9:.2f} GB/s, restart {m['restart_s']:.3f} s"
    )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
