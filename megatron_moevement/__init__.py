"""megatron-moevement: MoEvement fault tolerance for Megatron-Core MoE training.

Sparse in-memory checkpointing, sparse-to-dense reconstruction and localized recovery, after
"MoEvement" (see ``docs/``). The object a training loop talks to is ``MoEvementStrategy``; the
rest of the package hides behind it.

Importing this package never imports Megatron-Core, Transformer Engine or apex eagerly, so the
simulator and the pure-Python parts work without them.
"""

__version__ = "0.1.0"
