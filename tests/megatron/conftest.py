import pytest

from tests.megatron.megatron_lm import patched_tree


@pytest.fixture(scope="session")
def megatron_lm(tmp_path_factory):
    """A patched copy of Megatron-LM's tree (the tests skip without one)."""
    return patched_tree(tmp_path_factory)
