"""``python -m megatron_moevement.sim`` runs the simulator CLI."""

import sys

from megatron_moevement.sim.cli import main

sys.exit(main())
