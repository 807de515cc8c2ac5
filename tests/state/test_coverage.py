"""State coverage as a checked invariant: every parameter and buffer is placed, or the registry
refuses the model naming the tensor; grouped-GEMM weights are split into per-expert blocks."""

from types import SimpleNamespace

import pytest
import torch

from megatron_moevement.replay.frozen import frozen_main_params, frozen_operators
from megatron_moevement.state.operators import OperatorRegistry, RegistryError, operator_tensors


class Router(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(4, 8))
        self.register_buffer("expert_bias", torch.zeros(4))
        self.register_buffer("local_tokens_per_expert", torch.zeros(4), persistent=False)


class GroupedExperts(torch.nn.Module):
    def __init__(self, n=2):
        super().__init__()
        self.weight1 = torch.nn.Parameter(torch.randn(8, 6 * n))  # viewed as [n, 8, 6]
        self.weight2 = torch.nn.Parameter(torch.randn(6 * n, 8))


class MoE(torch.nn.Module):
    def __init__(self, grouped):
        super().__init__()
        self.router = Router()
        self.local_expert_indices = [2, 3]  # this rank holds experts 2 and 3 of the layer
        self.experts = GroupedExperts() if grouped else torch.nn.Module()


class Layer(torch.nn.Module):
    def __init__(self, grouped):
        super().__init__()
        self.layer_number = 1
        self.input_layernorm = torch.nn.LayerNorm(8)
        self.mlp = MoE(grouped)


class Decoder(torch.nn.Module):
    def __init__(self, grouped):
        super().__init__()
        self.layers = torch.nn.ModuleList([Layer(grouped)])


class TinyGPT(torch.nn.Module):
    """Megatron-Core GPTModel's parameter names, nothing else."""

    def __init__(self, grouped=True):
        super().__init__()
        self.config = SimpleNamespace(num_layers=1)
        self.embedding = torch.nn.Embedding(16, 8)
        self.decoder = Decoder(grouped)


def _registry(model):
    optimizer = SimpleNamespace(optimizer=torch.optim.Adam(model.parameters()))
    return OperatorRegistry(model, optimizer, ep_rank=1, num_experts=4)


def test_buffers_belong_to_their_operator():
    registry = _registry(TinyGPT())
    router = registry["layer0.router"]
    assert [b.name for b in router.buffers] == [
        "decoder.layers.0.mlp.router.expert_bias",
        "decoder.layers.0.mlp.router.local_tokens_per_expert",
    ]
    keys = [k for k, _ in operator_tensors(router, ("compute",))]
    assert "layer0.router/buffer/decoder.layers.0.mlp.router.expert_bias" in keys
    assert registry.coverage()["buffers"] == 2


def test_a_tensor_outside_every_operator_is_refused_by_name():
    model = TinyGPT()
    model.register_buffer("my_stats", torch.zeros(3))
    with pytest.raises(RegistryError, match="buffer 'my_stats' belongs to no known operator"):
        _registry(model)
    model = TinyGPT()
    model.extra = torch.nn.Linear(2, 2)
    with pytest.raises(RegistryError, match=r"parameter 'extra.weight' .*Fix:"):
        _registry(model)


def test_grouped_gemm_weights_are_split_into_expert_blocks():
    model = TinyGPT(grouped=True)
    registry = _registry(model)
    experts = registry.of_kind("expert")
    assert [op.name for op in experts] == ["layer0.expert2", "layer0.expert3"]
    w1 = model.decoder.layers[0].mlp.experts.weight1
    blocks = [p.flat_range for op in experts for p in op.params if p.name.endswith("weight1")]
    assert blocks == [(0, 48), (48, 96)]
    assert registry.owners(w1) == ["layer0.expert2", "layer0.expert3"]
    # Each expert's compute view is its block of the stacked weight, in place.
    view = dict(operator_tensors(experts[1], ("compute",)))[
        "layer0.expert3/compute/decoder.layers.0.mlp.experts.weight1[48:96]"
    ]
    with torch.no_grad():
        view.fill_(7.0)
    assert torch.all(w1.view(2, 8, 6)[1] == 7.0) and not torch.any(w1.view(2, 8, 6)[0] == 7.0)
    assert (
        sum(op.numel for op in experts)
        == w1.numel() + model.decoder.layers[0].mlp.experts.weight2.numel()
    )


def test_a_stacked_weight_freezes_only_when_all_of_its_experts_do():
    model = TinyGPT(grouped=True)
    registry = _registry(model)
    w1 = model.decoder.layers[0].mlp.experts.weight1
    with frozen_operators(registry, ["layer0.expert2"]):
        assert w1.requires_grad  # expert 3 trains: the stacked weight stays live
    assert frozen_main_params(registry, ["layer0.expert2"]) == []
    with frozen_operators(registry, ["layer0.expert2", "layer0.expert3"]):
        assert not w1.requires_grad
    assert w1.requires_grad
