"""Built-in scenarios: the paper's evaluated models and its scaling configurations.

* ``moe-llava``, ``gpt-moe``, ``qwen-moe``, ``deepseek-moe`` — the four models of Table 2 on
  the Azure cluster of §5.1 (12 nodes x 8 A100-80GB, 80 Gbps per node, 40 Gbps aggregate to
  Blob storage) with the (PP, DP, EP) plans of §5.1, batch 512, micro-batch 32, FP16-FP32
  mixed precision with Adam.
* ``deepseek-moe-32b``, ``-67b``, ``-145b``, ``-671b`` — the scaling study of §5.4 (512 / 1536
  / 4096 / 16384 GPUs with 16 / 24 / 32 / 64 stages, 4 / 8 / 16 / 32 pipelines, EP 8).
* ``deepseek-moe-h100-<precision>`` — DeepSeek-MoE under the five low-precision recipes of
  §5.7 / Table 7 (16 nodes x 8 H100, 200 Gbps per node, PP 8, DP 2, EP 8).

What the paper does not state is an assumption, listed here and in ``docs/simulator.md``:

* Architectures are reconstructed to match Table 2's total/active parameter counts (hidden
  sizes, vocabularies and FFN widths from the public model families).
* Iteration times of the Table 2 / Table 7 presets are the ones Table 3 / Table 7 imply: each
  overhead is reported both in seconds and in percent of the iteration, and the high-overhead
  MoC rows give 1.70 / 2.10 / 2.50 / 2.90 s (Table 3) and 3.0 / 2.3 / 2.1 / 1.9 / 1.7 s
  (Table 7) consistently to two digits.
* The effective device-to-host snapshot bandwidth while training runs is not reported. The
  Azure presets use 0.2 GB/s per GPU: Gemini's DeepSeek-MoE row at MTBF 2 h (0.07 s/iter x 92
  iterations = 6.4 s per checkpoint for a ~2 GB per-GPU dense share) implies ~0.22 GB/s. The
  H100 presets reuse that value (nothing else is known about that cluster's snapshot path).
* The scaling presets (§5.4) have no profile in the paper; they use the analytic estimator at
  140 achieved TFLOP/s per GPU (A100 BF16 at 45% MFU) on the §5.1 network, with storage
  bandwidth scaled per node, sequence length 4096, 2 x PP micro-batches per iteration and
  micro-batches of 4 / 2 / 2 / 1 samples (2.1M / 3.1M / 8.4M / 16.8M tokens per iteration).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List

from megatron_moevement.sim._validation import SimSpecError
from megatron_moevement.sim.estimator import ComputeSpec
from megatron_moevement.sim.scenario import Scenario
from megatron_moevement.sim.specs import ClusterSpec, ModelSpec, ParallelPlan, get_precision
from megatron_moevement.sim.units import GB, GBPS

__all__ = [
    "PAPER_PRESETS",
    "PRESETS",
    "PRECISION_PRESETS",
    "SCALING_PRESETS",
    "azure_a100_cluster",
    "get_preset",
    "list_presets",
]

_FP16 = get_precision("fp16-fp32")
_PAPER_REF = "MoEvement paper, Table 2 and §5.1"
_SCALING_REF = "MoEvement paper, §5.4 (Fig. 11)"
_TABLE7_REF = "MoEvement paper, §5.7 and Table 7"

AZURE_D2H_BANDWIDTH = 0.2 * GB
"""Effective per-GPU snapshot bandwidth assumed for the paper's clusters (see module doc)."""


