"""The operator registry covers every parameter exactly once and accounts for every byte."""

import json

import pytest

from megatron_moevement.harness.layout import ParallelLayout
from tests.conftest import LAYOUTS

pytestmark = pytest.mark.multiproc

NUM_EXPERTS = 4
NUM_LAYERS = 4

CASES = [
    pytest.param("single", dict(precision="fp32"), id="single-fp32"),
    pytest.param("ep2", dict(precision="bf16"), id="ep2-bf16"),
    pytest.param("pp2", dict(precision="bf16", use_distributed_optimizer=True), id="pp2-distopt"),
    pytest.param(
        "pp2xdp2xep2",
        dict(precision="bf16", use_distributed_optimizer=True),
        id="pp2xdp2xep2-bf16-distopt",
    ),
    pytest.param("pp2xdp2xep2", dict(precision="fp32"), id="pp2xdp2xep2-fp32"),
]


@pytest.mark.parametrize("layout_name,model", CASES)
def test_registry_covers_every_parameter_once(run_job, layout_name, model):
    layout = ParallelLayout(**LAYOUTS[layout_name])
    out = run_job("reg", job="registry", layout=LAYOUTS[layout_name], model=model, iterations=1)
    reports = [
        json.loads((out / f"registry_rank{r}.json").read_text()) for r in range(layout.world_size)
    ]
    global_ops = {}
    for rep in reports:
        names = [p for op in rep["operators"] for p in op["params"]]
        # No overlaps and no gaps on each rank.
        assert len(names) == len(set(names)), "a parameter is in two operators"
        assert sorted(names) == sorted(rep["model_param_names"]), "a parameter has no operator"
        # Byte totals equal those counted directly from the model and the optimizers.
        assert rep["bytes"]["total"] == rep["independent_totals"]
        assert rep["bytes"]["total"]["optimizer"] > 0
        for op in rep["operators"]:
            assert op["bytes"]["compute"] > 0
            if op["kind"] == "expert":
                assert op["owner_ep_rank"] == rep["ep_rank"]
                assert op["expert"] // (NUM_EXPERTS // layout.ep) == rep["ep_rank"]
            global_ops.setdefault(op["name"], op["kind"])
    # Across the job: every layer has a dense part, a router and all its experts.
    for layer in range(NUM_LAYERS):
        assert global_ops[f"layer{layer}.dense"] == "dense"
        assert global_ops[f"layer{layer}.router"] == "router"
        for expert in range(NUM_EXPERTS):
            assert global_ops[f"layer{layer}.expert{expert}"] == "expert"
    assert global_ops["embedding"] == "embedding" and global_ops["output"] == "output"
    assert len(global_ops) == 2 + NUM_LAYERS * (2 + NUM_EXPERTS)


def test_bf16_full_state_is_larger_than_compute_weights(run_job):
    out = run_job(
        "reg", job="registry", layout=LAYOUTS["single"], model=dict(precision="bf16"), iterations=1
    )
    rep = json.loads((out / "registry_rank0.json").read_text())
    for op in rep["operators"]:
        b = op["bytes"]
        # bf16 compute weight: 2 B/param; FP32 main: 4 B/param; Adam moments: 8 B/param (+ step).
        assert b["main"] == 2 * b["compute"]
        assert b["optimizer"] >= 2 * b["main"]
