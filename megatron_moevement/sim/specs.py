"""Input specifications of the ETTR simulator: precision, model, cluster and parallel plan.

These mirror the four inputs of the paper's simulator (Appendix C): a training-job
specification (:class:`ModelSpec` with its :class:`Precision`), a cluster configuration
(:class:`ClusterSpec`) and a parallelization plan (:class:`ParallelPlan`); the fourth input,
the MTBF, is passed to the simulator per run.

Conventions (the paper's, §5.1 and §5.4): a job uses ``tp * pp * dp * ep`` GPUs. A pipeline
stage is held by an expert-parallel group of ``ep * tp`` GPUs that process every micro-batch
together (experts split across the ``ep`` ranks, dense parts sharded by ``tp`` and the tokens
of a micro-batch split across the ``ep`` ranks); ``dp`` such pipelines run side by side. In
Megatron-Core terms ``data_parallel_size = dp * ep`` and ``expert_model_parallel_size = ep``.
All quantities are SI: seconds, bytes, bytes per second.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

from megatron_moevement.sim._validation import (
    SimSpecError,
    check_int,
    check_real,
    fail,
    from_mapping,
)
from megatron_moevement.sim.units import parse_bandwidth

__all__ = ["PRECISIONS", "ClusterSpec", "ModelSpec", "ParallelPlan", "Precision", "get_precision"]


@dataclass(frozen=True)
class Precision:
    """Bytes per parameter of each part of the training state (paper §3.2, §5.7, Table 7)."""

    name: str = "fp16-fp32"
    """Label of the recipe, e.g. ``"bf16-fp32"`` or ``"fp8-fp16-fp8+fp16"``."""

    compute_weight_bytes: float = 2.0
    """Bytes per parameter of the compute (model) weights used in forward/backward: 2 for
    FP16/BF16, 1 for FP8. A frozen operator's sparse snapshot holds only these."""

    master_weight_bytes: float = 4.0
    """Bytes per parameter of the master weights kept by the optimizer (4 for FP32)."""

    optimizer_state_bytes: float = 8.0
    """Bytes per parameter of all optimizer state together (Adam: two moments, 4 + 4 for
    FP32+FP32, 1 + 2 for FP8+FP16)."""

    activation_bytes: float = 2.0
    """Bytes per element of activations/gradients sent between pipeline stages (upstream logs
    and p2p traffic)."""

    def __post_init__(self) -> None:
        owner = "Precision"
        for name in (
            "compute_weight_bytes",
            "master_weight_bytes",
            "optimizer_state_bytes",
            "activation_bytes",
        ):
            check_real(owner, name, getattr(self, name))

    @property
    def full_state_bytes(self) -> float:
        """Bytes per parameter of an active operator's snapshot: master weights + optimizer."""
        return self.master_weight_bytes + self.optimizer_state_bytes

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Precision":
        """Builds a precision from a dict, or from a preset name given as a string."""
        if isinstance(data, str):
            return get_precision(data)
        return from_mapping(cls, data)

    def to_dict(self) -> Dict[str, Any]:
        """Returns the JSON-ready field dict."""
        return dataclasses.asdict(self)


PRECISIONS: Dict[str, Precision] = {
    p.name: p
    for p in (
        Precision("fp16-fp32", 2, 4, 8),
        Precision("bf16-fp32", 2, 4, 8),
        # The five low-precision recipes of the paper's Table 7 (compute / master / optimizer).
        Precision("fp16-fp16-fp16x2", 2, 2, 4),
        Precision("fp8-fp32-fp32x2", 1, 4, 8),
        Precision("fp8-fp16-fp32x2", 1, 2, 8),
        Precision("fp8-fp16-fp8+fp16", 1, 2, 3),
        Precision("fp8-fp8-fp8+fp16", 1, 1, 3),
    )
}
"""Built-in precision recipes by name (the paper's default mixed precision and Table 7)."""


