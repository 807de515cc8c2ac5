"""Running Megatron-LM's own training scripts (``pretrain_gpt.py``) with this package's runtime.

``python -m megatron_moevement.megatron.pretrain MEGATRON_LM/pretrain_gpt.py ARGS...`` runs the
script unchanged, as ``__main__``, after putting its Megatron-LM tree on ``sys.path`` and, on a
machine without CUDA, applying the CPU redirections (``runtime/cpu_compat.py``, the only code
that patches Megatron). On a GPU nothing is patched and this is the same as ``python
pretrain_gpt.py ARGS...``.

The script runs inside this module's namespace rather than through ``runpy``: child processes
started with the ``spawn`` method (``dist_checkpointing``'s ``torch_dist`` save does) import the
parent's ``__main__`` module again, and importing this one applies the redirections (the tree's
location travels in ``MOEVEMENT_MEGATRON_LM_DIR``) without running the script a second time.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

TREE_ENV = "MOEVEMENT_MEGATRON_LM_DIR"
"""Environment variable holding the Megatron-LM tree of the running script."""


def is_megatron_lm_tree(tree: str | os.PathLike) -> bool:
    """True for a Megatron-LM checkout (it has ``megatron/training``)."""
    return (Path(tree) / "megatron" / "training").is_dir()


def prepare(tree: str | os.PathLike) -> None:
    """Puts the script's ``tree`` first on ``sys.path`` and, for a Megatron-LM tree, applies the
    CPU redirections its training loop needs (a no-op with CUDA)."""
    tree = str(Path(tree).resolve())
    if tree not in sys.path:
        sys.path.insert(0, tree)
    if not is_megatron_lm_tree(tree):
        return  # another script: nothing of Megatron-LM's to redirect
    os.environ[TREE_ENV] = tree
    # Megatron builds its dataset helpers with `python3 -m pybind11` from PATH: make that the
    # interpreter running the script (the one with this package's dependencies).
    bin_dir = str(Path(sys.executable).parent)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    from megatron_moevement.runtime.cpu_compat import apply_megatron_lm_cpu_compat

    apply_megatron_lm_cpu_compat()


def run_script(script: str | os.PathLike, argv: list[str]) -> None:
    """Runs ``script`` as ``__main__`` with ``argv`` (see the module docstring)."""
    script = Path(script).resolve()
    if not script.is_file():
        raise SystemExit(f"error: {script} does not exist (pass Megatron-LM's pretrain_gpt.py)")
    prepare(script.parent)
    sys.argv = [str(script), *argv]
    exec_in_main(script)


def exec_in_main(script: str | os.PathLike) -> None:
    """Executes ``script`` in the namespace of the running ``__main__`` module (started with
    ``python -m``), which keeps its ``__spec__``: children started with the ``spawn`` method then
    import that module by name, and with it the redirections, rather than the script's path."""
    script = Path(script).resolve()
    namespace = sys.modules["__main__"].__dict__
    namespace["__file__"] = str(script)
    code = compile(script.read_text(), str(script), "exec")
    exec(code, namespace)  # noqa: S102 - running the user's training script is the point


if os.environ.get(TREE_ENV) and __name__ != "__main__":
    # A spawned child of a running script (see the module docstring).
    prepare(os.environ[TREE_ENV])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        raise SystemExit(__doc__)
    run_script(argv[0], argv[1:])


if __name__ == "__main__":
    main()
