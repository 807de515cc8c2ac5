import os
from pathlib import Path

import pytest

from megatron_moevement.harness.megatron_lm import patch_tree

ROOT = Path(__file__).resolve().parents[2]
TREE = Path(os.environ.get("MEGATRON_LM_DIR", ROOT.parent / "shared" / "megatron-lm"))


@pytest.fixture(scope="session")
def megatron_lm(tmp_path_factory):
    """A patched copy of Megatron-LM's tree (``MEGATRON_LM_DIR``, default ``../shared/megatron-lm``
    beside the checkout); the tests that need it skip without one."""
    if not (TREE / "pretrain_gpt.py").is_file():
        pytest.skip(
            f"no Megatron-LM tree at {TREE}: set MEGATRON_LM_DIR to a Megatron-LM checkout at "
            "core_v0.16.1 to run Megatron-LM's pretrain_gpt.py"
        )
    return patch_tree(TREE, tmp_path_factory.mktemp("megatron-lm") / "Megatron-LM")
