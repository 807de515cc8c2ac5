"""A Megatron-LM spare compiles Megatron's fusions while it waits, for the job's own shapes.

The check runs in a fresh process (it sets Megatron's and dynamo's process-global state): after
the warm-up, the call ``pretrain()`` makes (``set_jit_fusion_options`` with the job's arguments)
must compile nothing, and the warm-up must leave no Megatron arguments, parallel state or
process group behind.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from megatron_moevement.harness.megatron_lm import model_args
from megatron_moevement.megatron.spare_warm_up import WARM_SPARE_ENV, warm_spare_enabled

CHECK = textwrap.dedent("""
    import json, sys
    from megatron_moevement.megatron.pretrain import prepare
    tree, script, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    prepare(tree)
    import torch, torch.distributed as dist
    from torch._dynamo.utils import counters
    from megatron_moevement.megatron.spare_warm_up import warm_up_megatron_spare
    seconds = warm_up_megatron_spare(script, args)
    from megatron.core import parallel_state
    from megatron.training import global_vars
    from megatron.training.arguments import parse_args, validate_args
    from megatron.training.initialize import set_jit_fusion_options
    from megatron_moevement.megatron.glue import extra_args_provider
    left = dict(
        args=global_vars._GLOBAL_ARGS is not None,
        tp_size=parallel_state._MPU_TENSOR_MODEL_PARALLEL_WORLD_SIZE,
        group=dist.is_initialized(),
    )
    warm_frames = counters["frames"]["ok"]
    # What pretrain() does next in the rank this spare takes (initialize_megatron, then the
    # fusion warm-up), here in a single-process group.
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    sys.argv = [script, *args]
    real = parse_args(extra_args_provider(), ignore_unknown_args=True)
    validate_args(real, {})
    global_vars.set_args(real)
    set_jit_fusion_options()
    print("RESULT " + json.dumps(dict(
        seconds=seconds, left=left, warm_frames=warm_frames,
        frames_after=counters["frames"]["ok"] - warm_frames,
    )))
    """)


@pytest.mark.multiproc
def test_the_warm_up_compiles_what_pretrain_compiles_and_leaves_nothing_else(megatron_lm):
    job_args = [
        *model_args(4),
        "--untie-embeddings-and-output-weights",
        "--ckpt-strategy",
        "moevement",
    ]
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            CHECK,
            str(megatron_lm),
            str(megatron_lm / "pretrain_gpt.py"),
            *job_args,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "WORLD_SIZE": "4", "MOEVEMENT_SPARE": "1"},
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stdout[-3000:] + result.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT ") :])
    assert out["seconds"] is not None, "the warm-up failed: " + result.stderr[-3000:]
    assert out["warm_frames"] > 0  # it compiled Megatron's fused functions
    assert out["frames_after"] == 0  # pretrain()'s own warm-up found them compiled
    assert out["left"] == {"args": False, "tp_size": None, "group": False}


def test_the_warm_up_can_be_turned_off(monkeypatch):
    monkeypatch.delenv(WARM_SPARE_ENV, raising=False)
    assert warm_spare_enabled()
    monkeypatch.setenv(WARM_SPARE_ENV, "0")
    assert not warm_spare_enabled()
    from megatron_moevement.megatron.spare_warm_up import warm_up_megatron_spare

    assert warm_up_megatron_spare("pretrain_gpt.py", []) is None
