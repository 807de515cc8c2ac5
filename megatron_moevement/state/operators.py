"""The operator registry: a Megatron-Core MoE model split into independently checkpointable parts.

MoEvement snapshots a model operator by operator. An operator is one of:

* ``expert``: one expert of one MoE layer (global expert id, owned by one expert-parallel rank);
* ``router``: the gating network of one MoE layer;
* ``dense``: the non-expert part of one transformer layer (attention, layer norms, shared
  experts);
* ``embedding``: the input embedding (first pipeline stage);
* ``output``: the final layer norm and the output layer (last pipeline stage).

Each operator maps to its compute weights (the model parameters the forward pass uses), its FP32
main parameters and its optimizer state, whatever Megatron optimizer holds them (see
:mod:`megatron_moevement.state.optim_view`). With the distributed optimizer, the main parameters and
optimizer state of an operator on a rank are that rank's data-parallel shard.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from megatron_moevement.constants import OPERATOR_KINDS
from megatron_moevement.state.optim_view import OptimizerView, ParamState

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
_EXPERT_RE = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.")


class RegistryError(RuntimeError):
    """The model cannot be split into operators (e.g. an unknown parameter name)."""


@dataclass
class OperatorParam:
    """One parameter of an operator, with where its full training state lives."""

    name: str
    """Parameter name in the unwrapped ``GPTModel``."""
    param: torch.nn.Parameter = field(repr=False)
    """The compute weight."""
    state: ParamState | None = field(default=None, repr=False)
    """Main parameter and optimizer state on this rank (``None`` if no optimizer holds it)."""


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

    @property
    def param_names(self) -> list[str]:
        return [p.name for p in self.params]

    @property
    def compute_bytes(self) -> int:
        """Bytes of the compute weights (what a frozen operator's snapshot holds)."""
        return sum(p.param.numel() * p.param.element_size() for p in self.params)

    @property
    def main_bytes(self) -> int:
        """Bytes of the FP32 main parameters (this rank's shard with the distributed optimizer)."""
        return sum(_nbytes(p.state.main_param) for p in self.params if p.state is not None)

    @property
    def optimizer_bytes(self) -> int:
        """Bytes of the optimizer state (moments and step counters) on this rank."""
        total = 0
        for p in self.params:
            if p.state is None:
                continue
            total += sum(_nbytes(v) for v in p.state.optimizer_state.values() if torch.is_tensor(v))
        return total

    @property
    def full_state_bytes(self) -> int:
        """Bytes of the full state (main params + optimizer state) an active snapshot holds."""
        return self.main_bytes + self.optimizer_bytes

    def bytes_by_kind(self) -> dict[str, int]:
        return {
            "compute": self.compute_bytes,
            "main": self.main_bytes,
            "optimizer": self.optimizer_bytes,
        }


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _layer_numbers(gpt_model: torch.nn.Module) -> dict[int, int]:
    """Local layer index -> global 0-based layer number, from Megatron's ``layer_number``."""
    layers = getattr(getattr(gpt_model, "decoder", None), "layers", None) or []
    return {i: int(layer.layer_number) - 1 for i, layer in enumerate(layers)}


def _local_expert_ids(gpt_model: torch.nn.Module) -> dict[int, list[int]]:
    """Local layer index -> global ids of the experts held on this rank."""
    result: dict[int, list[int]] = {}
    layers = getattr(getattr(gpt_model, "decoder", None), "layers", None) or []
    for i, layer in enumerate(layers):
        ids = getattr(getattr(layer, "mlp", None), "local_expert_indices", None)
        if ids is not None:
            result[i] = list(ids)
    return result


def _classify(
    name: str,
    layer_numbers: dict[int, int],
    expert_ids: dict[int, list[int]],
) -> tuple[str, str, int | None, int | None]:
    """(operator name, kind, global layer, global expert) of parameter ``name``."""
    if name.startswith("embedding."):
        return "embedding", "embedding", None, None
    if name.startswith("output_layer.") or name.startswith("decoder.final_layernorm."):
        return "output", "output", None, None
    match = _LAYER_RE.match(name)
    if not match:
        raise RegistryError(
            f"parameter {name!r} belongs to no known operator; the registry understands "
            "Megatron-Core GPTModel names (embedding, decoder.layers.N, final_layernorm, "
            "output_layer). Extend megatron_moevement.state.operators._classify for new modules."
        )
    local, rest = int(match.group(1)), match.group(2)
    layer = layer_numbers.get(local, local)
    expert_match = _EXPERT_RE.match(rest)
    if expert_match:
        local_expert = int(expert_match.group(1))
        expert = expert_ids.get(local, [])[local_expert] if local in expert_ids else local_expert
        return f"layer{layer}.expert{expert}", "expert", layer, expert
    if rest.startswith("mlp.router."):
        return f"layer{layer}.router", "router", layer, None
    return f"layer{layer}.dense", "dense", layer, None


class OperatorRegistry:
    """All operators of this rank's model stage, with lookups by name and by parameter.

    Args:
        gpt_model: The unwrapped Megatron-Core ``GPTModel`` of this stage.
        optimizer: The Megatron optimizer (plain, mixed-precision, distributed or chained).
        ep_rank: This rank's expert-parallel rank (recorded as the owner of its experts).
        num_experts: Experts per MoE layer (to check global ids).
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
        layer_numbers = _layer_numbers(gpt_model)
        expert_ids = _local_expert_ids(gpt_model)
        ops: dict[str, Operator] = {}
        self._param_to_op: dict[int, str] = {}
        for name, param in gpt_model.named_parameters():
            op_name, kind, layer, expert = _classify(name, layer_numbers, expert_ids)
            if expert is not None and num_experts is not None and not 0 <= expert < num_experts:
                raise RegistryError(f"expert id {expert} of {name!r} outside [0, {num_experts})")
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
            op.params.append(OperatorParam(name, param, self.optimizer_view.get(param)))
            self._param_to_op[id(param)] = op_name
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

    def operator_of(self, param: torch.nn.Parameter) -> Operator:
        """The operator that owns ``param``."""
        return self._by_name[self._param_to_op[id(param)]]

    def of_kind(self, kind: str) -> list[Operator]:
        return [op for op in self.operators if op.kind == kind]

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
    from megatron_moevement.state.optim_view import iter_optimizers

    compute = sum(p.numel() * p.element_size() for p in gpt_model.parameters())
    main = 0
    optim = 0
    for leaf in iter_optimizers(optimizer):
        for group in leaf.optimizer.param_groups:
            for p in group["params"]:
                main += _nbytes(p)
                state = leaf.optimizer.state.get(p, {})
                optim += sum(_nbytes(v) for v in state.values() if torch.is_tensor(v))
    return {"compute": compute, "main": main, "optimizer": optim}


def operator_tensors(op, kinds: Sequence[str]) -> list[tuple[str, torch.Tensor]]:
    """(key, live tensor) pairs of operator ``op`` for the given kinds (compute/main/optim).

    When the optimizer steps the model parameter itself (plain FP32 training), the compute weight
    *is* the main parameter: it is listed once, as ``compute``.
    """
    out: list[tuple[str, torch.Tensor]] = []
    for p in op.params:
        if "compute" in kinds:
            out.append((f"{op.name}/compute/{p.name}", p.param.detach()))
        state = p.state
        if state is None or state.main_param is None:
            continue
        if "main" in kinds and not state.main_is_model:
            out.append((f"{op.name}/main/{p.name}", state.main_param.detach()))
        if "optim" in kinds:
            for skey in sorted(state.optimizer_state):
                value = state.optimizer_state[skey]
                if torch.is_tensor(value):
                    out.append((f"{op.name}/optim/{p.name}/{skey}", value.detach()))
    return out


def layer_number_of(model: torch.nn.Module, module_name: str) -> int:
    """Global 0-based number of the transformer layer that contains submodule ``module_name``
    (e.g. ``"decoder.layers.1.mlp.router"``), from Megatron's ``layer_number``."""
    parts = module_name.split(".")
    idx = parts.index("layers")
    return int(model.get_submodule(".".join(parts[: idx + 2])).layer_number) - 1