def get_precision(name: str) -> Precision:
    """Returns the built-in precision recipe ``name``.

    Raises:
        SimSpecError: If the name is unknown.
    """
    try:
        return PRECISIONS[name]
    except KeyError:
        raise SimSpecError(f"unknown precision {name!r}; known: {sorted(PRECISIONS)}") from None


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of a (MoE) transformer, enough to count parameters, FLOPs and operators."""

    name: str
    """Model label used in reports."""

    num_layers: int
    """Number of transformer layers."""

    hidden_size: int
    """Model (residual stream) width h."""

    num_experts: int
    """Routed experts per MoE layer (1 with ``top_k=1`` and no shared experts = dense FFN)."""

    top_k: int
    """Routed experts activated per token."""

    expert_ffn_hidden_size: int
    """Hidden width of one routed (and shared) expert's FFN."""

    vocab_size: int
    """Vocabulary size (embedding and output-layer rows)."""

    seq_length: int
    """Tokens per sample."""

    num_shared_experts: int = 0
    """Always-active shared experts per MoE layer (DeepSeek-MoE style), same width as routed."""

    num_dense_layers: int = 0
    """Leading layers with a dense FFN instead of an MoE block (e.g. 3 in DeepSeek-V3)."""

    dense_ffn_hidden_size: Optional[int] = None
    """FFN width of the dense layers; required when ``num_dense_layers > 0``."""

    gated_linear_unit: bool = True
    """True for SwiGLU-style FFNs (3 weight matrices), False for 2-matrix MLPs."""

    attention_params_per_layer: Optional[int] = None
    """Parameters of one attention block; ``None`` means ``4 * h * h`` (Q, K, V, O). Set it for
    GQA or MLA attention (DeepSeek-V3's MLA is about 187M per layer)."""

    extra_nonexpert_params: int = 0
    """Further dense parameters on the first stage (e.g. a vision encoder and projector)."""

    untie_embeddings: bool = True
    """True when the output layer has its own weights (not tied to the input embedding)."""

    precision: Precision = dataclasses.field(default_factory=Precision)
    """Bytes per parameter of compute weights, master weights and optimizer state."""

    def __post_init__(self) -> None:
        owner = "ModelSpec"
        if not isinstance(self.precision, Precision):
            object.__setattr__(self, "precision", Precision.from_dict(self.precision))
        for name in (
            "num_layers",
            "hidden_size",
            "num_experts",
            "top_k",
            "expert_ffn_hidden_size",
            "vocab_size",
            "seq_length",
        ):
            check_int(owner, name, getattr(self, name))
        check_int(owner, "num_shared_experts", self.num_shared_experts, minimum=0)
        check_int(owner, "num_dense_layers", self.num_dense_layers, minimum=0)
        check_int(owner, "extra_nonexpert_params", self.extra_nonexpert_params, minimum=0)
        if self.top_k > self.num_experts:
            fail(owner, "top_k", self.top_k, "exceeds num_experts", "use top_k <= num_experts")
        if self.num_dense_layers > self.num_layers:
            fail(
                owner,
                "num_dense_layers",
                self.num_dense_layers,
                "exceeds num_layers",
                "use num_dense_layers <= num_layers",
            )
        if self.num_dense_layers and self.dense_ffn_hidden_size is None:
            fail(
                owner,
                "dense_ffn_hidden_size",
                None,
                "is required when num_dense_layers > 0",
                "give the dense FFN width",
            )
        if self.dense_ffn_hidden_size is not None:
            check_int(owner, "dense_ffn_hidden_size", self.dense_ffn_hidden_size)
        if self.attention_params_per_layer is not None:
            check_int(owner, "attention_params_per_layer", self.attention_params_per_layer)

    # ----- parameter counts -------------------------------------------------------------

    @property
    def ffn_matrices(self) -> int:
        """Weight matrices per FFN: 3 with a gated linear unit, else 2."""
        return 3 if self.gated_linear_unit else 2

    @property
    def attention_params(self) -> int:
        """Parameters of one attention block (plus its norms, which are negligible)."""
        if self.attention_params_per_layer is not None:
            return self.attention_params_per_layer
        return 4 * self.hidden_size * self.hidden_size

    @property
    def expert_params(self) -> int:
        """Parameters of one routed or shared expert."""
        return self.ffn_matrices * self.hidden_size * self.expert_ffn_hidden_size

    @property
    def gate_params(self) -> int:
        """Parameters of one router (gate)."""
        return self.hidden_size * self.num_experts

    @property
    def dense_ffn_params(self) -> int:
        """Parameters of the FFN of one dense layer (0 when there are none)."""
        if not self.num_dense_layers:
            return 0
        return self.ffn_matrices * self.hidden_size * int(self.dense_ffn_hidden_size or 0)

    @property
    def num_moe_layers(self) -> int:
        """Layers with an MoE block."""
        return self.num_layers - self.num_dense_layers

    @property
    def embedding_params(self) -> int:
        """Parameters of the input embedding."""
        return self.vocab_size * self.hidden_size

    @property
    def output_params(self) -> int:
        """Parameters of the output layer (0 when tied to the embedding)."""
        return self.vocab_size * self.hidden_size if self.untie_embeddings else 0

    @property
    def total_params(self) -> int:
        """All parameters of the model."""
        per_moe = (
            self.attention_params
            + self.gate_params
            + (self.num_experts + self.num_shared_experts) * self.expert_params
        )
        per_dense = self.attention_params + self.dense_ffn_params
        return (
            self.num_moe_layers * per_moe
            + self.num_dense_layers * per_dense
            + self.embedding_params
            + self.output_params
            + self.extra_nonexpert_params
        )

    @property
    def active_params(self) -> int:
        """Parameters that one token passes through (top-k routed plus shared experts)."""
        per_moe = (
            self.attention_params
            + self.gate_params
            + (self.top_k + self.num_shared_experts) * self.expert_params
        )
        per_dense = self.attention_params + self.dense_ffn_params
        return (
            self.num_moe_layers * per_moe
            + self.num_dense_layers * per_dense
            + self.embedding_params
            + self.output_params
            + self.extra_nonexpert_params
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelSpec":
        """Builds a model spec from a dict (``precision`` may be a dict or a preset name)."""
        return from_mapping(cls, data, nested={"precision": Precision.from_dict})

    def to_dict(self) -> Dict[str, Any]:
        """Returns the JSON-ready field dict."""
        return dataclasses.asdict(self)


_BANDWIDTH_FIELDS = (
    "d2h_bandwidth",
    "h2d_bandwidth",
    "inter_node_bandwidth",
    "storage_bandwidth",
    "intra_node_bandwidth",
    "hbm_bandwidth",
)


@dataclass(frozen=True)
class ClusterSpec:
    """Hardware of the training cluster, as it affects compute, checkpoint I/O and recovery."""

    num_gpus: int
    """GPUs in the job."""

    gpus_per_node: int
    """GPUs per node (they share the node's NICs)."""

    d2h_bandwidth: float
    """Effective device-to-host copy bandwidth per GPU (bytes/s) *while training runs*, i.e.
    what a checkpoint snapshot achieves when overlapped with forward/backward — usually far
    below the PCIe peak. Algorithm 1 of the paper sizes the sparse window with it."""

    inter_node_bandwidth: float
    """Network bandwidth per node (bytes/s), all NICs together (80 Gbps in the paper's §5.1)."""

    storage_bandwidth: float
    """Aggregate bandwidth to durable storage for the whole job (bytes/s), used by CheckFreq's
    persist phase and its recovery (40 Gbps to Azure Blob in §5.1)."""

    h2d_bandwidth: float = 10e9
    """Host-to-device bandwidth per GPU (bytes/s) for restoring state from host memory during
    a recovery, when training is paused (PCIe, not contended)."""

    intra_node_bandwidth: float = 150e9
    """Per-GPU NVLink bandwidth (bytes/s) for expert-parallel all-to-all inside a node."""

    hbm_bandwidth: float = 1.5e12
    """GPU memory bandwidth (bytes/s); bounds the memory-bound optimizer step."""

    name: str = "cluster"
    """Label used in reports."""

    def __post_init__(self) -> None:
        owner = "ClusterSpec"
        check_int(owner, "num_gpus", self.num_gpus)
        check_int(owner, "gpus_per_node", self.gpus_per_node)
        for name in _BANDWIDTH_FIELDS:
            check_real(owner, name, getattr(self, name))

    @property
    def num_nodes(self) -> int:
        """Nodes in the job (rounded up)."""
        return -(-self.num_gpus // self.gpus_per_node)

    @property
    def network_bandwidth_per_gpu(self) -> float:
        """Each GPU's share of its node's network bandwidth (bytes/s)."""
        return self.inter_node_bandwidth / self.gpus_per_node

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ClusterSpec":
        """Builds a cluster spec; bandwidths may be numbers (bytes/s) or strings like "80Gbps"."""
        if not isinstance(data, Mapping):
            raise SimSpecError(f"ClusterSpec must be a JSON object, got {type(data).__name__}")
        values = dict(data)
        for name in _BANDWIDTH_FIELDS:
            if isinstance(values.get(name), str):
                values[name] = parse_bandwidth(values[name])
        return from_mapping(cls, values)

    def to_dict(self) -> Dict[str, Any]:
        """Returns the JSON-ready field dict."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ParallelPlan:
    """Parallelization of the job (paper Appendix C input 3)."""

    pp: int
    """Pipeline-parallel stages p."""

    dp: int
    """Data-parallel pipelines (the paper's DP degree; see the module docstring)."""

    ep: int
    """Expert-parallel degree: GPUs sharing one stage's experts and micro-batches."""

    num_microbatches: int
    """Micro-batches per iteration per pipeline (m)."""

    micro_batch_size: int
    """Samples per micro-batch."""

    tp: int = 1
    """Tensor-parallel degree."""

    virtual_pipeline_stages: int = 1
    """Model chunks per stage for the interleaved 1F1B schedule (1 = plain 1F1B)."""

    layers_per_stage: Optional[tuple] = None
    """Explicit layer counts per stage (length ``pp``); ``None`` splits the layers as evenly as
    possible, the remainder going to the earlier stages."""

    def __post_init__(self) -> None:
        owner = "ParallelPlan"
        for name in ("pp", "dp", "ep", "tp", "num_microbatches", "micro_batch_size"):
            check_int(owner, name, getattr(self, name))
        check_int(owner, "virtual_pipeline_stages", self.virtual_pipeline_stages)
        if self.layers_per_stage is not None:
            layers = tuple(self.layers_per_stage)
            object.__setattr__(self, "layers_per_stage", layers)
            if len(layers) != self.pp:
                fail(
                    owner,
                    "layers_per_stage",
                    layers,
                    f"has {len(layers)} entries for pp={self.pp}",
                    "give one layer count per stage",
                )
            for count in layers:
                check_int(owner, "layers_per_stage[i]", count, minimum=0)

    @property
    def num_gpus(self) -> int:
        """GPUs the plan uses: ``tp * pp * dp * ep``."""
        return self.tp * self.pp * self.dp * self.ep

    @property
    def gpus_per_stage_replica(self) -> int:
        """GPUs holding one stage of one pipeline: ``tp * ep``."""
        return self.tp * self.ep

    def stage_layer_counts(self, num_layers: int) -> tuple:
        """Layers held by each stage (explicit split, or as even as possible)."""
        if self.layers_per_stage is not None:
            if sum(self.layers_per_stage) != num_layers:
                raise SimSpecError(
                    f"ParallelPlan.layers_per_stage sums to {sum(self.layers_per_stage)} but the "
                    f"model has {num_layers} layers. Fix: make the counts add up."
                )
            return tuple(self.layers_per_stage)
        base, extra = divmod(num_layers, self.pp)
        return tuple(base + (1 if s < extra else 0) for s in range(self.pp))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ParallelPlan":
        """Builds a plan from a dict."""
        return from_mapping(cls, data)

    def to_dict(self) -> Dict[str, Any]:
        """Returns the JSON-ready field dict."""
        out = dataclasses.asdict(self)
        if out["layers_per_stage"] is not None:
            out["layers_per_stage"] = list(out["layers_per_stage"])
        return out
