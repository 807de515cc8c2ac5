"""The operator registry: a Megatron-Core MoE model split into independently checkpointable parts.

MoEvement snapshots a model operator by operator. An operator is one of:

* ``expert``: one expert of one MoE layer (global expert id, owned by one expert-parallel rank);
* ``router``: the gating network of one MoE layer (with its ``expert_bias`` and token-count
  buffers when aux-loss-free balancing is on);
* ``dense``: the non-expert part of one transformer layer (attention, layer norms, shared
  experts and their gate, a dense MLP);
* ``embedding``: the input embedding (first pipeline stage);
* ``output``: the final layer norm and the output layer (last pipeline stage).

Multi-token prediction layers (``mtp.layers.K``) are layers ``num_layers + K`` of the model and
split the same way. Grouped-GEMM experts (``GroupedMLP``: every local expert of a layer in one
``weight1``/``weight2`` pair) are split into per-expert operators, each owning its contiguous
block of the stacked weights (``GroupedMLP`` views ``weight1`` as
``[experts, hidden, ffn]``); ``TEGroupedMLP``'s ``linear_fc1.weight<i>`` belong to expert ``i``.

Each operator maps to its compute weights (the model parameters the forward pass uses, or their
block), its buffers, its FP32 main parameters and its optimizer state, whatever Megatron optimizer
holds them (see :mod:`megatron_moevement.state.optim_view`). An FP8 compute weight is captured as
the tensors that hold it (a Transformer Engine ``Float8Tensor``'s ``_data`` and ``_scale_inv``),
and a TE module's delayed-scaling state (``fp8_meta``: scale, amax history) is a buffer of the
operator that owns the module (see :mod:`megatron_moevement.state.fp8`; the ``fp8_meta`` of a
``TEGroupedMLP`` linear, shared by its local experts, belongs to the layer's dense operator). With the distributed optimizer, the
main parameters and optimizer state of an operator on a rank are that rank's data-parallel shard.

State coverage is checked when the registry is built: every parameter and every buffer
(persistent or not) of the model is placed in an operator, or the build fails with a
:class:`RegistryError` that names the tensor, the configuration option that created it (when it
is a known Megatron-Core one) and the fix; nothing is silently left out of the snapshots.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from megatron_moevement.constants import OPERATOR_KINDS
from megatron_moevement.state.fp8 import (
    fp8_meta_tensors,
    invalidate_caches,
    is_quantized,
    quantized_components,
    resolve_fp8_meta,
)
from megatron_moevement.state.optim_view import OptimizerView, ParamState


class RegistryError(RuntimeError):
    """The model cannot be split into operators (e.g. a tensor that belongs to no operator)."""


_LAYER_RE = re.compile(r"^(decoder|mtp)\.layers\.(\d+)\.(.*)$")
_EXPERT_RE = re.compile(r"^(?:transformer_layer\.)?mlp\.experts\.local_experts\.(\d+)\.")
_TE_GROUPED_RE = re.compile(r"^(?:transformer_layer\.)?mlp\.experts\.linear_fc[12]\.weight(\d+)$")
_STACKED_RE = re.compile(r"^(?:transformer_layer\.)?mlp\.experts\.(weight1|weight2)$")
_ROUTER_RE = re.compile(r"^(?:transformer_layer\.)?mlp\.router\.")

_ORIGINS = (
    ("expert_bias", "moe_router_enable_expert_bias"),
    ("local_tokens_per_expert", "moe_router_enable_expert_bias"),
    ("mtp.", "mtp_num_layers"),
    ("_extra_state", "Transformer Engine FP8 (fp8 / fp8_recipe)"),
)
"""Name fragments of tensors that Megatron-Core options create, for error messages."""


@dataclass
class OperatorParam:
    """One parameter of an operator, with where its full training state lives.

    For a block of a stacked parameter (grouped-GEMM experts), :attr:`flat_range` says which
    elements of the flattened parameter (and of its main parameter and moments) belong to the
    operator.
    """

    name: str
    """Parameter name in the unwrapped ``GPTModel``."""
    param: torch.nn.Parameter = field(repr=False)
    """The compute weight."""
    state: ParamState | None = field(default=None, repr=False)
    """Main parameter and optimizer state on this rank (``None`` if no optimizer holds it)."""
    flat_range: tuple[int, int] | None = None
    """``(start, end)`` of the operator's block in the flattened parameter; ``None``: all of it."""

    @property
    def key(self) -> str:
        """The name records of this parameter carry (with the block for a stacked one)."""
        if self.flat_range is None:
            return self.name
        return f"{self.name}[{self.flat_range[0]}:{self.flat_range[1]}]"

    @property
    def numel(self) -> int:
        if self.flat_range is None:
            return self.param.numel()
        return self.flat_range[1] - self.flat_range[0]

    @property
    def nbytes(self) -> int:
        """Bytes of the compute weight as stored (an FP8 weight: its data and scales)."""
        return sum(_nbytes(t) for _, t in self.compute_views())

    @property
    def stacked(self) -> bool:
        """True for a block of a parameter other operators own blocks of."""
        return self.flat_range is not None

    def compute_view(self) -> torch.Tensor:
        """The live compute weight (its block for a stacked parameter)."""
        t = self.param.detach()
        if self.flat_range is None:
            return t
        return t.view(-1)[self.flat_range[0] : self.flat_range[1]]

    def compute_views(self) -> list[tuple[str, torch.Tensor]]:
        """``(key suffix, live tensor)`` of what holds the compute weight: the weight itself, or
        for a TE quantized weight its components (``"#_data"``, ``"#_scale_inv"``, ...)."""
        if is_quantized(self.param):
            return [(f"#{name}", t) for name, t in quantized_components(self.param)]
        return [("", self.compute_view())]

    def _state_slice(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """The block of a main-parameter-shaped tensor (``None``: not on this rank's shard)."""
        t = tensor.detach()
        if self.flat_range is None:
            return t
        lo, hi = self.flat_range
        shard = None if self.state is None else self.state.shard_range
        if shard is not None:
            start, end = shard
            lo, hi = max(lo, start) - start, min(hi, end) - start
            if lo >= hi:
                return None
        return t.view(-1)[lo:hi]

    def main_view(self) -> torch.Tensor | None:
        """The live main parameter (block; ``None`` when this rank holds none of it)."""
        if self.state is None or self.state.main_param is None:
            return None
        return self._state_slice(self.state.main_param)

    def optimizer_views(self) -> list[tuple[str, torch.Tensor]]:
        """``(state key, live tensor)`` of the optimizer state: blocks of the moments, and
        scalars (``step``) whole, since they belong to the whole parameter."""
        if self.state is None or self.state.main_param is None:
            return []
        out = []
        main_numel = self.state.main_param.numel()
        for skey in sorted(self.state.optimizer_state):
            value = self.state.optimizer_state[skey]
            if not torch.is_tensor(value):
                continue
            if value.numel() == main_numel and main_numel > 1:
                view = self._state_slice(value)
                if view is None:
                    continue
                out.append((skey, view))
            else:
                out.append((skey, value.detach()))
        return out


@dataclass
class OperatorBuffer:
    """A module buffer that belongs to an operator (read live: modules may replace it), or a
    tensor of a TE module's FP8 scaling state (``attr`` ``"fp8_meta.<entry>.<field>"``)."""

    name: str
    """Buffer name in the unwrapped ``GPTModel``."""
    module: torch.nn.Module = field(repr=False)
    attr: str = ""

    @property
    def tensor(self) -> torch.Tensor:
        if self.attr.startswith("fp8_meta."):
            return resolve_fp8_meta(self.module, self.attr)
        # The router keeps its expert bias in FP32, but Float16Module's cast turns it to bf16
        # until the first forward; Megatron switches it back before saving and loading, and so
        # do we, so that a fresh model and a trained one hold it alike.
        maintain = getattr(self.module, "_maintain_float32_expert_bias", None)
        if maintain is not None:
            maintain()
        return getattr(self.module, self.attr).detach()


@dataclass
class Operator:
    """A checkpointable operator of this rank's model stage."""

    name: str
    """Stable, layout-independent name: ``embedding``, ``output``, ``layer<L>.dense``,
    ``layer<L>.router``, ``layer<L>.expert<E>`` (global layer and expert numbers)."""
    kind: str
    """One of :data:`OPERATOR_KINDS`."""
    layer: int | None = None
    """Global 0-based transformer layer number, ``None`` for embedding/output."""
    expert: int | None = None
    """Global expert id for experts, else ``None``."""
    owner_ep_rank: int | None = None
    """Expert-parallel rank that owns the expert (experts only)."""
    params: list[OperatorParam] = field(default_factory=list, repr=False)
    """The parameters of the operator on this rank, in model order."""
    buffers: list[OperatorBuffer] = field(default_factory=list, repr=False)
    """The module buffers of the operator (restored with its compute weights)."""

    @property
    def param_names(self) -> list[str]:
        return [p.name for p in self.params]

    @property
    def numel(self) -> int:
        """Parameters of the operator (its blocks of stacked parameters)."""
        return sum(p.numel for p in self.params)

    @property
    def compute_bytes(self) -> int:
        """Bytes of the compute weights and buffers (what a frozen operator's snapshot holds)."""
        return sum(p.nbytes for p in self.params) + sum(_nbytes(b.tensor) for b in self.buffers)

    @property
    def main_bytes(self) -> int:
        """Bytes of the FP32 main parameters (this rank's shard with the distributed optimizer)."""
        return sum(_nbytes(p.main_view()) for p in self.params)

    @property
    def optimizer_bytes(self) -> int:
        """Bytes of the optimizer state (moments and step counters) on this rank."""
        return sum(_nbytes(v) for p in self.params for _, v in p.optimizer_views())

    @property
    def full_state_bytes(self) -> int:
        """Bytes of the full state (main params + optimizer state) an active snapshot holds."""
        return self.main_bytes + self.optimizer_bytes

    def after_restore(self) -> None:
        """Call after writing the operator's compute weights in place: quantized weights drop
        the caches TE derived from their old data (see :func:`invalidate_caches`)."""
        for p in self.params:
            if is_quantized(p.param):
                invalidate_caches(p.param)

    def bytes_by_kind(self) -> dict[str, int]:
        return {
            "compute": self.compute_bytes,
            "main": self.main_bytes,
            "optimizer": self.optimizer_bytes,
        }


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _origin(name: str) -> str:
    for fragment, option in _ORIGINS:
        if fragment in name:
            return f" (created by {option})"
    return ""


class _Layers:
    """Where a model's layers are: local index -> global number, and their local experts."""

    def __init__(self, gpt_model: torch.nn.Module) -> None:
        self.model = gpt_model
        config = getattr(gpt_model, "config", None)
        self.num_layers = int(getattr(config, "num_layers", 0) or 0)
        self.containers = {
            "decoder": getattr(getattr(gpt_model, "decoder", None), "layers", None) or [],
            "mtp": getattr(getattr(gpt_model, "mtp", None), "layers", None) or [],
        }

    def number(self, container: str, local: int) -> int:
        """Global 0-based layer number (MTP layer ``K`` is ``num_layers + K``)."""
        if container == "mtp":
            return self.num_layers + local
        layers = self.containers["decoder"]
        if local < len(layers) and hasattr(layers[local], "layer_number"):
            return int(layers[local].layer_number) - 1
        return local

    def mlp(self, container: str, local: int):
        layers = self.containers[container]
        if local >= len(layers):
            return None
        layer = layers[local]
        layer = getattr(layer, "transformer_layer", layer)
        return getattr(layer, "mlp", None)

    def expert_ids(self, container: str, local: int) -> list[int] | None:
        ids = getattr(self.mlp(container, local), "local_expert_indices", None)
        return None if ids is None else list(ids)


def _unplaced(kind: str, name: str) -> RegistryError:
    return RegistryError(
        f"{kind} {name!r}{_origin(name)} belongs to no known operator, so MoEvement cannot "
        "snapshot it and a recovery would restore the model without it. The registry "
        "understands Megatron-Core GPTModel names (embedding, decoder.layers.N, mtp.layers.N, "
        "final_layernorm, output_layer). Fix: keep training state inside those modules, disable "
        "the option that creates it, or extend megatron_moevement.state.operators._classify."
    )


def _classify(name: str, layers: _Layers, kind: str = "parameter") -> tuple:
    """``(operator name, kind, global layer, local layer info)`` of tensor ``name``; the last
    item is ``(container, local layer, rest of the name)`` for layer tensors, else ``None``."""
    if name.startswith("embedding."):
        return "embedding", "embedding", None, None
    if name.startswith("output_layer.") or name.startswith("decoder.final_layernorm."):
        return "output", "output", None, None
    match = _LAYER_RE.match(name)
    if not match:
        raise _unplaced(kind, name)
    container, local, rest = match.group(1), int(match.group(2)), match.group(3)
    layer = layers.number(container, local)
    where = (container, local, rest)
    expert_match = _EXPERT_RE.match(rest) or _TE_GROUPED_RE.match(rest)
    if expert_match:
        local_expert = int(expert_match.group(1))
        ids = layers.expert_ids(container, local)
        expert = ids[local_expert] if ids is not None else local_expert
        return f"layer{layer}.expert{expert}", "expert", layer, where
    if _ROUTER_RE.match(rest):
        return f"layer{layer}.router", "router", layer, where
    return f"layer{layer}.dense", "dense", layer, where


class OperatorRegistry:
    """All operators of this rank's model stage, with lookups by name and by parameter.

    Args:
        gpt_model: The unwrapped Megatron-Core ``GPTModel`` of this stage.
        optimizer: The Megatron optimizer (plain, mixed-precision, distributed or chained).
        ep_rank: This rank's expert-parallel rank (recorded as the owner of its experts).
        num_experts: Experts per MoE layer (to check global ids).

    Raises:
        RegistryError: a parameter or buffer belongs to no operator (see the module docstring).
    """

    def __init__(
        self,
        gpt_model: torch.nn.Module,
        optimizer,
        ep_rank: int = 0,
        num_experts: int | None = None,
    ) -> None:
        self.optimizer_view = OptimizerView(optimizer)
        self.input_embedding = getattr(gpt_model, "embedding", None)
        """The first stage's input embedding module (``None`` on later stages)."""
        layers = _Layers(gpt_model)
        ops: dict[str, Operator] = {}
        self._owners: dict[int, list[str]] = {}

        def operator(op_name, kind, layer, expert) -> Operator:
            if expert is not None and num_experts is not None and not 0 <= expert < num_experts:
                raise RegistryError(f"expert id {expert} of {op_name!r} outside [0, {num_experts})")
            op = ops.get(op_name)
            if op is None:
                op = Operator(
                    name=op_name,
                    kind=kind,
                    layer=layer,
                    expert=expert,
                    owner_ep_rank=ep_rank if kind == "expert" else None,
                )
                ops[op_name] = op
            return op

        for name, param in gpt_model.named_parameters():
            op_name, kind, layer, where = _classify(name, layers)
            state = self.optimizer_view.get(param)
            stacked = _STACKED_RE.match(where[2]) if where is not None else None
            if stacked and is_quantized(param):
                raise RegistryError(
                    f"grouped-GEMM weight {name!r} is an FP8 tensor; its experts cannot be cut "
                    "out of its scaled data. Fix: use TEGroupedMLP (one weight per expert) or "
                    "moe_grouped_gemm=False with FP8"
                )
            if stacked:
                # GroupedMLP: local expert e owns block e of the flattened weight.
                ids = layers.expert_ids(where[0], where[1])
                if not ids or param.numel() % len(ids):
                    raise RegistryError(
                        f"grouped-GEMM weight {name!r} ({tuple(param.shape)}) cannot be split "
                        f"into its local experts {ids}; Fix: use moe_grouped_gemm=False"
                    )
                block = param.numel() // len(ids)
                for e, expert in enumerate(ids):
                    op = operator(f"layer{layer}.expert{expert}", "expert", layer, expert)
                    op.params.append(
                        OperatorParam(name, param, state, (e * block, (e + 1) * block))
                    )
                    self._owners.setdefault(id(param), []).append(op.name)
                continue
            expert = None
            if kind == "expert":
                expert = int(op_name.rsplit("expert", 1)[1])
            op = operator(op_name, kind, layer, expert)
            op.params.append(OperatorParam(name, param, state))
            self._owners.setdefault(id(param), []).append(op_name)
        for name, _ in gpt_model.named_buffers():
            op_name, kind, layer, _where = _classify(name, layers, "buffer")
            if op_name not in ops:
                raise RegistryError(
                    f"buffer {name!r}{_origin(name)} belongs to operator {op_name!r}, which has "
                    "no parameters on this rank; MoEvement snapshots buffers with their "
                    "operator's compute weights. Fix: keep the buffer in a module with parameters."
                )
            module_name, _, attr = name.rpartition(".")
            module = gpt_model.get_submodule(module_name) if module_name else gpt_model
            ops[op_name].buffers.append(OperatorBuffer(name, module, attr))
        for module_name, module in gpt_model.named_modules():
            for path, _ in fp8_meta_tensors(module):
                name = f"{module_name}.{path}" if module_name else path
                op_name, kind, layer, _where = _classify(name, layers, "FP8 scaling state")
                if op_name not in ops:
                    raise _unplaced("FP8 scaling state", name)
                ops[op_name].buffers.append(OperatorBuffer(name, module, path))
        self.operators: list[Operator] = sorted(ops.values(), key=_canonical_key)
        self._by_name = {op.name: op for op in self.operators}

    def refresh(self) -> None:
        """Re-reads optimizer state dicts (they are created lazily at the first step)."""
        for op in self.operators:
            for p in op.params:
                p.state = self.optimizer_view.get(p.param)

    def __iter__(self) -> Iterator[Operator]:
        return iter(self.operators)

    def __len__(self) -> int:
        return len(self.operators)

    def __getitem__(self, name: str) -> Operator:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no operator {name!r} on this rank; have {list(self._by_name)}")

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def owners(self, param: torch.nn.Parameter) -> list[str]:
        """The operators that own ``param`` (several for a stacked grouped-GEMM weight)."""
        return list(self._owners.get(id(param), ()))

    def operator_of(self, param: torch.nn.Parameter) -> Operator:
        """The operator that owns ``param`` (the first one for a stacked weight)."""
        return self._by_name[self._owners[id(param)][0]]

    def of_kind(self, kind: str) -> list[Operator]:
        return [op for op in self.operators if op.kind == kind]

    def coverage(self) -> dict[str, int]:
        """What the operators hold: parameter elements, buffers and operators, by kind."""
        return {
            "operators": len(self.operators),
            "parameters": len({id(p.param) for op in self.operators for p in op.params}),
            "parameter_elements": sum(op.numel for op in self.operators),
            "buffers": sum(len(op.buffers) for op in self.operators),
        }

    def bytes_report(self) -> dict[str, dict[str, int]]:
        """``{operator name: {"compute": b, "main": b, "optimizer": b}}`` plus a ``"total"`` row."""
        self.refresh()
        report = {op.name: op.bytes_by_kind() for op in self.operators}
        report["total"] = {
            key: sum(row[key] for row in report.values())
            for key in ("compute", "main", "optimizer")
        }
        return report


def _canonical_key(op: Operator) -> tuple:
    """Model order: embedding, then per layer dense, router, experts by id, then output."""
    kind_rank = OPERATOR_KINDS.index(op.kind)
    layer = -1 if op.layer is None else op.layer
    if op.kind == "output":
        layer = 1 << 30
    return (layer, kind_rank, -1 if op.expert is None else op.expert)


def model_and_optimizer_bytes(gpt_model: torch.nn.Module, optimizer) -> dict[str, int]:
    """Totals counted directly from the model and the inner optimizers (independently of the
    registry), to check that the registry accounts for every byte."""
    from megatron_moevement.state.optim_view import iter_stepped_params

    compute = sum(
        sum(_nbytes(t) for _, t in quantized_components(p)) if is_quantized(p) else _nbytes(p)
        for p in gpt_model.parameters()
    )
    main = 0
    optim = 0
    for leaf, p in iter_stepped_params(optimizer):
        main += _nbytes(p)
        state = leaf.optimizer.state.get(p, {})
        optim += sum(_nbytes(v) for v in state.values() if torch.is_tensor(v))
    return {"compute": compute, "main": main, "optimizer": optim}


def operator_tensors(op, kinds: Sequence[str]) -> list[tuple[str, torch.Tensor]]:
    """(key, live tensor) pairs of operator ``op`` for the given kinds (compute/main/optim).

    ``compute`` is the compute weights (blocks of stacked weights) and the buffers (``buffer``:
    the buffers alone). When the
    optimizer steps the model parameter itself (plain FP32 training), the compute weight *is*
    the main parameter: it is listed once, as ``compute``. Every tensor is a live view: copying
    into it restores the model in place.
    """
    out: list[tuple[str, torch.Tensor]] = []
    for p in op.params:
        if "compute" in kinds:
            for suffix, view in p.compute_views():
                out.append((f"{op.name}/compute/{p.key}{suffix}", view))
        state = p.state
        if state is None or state.main_param is None:
            continue
        if "main" in kinds and not state.main_is_model:
            main = p.main_view()
            if main is not None:
                out.append((f"{op.name}/main/{p.key}", main))
        if "optim" in kinds:
            for skey, value in p.optimizer_views():
                out.append((f"{op.name}/optim/{p.key}/{skey}", value))
    if "compute" in kinds or "buffer" in kinds:
        for b in op.buffers:
            out.append((f"{op.name}/buffer/{b.name}", b.tensor))
    return out


def layer_number_of(model: torch.nn.Module, module_name: str) -> int:
    """Global 0-based number of the transformer layer that contains submodule ``module_name``
    (e.g. ``"decoder.layers.1.mlp.router"``; ``"mtp.layers.K...."`` is ``num_layers + K``), the
    layer the registry names its operators after."""
    match = _LAYER_RE.match(module_name + ".")
    if not match:
        raise RegistryError(f"{module_name!r} is in no transformer layer")
    return _Layers(model).number(match.group(1), int(match.group(2)))
