"""A small Megatron-Core MoE GPT for the CPU harness, configured by a validated dataclass."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # Megatron is imported lazily, where the config is built
    from megatron.core.transformer.transformer_config import TransformerConfig

_PRECISIONS = ("fp32", "bf16", "fp16")


class ModelConfigError(ValueError):
    """An invalid :class:`TinyMoEConfig` value."""


@dataclass
class TinyMoEConfig:
    """Model and training hyper-parameters of the harness model (a Megatron-Core ``GPTModel``)."""

    num_layers: int = 4
    """Transformer layers in the whole model (split evenly over pipeline stages)."""

    hidden_size: int = 64
    """Model width."""

    ffn_hidden_size: int = 128
    """Hidden size of each expert's MLP."""

    num_attention_heads: int = 4
    """Attention heads."""

    num_experts: int = 4
    """Experts per MoE layer (every layer is an MoE layer)."""

    moe_router_topk: int = 2
    """Experts each token is routed to."""

    moe_aux_loss_coeff: float = 1e-2
    """Load-balancing auxiliary loss coefficient."""

    vocab_size: int = 128
    """Vocabulary size (divisible by the tensor-parallel size)."""

    seq_length: int = 16
    """Tokens per sequence."""

    micro_batch_size: int = 2
    """Sequences per microbatch."""

    num_microbatches: int = 4
    """Microbatches per iteration and data-parallel rank."""

    precision: str = "fp32"
    """Compute-weight precision: "fp32", "bf16" (FP32 main params in the optimizer) or "fp16"."""

    lr: float = 1e-3
    """Adam learning rate (constant)."""

    clip_grad: float = 1.0
    """Global gradient-norm clipping threshold."""

    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (Megatron's distributed optimizer)."""

    hidden_dropout: float = 0.0
    """Dropout after attention/MLP (Megatron-LM's default is 0.1)."""

    attention_dropout: float = 0.0
    """Dropout of the attention probabilities."""

    moe_grouped_gemm: bool = False
    """Stack each layer's local experts in one weight pair (Megatron-Core's ``GroupedMLP``;
    bf16 only). On CPU its grouped GEMM runs through the CPU runtime."""

    moe_shared_expert_intermediate_size: int | None = None
    """FFN size of the shared experts (``None``: no shared experts)."""

    moe_shared_expert_gate: bool = False
    """Gate the shared experts' output (``moe_shared_expert_gate``)."""

    moe_router_score_function: str = "softmax"
    """Router scores: ``"softmax"`` or ``"sigmoid"``."""

    moe_router_enable_expert_bias: bool = False
    """Aux-loss-free load balancing: a per-expert bias buffer updated outside the optimizer
    (needs ``moe_router_score_function="sigmoid"``)."""

    dense_first_layers: int = 0
    """Layers at the start of the model with a dense MLP instead of MoE (``moe_layer_freq``)."""

    moe_expert_capacity_factor: float | None = None
    """Expert capacity factor; with it, tokens over an expert's capacity are dropped."""

    mtp_num_layers: int | None = None
    """Multi-token prediction layers after the decoder (``None``: none)."""

    moe_token_dispatcher_type: str = "alltoall"
    """``"alltoall"`` or ``"allgather"``."""

    seed: int = 1234
    """Seed of parameter initialization and of the synthetic data."""

    def __post_init__(self) -> None:
        positive = (
            "num_layers",
            "hidden_size",
            "ffn_hidden_size",
            "num_attention_heads",
            "num_experts",
            "moe_router_topk",
            "vocab_size",
            "seq_length",
            "micro_batch_size",
            "num_microbatches",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ModelConfigError(f"TinyMoEConfig.{name}={value!r}: use an int >= 1")
        if self.moe_router_score_function not in ("softmax", "sigmoid"):
            raise ModelConfigError(
                f"TinyMoEConfig.moe_router_score_function={self.moe_router_score_function!r}: "
                "use 'softmax' or 'sigmoid'"
            )
        if self.moe_router_enable_expert_bias and self.moe_router_score_function != "sigmoid":
            raise ModelConfigError(
                "TinyMoEConfig.moe_router_enable_expert_bias needs "
                "moe_router_score_function='sigmoid' (Megatron-Core's rule)"
            )
        if self.moe_token_dispatcher_type not in ("alltoall", "allgather"):
            raise ModelConfigError(
                f"TinyMoEConfig.moe_token_dispatcher_type={self.moe_token_dispatcher_type!r}: use "
                "'alltoall' or 'allgather' (the flex dispatcher needs DeepEP, which needs CUDA)"
            )
        if self.moe_grouped_gemm and self.precision != "bf16":
            raise ModelConfigError(
                "TinyMoEConfig.moe_grouped_gemm needs precision='bf16' (Megatron-Core's "
                "GroupedMLP runs in bf16 only)"
            )
        if not isinstance(self.dense_first_layers, int) or not (
            0 <= self.dense_first_layers < self.num_layers
        ):
            raise ModelConfigError(
                f"TinyMoEConfig.dense_first_layers={self.dense_first_layers!r}: use an int in "
                f"[0, num_layers={self.num_layers})"
            )
        for name in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ModelConfigError(f"TinyMoEConfig.{name}={value!r}: use a float in [0, 1)")
        for name in ("moe_shared_expert_intermediate_size", "mtp_num_layers"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ModelConfigError(f"TinyMoEConfig.{name}={value!r}: use an int >= 1 or None")
        if self.moe_expert_capacity_factor is not None and not (
            isinstance(self.moe_expert_capacity_factor, (int, float))
            and self.moe_expert_capacity_factor > 0
        ):
            raise ModelConfigError(
                f"TinyMoEConfig.moe_expert_capacity_factor={self.moe_expert_capacity_factor!r}: "
                "use a number > 0 or None"
            )
        if self.precision not in _PRECISIONS:
            raise ModelConfigError(
                f"TinyMoEConfig.precision={self.precision!r}: use one of {_PRECISIONS}"
            )
        if self.moe_router_topk > self.num_experts:
            raise ModelConfigError(
                f"TinyMoEConfig.moe_router_topk={self.moe_router_topk} exceeds num_experts="
                f"{self.num_experts}: route to at most num_experts experts"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ModelConfigError(
                f"TinyMoEConfig.hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )

    @property
    def params_dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
            self.precision
        ]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TinyMoEConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ModelConfigError(f"unknown TinyMoEConfig fields {sorted(unknown)}")
        return cls(**data)


def check_layout(cfg: TinyMoEConfig, layout) -> None:
    """Raises :class:`ModelConfigError` when the harness model cannot run on ``layout``."""
    if cfg.num_layers % layout.pp:
        raise ModelConfigError(
            f"num_layers={cfg.num_layers} is not divisible by pp={layout.pp}: "
            "give every pipeline stage the same number of layers"
        )
    if cfg.num_experts % layout.ep:
        raise ModelConfigError(f"num_experts={cfg.num_experts} is not divisible by ep={layout.ep}")
    if cfg.mtp_num_layers and layout.pp > 1:
        raise ModelConfigError(
            "mtp_num_layers with pp > 1: the harness keeps the multi-token prediction layers on "
            "the last stage only; use pp=1 for MTP (or pp >= 1 without MTP)"
        )


def build_transformer_config(cfg: TinyMoEConfig, layout) -> "TransformerConfig":
    """The Megatron ``TransformerConfig`` of the harness model for ``layout``."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    check_layout(cfg, layout)
    half = cfg.precision in ("bf16", "fp16")
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_moe_experts=cfg.num_experts,
        moe_ffn_hidden_size=cfg.ffn_hidden_size,
        moe_router_topk=cfg.moe_router_topk,
        moe_aux_loss_coeff=cfg.moe_aux_loss_coeff,
        moe_router_load_balancing_type="aux_loss",
        moe_token_dispatcher_type=cfg.moe_token_dispatcher_type,
        moe_grouped_gemm=cfg.moe_grouped_gemm,
        moe_shared_expert_intermediate_size=cfg.moe_shared_expert_intermediate_size,
        moe_shared_expert_gate=cfg.moe_shared_expert_gate,
        moe_router_score_function=cfg.moe_router_score_function,
        moe_router_enable_expert_bias=cfg.moe_router_enable_expert_bias,
        moe_layer_freq=[0] * cfg.dense_first_layers
        + [1] * (cfg.num_layers - cfg.dense_first_layers),
        moe_expert_capacity_factor=cfg.moe_expert_capacity_factor,
        moe_pad_expert_input_to_capacity=False,
        mtp_num_layers=cfg.mtp_num_layers,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.expert_tp,
        sequence_parallel=layout.tp > 1,
        use_cpu_initialization=True,
        add_bias_linear=False,
        gradient_accumulation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
        params_dtype=cfg.params_dtype,
        pipeline_dtype=cfg.params_dtype,
        bf16=cfg.precision == "bf16",
        fp16=cfg.precision == "fp16",
        autocast_dtype=cfg.params_dtype if half else None,
        deterministic_mode=True,
    )


def build_gpt_model(cfg: TinyMoEConfig, layout, transformer_config) -> torch.nn.Module:
    """Builds this rank's pipeline stage of the MoE ``GPTModel``."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_decoder_block_spec,
        get_gpt_mtp_block_spec,
    )

    spec = get_gpt_decoder_block_spec(transformer_config, use_transformer_engine=False)
    mtp = None
    if cfg.mtp_num_layers:
        mtp = get_gpt_mtp_block_spec(transformer_config, spec, use_transformer_engine=False)
    model = GPTModel(
        config=transformer_config,
        transformer_layer_spec=spec,
        mtp_block_spec=mtp,
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
    )
    return model
