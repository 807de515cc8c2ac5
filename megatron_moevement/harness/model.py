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
    """Dropout after attention/MLP."""

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
    if layout.tp > 1 and not _local_norm_supports_sequence_parallel():
        # Megatron-Core requires sequence parallelism for MoE with TP > 1, and the local layer
        # spec's norm without apex (WrappedTorchNorm) asserts that it is off.
        raise ModelConfigError(
            f"tp={layout.tp}: the harness model uses Megatron-Core's local layer spec, whose "
            "torch norm does not support the sequence parallelism that MoE with tensor "
            "parallelism requires (apex's FusedLayerNorm, which would, is not installed). Fix: "
            "use tp=1 on the harness (e.g. --layout pp2xdp2xep2)."
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
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=False,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep,
        sequence_parallel=layout.tp > 1,
        use_cpu_initialization=True,
        add_bias_linear=False,
        gradient_accumulation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=0.0,
        params_dtype=cfg.params_dtype,
        pipeline_dtype=cfg.params_dtype,
        bf16=cfg.precision == "bf16",
        fp16=cfg.precision == "fp16",
        autocast_dtype=cfg.params_dtype if half else None,
        deterministic_mode=True,
    )


def _local_norm_supports_sequence_parallel() -> bool:
    """Whether the local layer spec's norm (apex's FusedLayerNorm, else a torch norm that
    rejects sequence parallelism) can run with sequence parallelism."""
    try:
        from megatron.core.models.gpt.gpt_layer_specs import LNImpl
        from megatron.core.transformer.torch_norm import WrappedTorchNorm
    except ImportError:  # another Megatron-Core layout: let Megatron decide
        return True
    return LNImpl is not WrappedTorchNorm


def build_gpt_model(cfg: TinyMoEConfig, layout, transformer_config) -> torch.nn.Module:
    """Builds this rank's pipeline stage of the MoE ``GPTModel``."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(num_experts=cfg.num_experts, moe_grouped_gemm=False)
    model = GPTModel(
        config=transformer_config,
        transformer_layer_spec=spec,
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
    )
    return model
