"""A warm spare for Megatron-LM's own ``pretrain_gpt.py``: compile Megatron's fusions while waiting.

``pretrain()`` calls ``set_jit_fusion_options()``, whose warm-up runs Megatron's fused
bias-GeLU/SwiGLU and bias-dropout-add functions a few times. They are ``torch.compile``\\ d
(``megatron.core.jit.jit_fuser``), so a process's first ``pretrain()`` traces and compiles them:
3.7 s of a 5.4 s rebuild on CPU (PP2 x DP2 x EP2), measured with cProfile on the spare that
took a killed rank's place. Every survivor compiled them when the job started and skips it in its
second ``pretrain()``, so the whole job waited for the spare in the next collective.

:func:`warm_up_megatron_spare` runs that same warm-up in the spare process before it waits for a
rank to take, with the job's own arguments (so the traced shapes, dtypes and ``requires_grad``
combinations are the ones its real ``pretrain()`` asks for and dynamo's cache serves them),
inside :func:`~megatron_moevement.recovery.warm_spare.warm_up_spare`'s private single-process
group, and then removes Megatron's global arguments again. The compiled code is all it keeps.
It draws from the default generator, which ``pretrain()`` seeds afterwards, and a failure costs
only its benefit (the spare goes on cold).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from typing import Sequence

from megatron_moevement.logging_utils import get_logger
from megatron_moevement.recovery.warm_spare import warm_up_spare

logger = get_logger(__name__)

WARM_SPARE_ENV = "MOEVEMENT_WARM_SPARE"
"""``"0"`` makes a Megatron-LM spare start cold (benchmarks compare the two); warm otherwise."""


def warm_spare_enabled() -> bool:
    """False when ``MOEVEMENT_WARM_SPARE=0``."""
    return os.environ.get(WARM_SPARE_ENV, "1") != "0"


def warm_up_megatron_spare(script: str, script_args: Sequence[str]) -> float | None:
    """Compiles Megatron-LM's fusions for the job ``script script_args`` describes (see the
    module docstring). Call in a spare process once the Megatron-LM tree is on ``sys.path`` (and
    the CPU redirections applied), before it joins the job's session.

    Returns:
        Seconds taken, or ``None`` when the warm-up failed or was skipped.
    """
    if not warm_spare_enabled():
        logger.info("warm spare: %s=0, the spare starts cold", WARM_SPARE_ENV)
        return None
    return warm_up_spare(lambda: _compile_megatron_fusions(script, script_args))


def _compile_megatron_fusions(script: str, script_args: Sequence[str]) -> None:
    import torch
    from megatron.core import parallel_state
    from megatron.training import global_vars
    from megatron.training.arguments import parse_args, validate_args
    from megatron.training.initialize import set_jit_fusion_options

    from megatron_moevement.megatron.glue import extra_args_provider

    saved_argv = sys.argv
    sys.argv = [str(script), *script_args]
    try:
        # validate_args prints the whole argument table on rank 0 (a spare has no rank yet):
        # the rank it takes prints it anyway.
        with contextlib.redirect_stdout(io.StringIO()):
            args = parse_args(extra_args_provider(), ignore_unknown_args=True)
            if args.yaml_cfg is not None:
                from megatron.training.yaml_arguments import validate_yaml

                args = validate_yaml(args, {})
            else:
                validate_args(args, {})
    finally:
        sys.argv = saved_argv
    if torch.cuda.is_available():
        # Compiled code is guarded on the device: use the one the rank will run on.
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    global_vars.set_args(args)
    # With sequence parallelism the warm-up reads the tensor-parallel size from parallel state.
    parallel_state.set_tensor_model_parallel_world_size(args.tensor_model_parallel_size)
    try:
        set_jit_fusion_options()
    finally:
        global_vars.set_args(None)  # parallel state is reset by warm_up_spare
