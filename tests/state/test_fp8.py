"""FP8 state in the snapshot path, on CPU.

Transformer Engine does not run here, so TE's tensors are replaced by **test doubles with TE's
layout** (``TEFloat8TensorLayout``, ``TEMXFP8TensorLayout``, ``TEFp8MetaLayout``): objects that
carry the attributes TE's ``Float8Tensor`` / ``MXFP8Tensor`` and delayed-scaling ``fp8_meta``
carry, filled with torch float8 bytes. They test that MoEvement captures and restores exactly the
tensors that hold FP8 state; they say nothing about TE on a GPU (``benchmarks/gpu/run_all.sh``).
"""

from types import SimpleNamespace

import pytest
import torch

from megatron_moevement.replay.loader import SlotLoader
from megatron_moevement.snapshot.engine import SnapshotEngine
from megatron_moevement.snapshot.sharding import ShardPlan
from megatron_moevement.state.fp8 import (
    FP8StateError,
    fp8_refusal,
    is_quantized,
    quantized_components,
)
from megatron_moevement.state.operators import (
    Operator,
    OperatorParam,
    OperatorRegistry,
    RegistryError,
    operator_tensors,
)
from megatron_moevement.state.support import UnsupportedModelError, check_model_supported
from tests.fakes import FakeRegistry, FakeSchedule
from tests.state.test_coverage import TinyGPT

SHARDING = SimpleNamespace(
    dp_rank=0, dp_size=1, expert_dp_rank=0, expert_dp_size=1, distributed_optimizer=False
)


def fp8_bytes(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=gen, dtype=torch.int32).to(torch.uint8)


class TEFloat8TensorLayout(torch.nn.Parameter):
    """Test double with the layout of TE's ``Float8Tensor``: nominal bf16 parameter whose state
    is ``_data`` (uint8) and ``_scale_inv`` (FP32), plus TE's transpose cache."""

    def __new__(cls, shape, seed):
        self = super().__new__(cls, torch.zeros(shape, dtype=torch.bfloat16), requires_grad=False)
        self._data = fp8_bytes(shape, seed)
        self._scale_inv = torch.tensor([0.5 + seed], dtype=torch.float32)
        self._fp8_dtype = "kFloat8E4M3"
        self._transpose = self._data.t().contiguous()
        self._transpose_invalid = False
        return self


