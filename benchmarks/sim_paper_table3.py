"""Simulator vs the MoEvement paper's Table 3 (or Table 7): ETTR side by side, with deviations.

For every published row (model, MTBF, strategy) it prints the paper's ETTR, the ETTR the
simulator's formula gives for the row's *published* overhead and recovery time ("fed"), and
the ETTR of the simulator run end to end on the matching preset ("model"), each with its
deviation from the paper; then max/mean absolute deviations. Writes the whole comparison as
JSON.

    python benchmarks/sim_paper_table3.py                      # results/sim_table3.json
    python benchmarks/sim_paper_table3.py --table 7 --output results/sim_table7.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _results import write_results

from megatron_moevement.logging_utils import configure_logging
from megatron_moevement.sim.paper_compare import compare_with_paper, format_comparison


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--table", choices=("3", "7"), default="3")
    parser.add_argument("--output", type=Path, default=None, help="JSON output path")
    parser.add_argument("--no-model", action="store_true", help="only the fed column")
    args = parser.parse_args()
    configure_logging("WARNING")
    output = args.output or Path(f"results/sim_table{args.table}.json")
    comparison = compare_with_paper(args.table, include_model=not args.no_model)
    print(format_comparison(comparison))
    write_results(output, comparison.to_dict(), indent=2)


if __name__ == "__main__":
    main()