def azure_a100_cluster(num_gpus: int = 96, storage_gbps_per_12_nodes: float = 40.0) -> ClusterSpec:
    """The §5.1 cluster (Standard_NC96ads_A100_v4) scaled to ``num_gpus`` GPUs.

    Storage bandwidth is 40 Gbps for the 12-node cluster and scaled per node beyond it.
    """
    nodes = -(-num_gpus // 8)
    return ClusterSpec(
        name=f"azure-a100x{num_gpus}",
        num_gpus=num_gpus,
        gpus_per_node=8,
        d2h_bandwidth=AZURE_D2H_BANDWIDTH,
        inter_node_bandwidth=80 * GBPS,
        storage_bandwidth=storage_gbps_per_12_nodes * GBPS * max(1.0, nodes / 12),
        intra_node_bandwidth=250 * GB,
        hbm_bandwidth=2.0e12,
    )


def _h100_cluster() -> ClusterSpec:
    return ClusterSpec(
        name="h100x128",
        num_gpus=128,
        gpus_per_node=8,
        d2h_bandwidth=AZURE_D2H_BANDWIDTH,
        inter_node_bandwidth=200 * GBPS,
        storage_bandwidth=40 * GBPS,  # not stated in §5.7; the §5.1 value is reused
        intra_node_bandwidth=400 * GB,
        hbm_bandwidth=3.0e12,
    )


def _paper_plan(pp: int, dp: int, ep: int = 8) -> ParallelPlan:
    # Batch 512 samples, micro-batch 32: m = 512 / (32 * dp) micro-batches per pipeline.
    return ParallelPlan(pp=pp, dp=dp, ep=ep, num_microbatches=512 // (32 * dp), micro_batch_size=32)


def _deepseek_moe_16b(precision=_FP16) -> ModelSpec:
    # DeepSeek-MoE 16B: 28 layers (first dense), h 2048, 64 routed + 2 shared experts of width
    # 1408; Table 2 lists top-8 routing: 16.4B total.
    return ModelSpec(
        name="DeepSeek-MoE-16.4B",
        num_layers=28,
        hidden_size=2048,
        num_experts=64,
        top_k=8,
        num_shared_experts=2,
        expert_ffn_hidden_size=1408,
        num_dense_layers=1,
        dense_ffn_hidden_size=10944,
        vocab_size=102400,
        seq_length=2048,
        precision=precision,
    )


def moe_llava() -> Scenario:
    """MoE-LLaVa (StableLM-1.6B-4e style, 4 experts top-2, 2.9B/2B) on 96 A100s, PP6 DP2 EP8."""
    model = ModelSpec(
        name="MoE-LLaVa-2.9B",
        num_layers=32,
        hidden_size=2048,
        num_experts=4,
        top_k=2,
        expert_ffn_hidden_size=2048,
        vocab_size=100352,
        seq_length=640,  # 576 image patch tokens + prompt (assumption)
        extra_nonexpert_params=310_000_000,  # CLIP ViT-L/14 vision tower + projector
        precision=_FP16,
    )
    # Stage 0 holds the vision tower and the embedding (~0.5B parameters, as much as 7 layers),
    # the last stage the output layer: the 32 layers are split (0, 7, 7, 7, 7, 4) to balance
    # the stages' state (the paper does not give its split).
    plan = dataclasses.replace(_paper_plan(pp=6, dp=2), layers_per_stage=(0, 7, 7, 7, 7, 4))
    return Scenario(
        name="moe-llava",
        model=model,
        cluster=azure_a100_cluster(96),
        plan=plan,
        iteration_time_s=1.70,
        description="MoE-LLaVa on ImageNet-1K, (PP, DP, EP) = (6, 2, 8)",
        reference=_PAPER_REF,
    )


def gpt_moe() -> Scenario:
    """GPT-MoE (DeepSpeed-MoE style, 32 experts top-6, 7.3B/1.6B) on 96 A100s, PP3 DP4 EP8."""
    model = ModelSpec(
        name="GPT-MoE-7.3B",
        num_layers=12,
        hidden_size=1536,
        num_experts=32,
        top_k=6,
        expert_ffn_hidden_size=5952,
        gated_linear_unit=False,
        vocab_size=50257,
        seq_length=2048,
        precision=_FP16,
    )
    return Scenario(
        name="gpt-moe",
        model=model,
        cluster=azure_a100_cluster(96),
        plan=_paper_plan(pp=3, dp=4),
        iteration_time_s=2.10,
        description="GPT-MoE on RedPajama, (PP, DP, EP) = (3, 4, 8)",
        reference=_PAPER_REF,
    )


def qwen_moe() -> Scenario:
    """QWen-MoE (Qwen1.5-MoE style, 64 experts top-8, 14.3B/2.7B) on 96 A100s, PP6 DP2 EP8."""
    model = ModelSpec(
        name="QWen-MoE-14.3B",
        num_layers=24,
        hidden_size=2048,
        num_experts=64,
        top_k=8,
        expert_ffn_hidden_size=1408,
        vocab_size=151936,
        seq_length=2048,
        precision=_FP16,
    )
    return Scenario(
        name="qwen-moe",
        model=model,
        cluster=azure_a100_cluster(96),
        plan=_paper_plan(pp=6, dp=2),
        iteration_time_s=2.50,
        description="QWen-MoE on RedPajama, (PP, DP, EP) = (6, 2, 8)",
        reference=_PAPER_REF,
    )


def deepseek_moe() -> Scenario:
    """DeepSeek-MoE (64 experts top-8 + 2 shared, 16.4B) on 96 A100s, PP12 DP1 EP8."""
    return Scenario(
        name="deepseek-moe",
        model=_deepseek_moe_16b(),
        cluster=azure_a100_cluster(96),
        plan=_paper_plan(pp=12, dp=1),
        iteration_time_s=2.90,
        description="DeepSeek-MoE on RedPajama, (PP, DP, EP) = (12, 1, 8)",
        reference=_PAPER_REF,
    )


_SCALING_COMPUTE = ComputeSpec(tflops_per_gpu=140.0)


def _scaling(
    name: str, model: ModelSpec, gpus: int, pp: int, dp: int, micro_batch: int, description: str
) -> Scenario:
    plan = ParallelPlan(pp=pp, dp=dp, ep=8, num_microbatches=2 * pp, micro_batch_size=micro_batch)
    return Scenario(
        name=name,
        model=model,
        cluster=azure_a100_cluster(gpus),
        plan=plan,
        compute=_SCALING_COMPUTE,
        description=description,
        reference=_SCALING_REF,
    )


def deepseek_moe_32b() -> Scenario:
    """32B DeepSeek-MoE-style model on 512 GPUs: 16 stages x 4 pipelines x EP 8."""
    model = ModelSpec(
        name="DeepSeek-MoE-32B",
        num_layers=32,
        hidden_size=2560,
        num_experts=64,
        top_k=6,
        num_shared_experts=2,
        expert_ffn_hidden_size=1920,
        vocab_size=102400,
        seq_length=4096,
        precision=_FP16,
    )
    return _scaling("deepseek-moe-32b", model, 512, 16, 4, 4, "32B, 512 GPUs, PP16 DP4 EP8")


def deepseek_moe_67b() -> Scenario:
    """67B DeepSeek-MoE-style model on 1536 GPUs: 24 stages x 8 pipelines x EP 8."""
    model = ModelSpec(
        name="DeepSeek-MoE-67B",
        num_layers=48,
        hidden_size=3072,
        num_experts=64,
        top_k=8,
        num_shared_experts=2,
        expert_ffn_hidden_size=2208,
        vocab_size=102400,
        seq_length=4096,
        precision=_FP16,
    )
    return _scaling("deepseek-moe-67b", model, 1536, 24, 8, 2, "67B, 1536 GPUs, PP24 DP8 EP8")


def deepseek_moe_145b() -> Scenario:
    """DeepSeek-MoE 145B (62 layers, h 4096, 128 routed + 4 shared, top-12) on 4096 GPUs."""
    model = ModelSpec(
        name="DeepSeek-MoE-145B",
        num_layers=62,
        hidden_size=4096,
        num_experts=128,
        top_k=12,
        num_shared_experts=4,
        expert_ffn_hidden_size=1408,
        vocab_size=102400,
        seq_length=4096,
        precision=_FP16,
    )
    return _scaling("deepseek-moe-145b", model, 4096, 32, 16, 2, "145B, 4096 GPUs, PP32 DP16 EP8")


def deepseek_moe_671b() -> Scenario:
    """DeepSeek-V3-shaped 671B model on 16384 GPUs: 64 stages x 32 pipelines x EP 8.

    61 layers (3 dense), h 7168, 256 routed + 1 shared experts of width 2048, top-8, MLA
    attention (~187M parameters per layer). With 64 stages and 61 layers the last 3 stages
    hold no transformer layer (the last one holds the output layer), as in the paper's plan.
    """
    model = ModelSpec(
        name="DeepSeek-MoE-671B",
        num_layers=61,
        hidden_size=7168,
        num_experts=256,
        top_k=8,
        num_shared_experts=1,
        expert_ffn_hidden_size=2048,
        num_dense_layers=3,
        dense_ffn_hidden_size=18432,
        vocab_size=129280,
        seq_length=4096,
        attention_params_per_layer=187_000_000,
        precision=_FP16,
    )
    return _scaling("deepseek-moe-671b", model, 16384, 64, 32, 1, "671B, 16384 GPUs, PP64 DP32 EP8")


def _table7(precision_name: str, iteration_s: float) -> Callable[[], Scenario]:
    def build() -> Scenario:
        return Scenario(
            name=f"deepseek-moe-h100-{precision_name}",
            model=_deepseek_moe_16b(get_precision(precision_name)),
            cluster=_h100_cluster(),
            plan=_paper_plan(pp=8, dp=2),
            iteration_time_s=iteration_s,
            description=f"DeepSeek-MoE, {precision_name}, 128 H100s, (PP, DP, EP) = (8, 2, 8)",
            reference=_TABLE7_REF,
        )

    build.__doc__ = f"DeepSeek-MoE with {precision_name} on the §5.7 H100 cluster."
    return build


PAPER_PRESETS: List[str] = ["moe-llava", "gpt-moe", "qwen-moe", "deepseek-moe"]
"""The four models of the paper's Table 2, in table order."""

SCALING_PRESETS: List[str] = [
    "deepseek-moe-32b",
    "deepseek-moe-67b",
    "deepseek-moe-145b",
    "deepseek-moe-671b",
]
"""The §5.4 scaling configurations."""

_TABLE7_ITERATION_S = {
    "fp16-fp16-fp16x2": 3.0,
    "fp8-fp32-fp32x2": 2.3,
    "fp8-fp16-fp32x2": 2.1,
    "fp8-fp16-fp8+fp16": 1.9,
    "fp8-fp8-fp8+fp16": 1.7,
}

PRECISION_PRESETS: List[str] = [f"deepseek-moe-h100-{p}" for p in _TABLE7_ITERATION_S]
"""DeepSeek-MoE under the five low-precision recipes of Table 7."""

PRESETS: Dict[str, Callable[[], Scenario]] = {
    "moe-llava": moe_llava,
    "gpt-moe": gpt_moe,
    "qwen-moe": qwen_moe,
    "deepseek-moe": deepseek_moe,
    "deepseek-moe-32b": deepseek_moe_32b,
    "deepseek-moe-67b": deepseek_moe_67b,
    "deepseek-moe-145b": deepseek_moe_145b,
    "deepseek-moe-671b": deepseek_moe_671b,
    **{f"deepseek-moe-h100-{p}": _table7(p, t) for p, t in _TABLE7_ITERATION_S.items()},
}
"""Preset builders by name."""


def list_presets() -> List[str]:
    """Names of all presets."""
    return list(PRESETS)


def get_preset(name: str) -> Scenario:
    """Builds the preset scenario ``name``.

    Raises:
        SimSpecError: If the name is unknown.
    """
    try:
        return PRESETS[name]()
    except KeyError:
        raise SimSpecError(f"unknown preset {name!r}; known: {list_presets()}") from None
