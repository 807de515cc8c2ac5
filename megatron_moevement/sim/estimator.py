"""Analytic per-stage cost estimate from FLOPs, bandwidths and an achieved TFLOP/s.

For configurations too large to profile (the paper's 671B scaling run, §5.4) the simulator
estimates a :class:`~megatron_moevement.sim.profile.StageProfile` from first principles:

* matmul FLOPs of a micro-batch: ``2 * tokens * sum(params_o * activation_o)`` over the
  stage's operators (routed experts weighted by the tokens routed to them), plus the
  attention core ``4 * tokens * seq * h`` per layer; forward = 1x, input-gradient = 1x
  (attention core 2x), weight-gradient = 1x of the matmul part;
* divided over the stage's ``ep * tp`` GPUs at ``tflops_per_gpu`` achieved TFLOP/s;
* expert-parallel all-to-all (dispatch + combine per MoE layer and direction) over NVLink when
  the EP group fits in a node, tensor-parallel all-reduces over NVLink, stage-boundary p2p and
  data-parallel gradient reduction over the node's network share;
* the optimizer step as memory-bound traffic of its parameter shard.

This is an estimate, not a measurement: use a measured profile (``load_profile``) whenever one
exists.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

from megatron_moevement.logging_utils import get_logger
from megatron_moevement.sim._validation import check_fraction, check_real, from_mapping
from megatron_moevement.sim.operators import build_stage_operators
from megatron_moevement.sim.profile import StageProfile, StageTimes
from megatron_moevement.sim.specs import ClusterSpec, ModelSpec, ParallelPlan

__all__ = ["ComputeSpec", "estimate_profile", "model_flops_per_token"]

logger = get_logger(__name__)


@dataclass(frozen=True)
class ComputeSpec:
    """Achieved compute rates used by the analytic estimator."""

    tflops_per_gpu: float
    """Achieved dense-matmul throughput per GPU in TFLOP/s (peak x model-FLOPs utilization,
    e.g. 312 x 0.45 ~ 140 for A100 BF16)."""

    grad_sync_exposed_fraction: float = 0.3
    """Fraction of the data-parallel gradient reduction not hidden behind the backward pass."""

    optimizer_bytes_per_param: float = 32.0
    """HBM traffic of the optimizer step per parameter (Adam reads/writes master weights, two
    moments, the gradient and the compute weights)."""

    def __post_init__(self) -> None:
        check_real("ComputeSpec", "tflops_per_gpu", self.tflops_per_gpu)
        check_fraction("ComputeSpec", "grad_sync_exposed_fraction", self.grad_sync_exposed_fraction)
        check_real("ComputeSpec", "optimizer_bytes_per_param", self.optimizer_bytes_per_param)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ComputeSpec":
        """Builds the spec from a dict."""
        return from_mapping(cls, data)

    def to_dict(self) -> Dict[str, Any]:
        """Returns the JSON-ready field dict."""
        return dataclasses.asdict(self)


def model_flops_per_token(model: ModelSpec) -> float:
    """Training FLOPs per token (forward + backward, 6 x active matmul params + attention)."""
    matmul = model.active_params - model.embedding_params
    attention_core = 4.0 * model.seq_length * model.hidden_size * model.num_layers
    return 6.0 * matmul + 3.0 * attention_core


def estimate_profile(
    model: ModelSpec,
    cluster: ClusterSpec,
    plan: ParallelPlan,
    compute: ComputeSpec,
    popularity_skew: float = 0.0,
    operators: Optional[list] = None,
) -> StageProfile:
    """Estimates per-stage costs analytically.

    Args:
        model: Architecture and precision.
        cluster: Hardware.
        plan: Parallel plan (m micro-batches of ``micro_batch_size`` samples).
        compute: Achieved TFLOP/s and overlap assumptions.
        popularity_skew: Expert popularity skew (does not change FLOPs with balanced EP ranks;
            kept for a consistent operator list).
        operators: Precomputed :func:`build_stage_operators` result (optional).

    Returns:
        A profile with ``source="analytic"``.
    """
    ops = operators or build_stage_operators(model, plan, popularity_skew)
    flops_rate = compute.tflops_per_gpu * 1e12
    gpus = plan.ep * plan.tp
    tokens = plan.micro_batch_size * model.seq_length
    act = model.precision.activation_bytes
    h = model.hidden_size
    counts = plan.stage_layer_counts(model.num_layers)
    net_per_gpu = cluster.network_bandwidth_per_gpu
    ep_bw = cluster.intra_node_bandwidth if gpus <= cluster.gpus_per_node else net_per_gpu
    grad_bytes = model.precision.master_weight_bytes

    stages = []
    layer = 0
    for s, stage_ops in enumerate(ops):
        n_layers = counts[s]
        moe_layers = sum(1 for i in range(layer, layer + n_layers) if i >= model.num_dense_layers)
        layer += n_layers
        # wgrad_work = params x activation share, 0 for the embedding (a lookup, no matmul).
        matmul = 2.0 * tokens * float(stage_ops.wgrad_work.sum())
        core = 4.0 * tokens * model.seq_length * h * n_layers
        fwd = (matmul + core) / gpus / flops_rate
        bwd_input = (matmul + 2.0 * core) / gpus / flops_rate
        wgrad = matmul / gpus / flops_rate

        # Expert-parallel all-to-all: dispatch + combine of top-k copies of each token.
        a2a = 0.0
        if plan.ep > 1 and moe_layers:
            per_gpu = tokens / gpus * model.top_k * h * act * 2.0 * (plan.ep - 1) / plan.ep
            a2a = moe_layers * per_gpu / ep_bw
        tp_comm = 0.0
        if plan.tp > 1:
            per_layer = 2.0 * tokens * h * act * 2.0 * (plan.tp - 1) / plan.tp
            tp_comm = n_layers * per_layer / plan.ep / cluster.intra_node_bandwidth
        p2p = 0.0 if plan.pp == 1 else tokens * h * act / gpus / net_per_gpu

        ne_per_gpu = stage_ops.nonexpert_params / plan.tp
        ex_per_gpu = stage_ops.expert_params / (plan.tp * plan.ep)
        ne_ranks = plan.dp * plan.ep
        sync = 0.0
        if ne_ranks > 1:
            sync += 2.0 * (ne_ranks - 1) / ne_ranks * ne_per_gpu * grad_bytes / net_per_gpu
        if plan.dp > 1:
            sync += 2.0 * (plan.dp - 1) / plan.dp * ex_per_gpu * grad_bytes / net_per_gpu
        shard = stage_ops.total_params / (plan.tp * plan.ep * plan.dp)
        optimizer = shard * compute.optimizer_bytes_per_param / cluster.hbm_bandwidth
        stages.append(
            StageTimes(
                forward_s=fwd + a2a + tp_comm,
                backward_s=bwd_input + a2a + tp_comm,
                weight_grad_s=wgrad,
                optimizer_s=optimizer,
                grad_sync_s=sync * compute.grad_sync_exposed_fraction,
                p2p_s=p2p,
            )
        )
    logger.debug(
        "analytic profile for %s: %d stages, slowest micro-batch %.4fs",
        model.name,
        len(stages),
        max(st.microbatch_s for st in stages),
    )
    expert_share = sum(o.expert_params for o in ops) / max(1.0, sum(o.total_params for o in ops))
    return StageProfile(
        stages=tuple(stages),
        micro_batch_size=plan.micro_batch_size,
        seq_length=model.seq_length,
        source="analytic",
        metadata={
            "model": model.name,
            "tflops_per_gpu": compute.tflops_per_gpu,
            "expert_param_share": round(expert_share, 4),
        },
    )
