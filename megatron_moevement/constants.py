"""The names the package agrees on, defined once (torch-free, importable from anywhere).

Every module that validates or lists one of these imports it from here, so that a new operator
kind, checksum or strategy is added in one place.
"""

from __future__ import annotations

OPERATOR_KINDS = ("embedding", "dense", "router", "expert", "output")
"""Kinds of checkpointable operators, in model order (see
:mod:`megatron_moevement.state.operators`): the input embedding, a layer's non-expert part,
its router, one expert, the output layer."""

ORDERING_POLICIES = ("hard_count", "soft_count", "ema", "capacity_normalized")
"""Built-in operator-ordering policies (see :mod:`megatron_moevement.schedule.popularity`);
more can be registered at runtime."""

CHECKSUM_ALGORITHMS = ("crc32c", "crc32", "sha256")
"""Checksums over the raw bytes of snapshot tensors
(:func:`megatron_moevement.snapshot.checksum.checksum`)."""

DEFAULT_CHECKSUM = "crc32c"
"""The checksum snapshots are written with: CRC32C through the ``crc32c`` package (hardware
instructions, and the GIL released while it hashes, so the copy thread's checksum does not stop
the training thread; ``google-crc32c`` gives the same values). Every slot, replica and durable
file records its algorithm, so snapshots written with another one still verify."""

BASELINE_STRATEGIES = ("gemini", "moc")
"""Baseline checkpointing policies: dense in-memory snapshots every k iterations (Gemini-like),
partial expert checkpointing (MoC-like)."""

CKPT_STRATEGIES = ("moevement", *BASELINE_STRATEGIES)
"""Every in-memory checkpointing strategy :func:`megatron_moevement.build_strategy` builds."""

MEGATRON_CKPT_STRATEGIES = ("default", *CKPT_STRATEGIES)
"""Values of Megatron-LM's ``--ckpt-strategy``: ``default`` leaves Megatron-LM unchanged."""

FULL_STATE_BYTES_PER_PARAM = 12
"""Bytes per parameter of an operator's full state as the schedule sizes it: FP32 main
parameter (4) and two FP32 Adam moments (8). A rank-independent size, so that every replica of
a stage cuts the same slices whatever its optimizer shard holds."""


ELASTIC_ENV = "MOEVEMENT_ELASTIC"
"""Set to ``1`` by the agents (local ``ElasticAgent``, SLURM task agents) whose job store and
coordinator let a worker take over a failed rank and recover in memory."""
REPORT_DIR_ENV = "MOEVEMENT_REPORT_DIR"
"""Folder where each rank of a Megatron-LM job appends its recovery reports
(``recovery_rank<R>.jsonl``)."""