class TEMXFP8TensorLayout(torch.nn.Parameter):
    """Test double with the layout of TE's ``MXFP8Tensor`` (row-wise usage only)."""

    def __new__(cls, shape, seed):
        self = super().__new__(cls, torch.zeros(shape, dtype=torch.bfloat16), requires_grad=False)
        self._rowwise_data = fp8_bytes(shape, seed)
        self._rowwise_scale_inv = fp8_bytes((shape[0], shape[1] // 32), seed + 1)
        self._columnwise_data = None
        self._columnwise_scale_inv = None
        return self


class TEFp8MetaLayout:
    """Test double with the layout of one delayed-scaling entry of TE's ``fp8_meta``."""

    def __init__(self, n, history, seed):
        gen = torch.Generator().manual_seed(seed)
        self.scale = torch.rand(n, generator=gen)
        self.amax_history = torch.rand(history, n, generator=gen)


def _snapshot(ops, slices):
    registry = FakeRegistry(ops)
    names = {op.name for op in ops}
    plan = ShardPlan(full_state=set(), compute=names, owner_of=dict.fromkeys(names, 0))
    engine = SnapshotEngine(registry, plan, rank=0, asynchronous=False)
    ckpt = engine.begin_window(FakeSchedule(slices), start_iteration=0, window=0)
    return registry, plan, engine, ckpt


def test_float8_tensor_is_captured_as_data_and_scale_bit_exactly():
    weight = TEFloat8TensorLayout((64, 32), seed=1)
    op = Operator("layer0.expert0", "expert", 0, expert=0, params=[OperatorParam("w", weight)])
    keys = [k for k, _ in operator_tensors(op, ("compute",))]
    assert keys == ["layer0.expert0/compute/w#_data", "layer0.expert0/compute/w#_scale_inv"]
    # One byte per parameter plus the scale: what the snapshot costs for FP8 compute weights.
    assert op.compute_bytes == 64 * 32 + 4
    registry, plan, engine, ckpt = _snapshot([op], [["layer0.expert0"]])
    engine.capture(ckpt, 0, 0)
    engine.shutdown()
    data, scale = weight._data.clone(), weight._scale_inv.clone()
    weight._data.zero_()
    weight._scale_inv.fill_(7.0)
    SlotLoader(registry, plan, SHARDING, None).apply(ckpt, 0)
    assert torch.equal(weight._data, data) and torch.equal(weight._scale_inv, scale)
    # The transpose cache was derived from the old data: dropped, for TE to recompute.
    assert weight._transpose is None and weight._transpose_invalid


def test_frozen_fp8_operator_replays_the_quantized_weights_of_each_iteration():
    """A frozen operator's compute weights are reloaded from every slot: after loading slot k it
    holds the FP8 data and scale it had after iteration k."""
    weight = TEFloat8TensorLayout((16, 32), seed=2)
    frozen = Operator("b", "dense", 0, params=[OperatorParam("b.w", weight)])
    other = Operator(
        "a", "dense", 0, params=[OperatorParam("a.w", torch.nn.Parameter(torch.zeros(4)))]
    )
    registry, plan, engine, ckpt = _snapshot([other, frozen], [["a"], ["b"]])
    history = []
    for it in range(2):
        history.append((weight._data.clone(), weight._scale_inv.clone()))
        engine.capture(ckpt, it, it)
        weight._data.copy_(fp8_bytes((16, 32), 10 + it))  # the step re-quantizes the weight
        weight._scale_inv.mul_(3)
    engine.shutdown()
    loader = SlotLoader(registry, plan, SHARDING, None)
    for k in range(2):
        loader.apply(ckpt, k)
        assert torch.equal(weight._data, history[k][0])
        assert torch.equal(weight._scale_inv, history[k][1])


def test_mxfp8_tensor_captures_the_usages_it_has():
    weight = TEMXFP8TensorLayout((8, 64), seed=3)
    names = [n for n, _ in quantized_components(weight)]
    assert names == ["_rowwise_data", "_rowwise_scale_inv"]
    op = Operator("output", "output", params=[OperatorParam("output_layer.weight", weight)])
    assert op.compute_bytes == 8 * 64 + 8 * 2
    registry, plan, engine, ckpt = _snapshot([op], [["output"]])
    engine.capture(ckpt, 0, 0)
    engine.shutdown()
    saved = weight._rowwise_data.clone()
    weight._rowwise_data.zero_()
    SlotLoader(registry, plan, SHARDING, None).apply(ckpt, 0)
    assert torch.equal(weight._rowwise_data, saved)


def test_delayed_scaling_state_belongs_to_the_owning_operator():
    model = TinyGPT(grouped=False)
    qkv = torch.nn.Linear(8, 8)
    model.decoder.layers[0].self_attention = torch.nn.Module()
    model.decoder.layers[0].self_attention.linear_qkv = qkv
    qkv.fp8_meta = {
        "scaling_fwd": TEFp8MetaLayout(3, 16, seed=4),
        "scaling_bwd": TEFp8MetaLayout(2, 16, seed=5),
        "recipe": object(),
    }
    optimizer = SimpleNamespace(optimizer=torch.optim.Adam(model.parameters()))
    registry = OperatorRegistry(model, optimizer, ep_rank=1, num_experts=4)
    dense = registry["layer0.dense"]
    prefix = "layer0.dense/buffer/decoder.layers.0.self_attention.linear_qkv.fp8_meta"
    keys = [k for k, _ in operator_tensors(dense, ("compute",)) if "fp8_meta" in k]
    assert keys == [
        f"{prefix}.scaling_fwd.scale",
        f"{prefix}.scaling_fwd.amax_history",
        f"{prefix}.scaling_bwd.scale",
        f"{prefix}.scaling_bwd.amax_history",
    ]
    # TE rolls the amax history and reallocates the meta tensors on a recipe change: the
    # registry reads them live, so a snapshot after the change still captures the new tensor.
    qkv.fp8_meta["scaling_fwd"].amax_history = torch.full((16, 3), 2.0)
    live = dict(operator_tensors(dense, ("compute",)))
    assert torch.equal(live[f"{prefix}.scaling_fwd.amax_history"], torch.full((16, 3), 2.0))
    registry_, plan, engine, ckpt = _snapshot([dense], [["layer0.dense"]])
    engine.capture(ckpt, 0, 0)
    engine.shutdown()
    before = qkv.fp8_meta["scaling_fwd"].amax_history.clone()
    qkv.fp8_meta["scaling_fwd"].amax_history.zero_()
    SlotLoader(registry_, plan, SHARDING, None).apply(ckpt, 0)
    assert torch.equal(qkv.fp8_meta["scaling_fwd"].amax_history, before)


def test_fp8_options_without_exact_capture_are_refused():
    for recipe in ("delayed", "tensorwise", "mxfp8"):
        check_model_supported(SimpleNamespace(fp8="hybrid", fp8_recipe=recipe))
    assert fp8_refusal(SimpleNamespace(fp8=None, fp8_recipe="blockwise")) is None
    with pytest.raises(UnsupportedModelError, match="fp8_recipe='blockwise'.*--fp8-recipe"):
        check_model_supported(SimpleNamespace(fp8="e4m3", fp8_recipe="blockwise"))


def test_fp8_grouped_gemm_weight_and_unknown_layouts_are_refused():
    model = TinyGPT(grouped=True)
    experts = model.decoder.layers[0].mlp.experts
    experts.weight1 = TEFloat8TensorLayout((8, 12), seed=6)
    optimizer = SimpleNamespace(optimizer=torch.optim.Adam([experts.weight2]))
    with pytest.raises(RegistryError, match="weight1' is an FP8 tensor.*TEGroupedMLP"):
        OperatorRegistry(model, optimizer, ep_rank=1, num_experts=4)

    class QuantizedTensor(torch.Tensor):  # TE's base class name, a layout nobody described
        pass

    class BlockScaled(QuantizedTensor):
        pass

    odd = torch.zeros(4).as_subclass(BlockScaled)
    assert is_quantized(odd)
    with pytest.raises(FP8StateError, match="layout MoEvement does not know"):
        quantized_components(odd)
