"""``moevement-convert``: a durable MoEvement checkpoint -> a dense ``torch_dist`` checkpoint.

The slots of a sparse checkpoint come from different iterations, so a consistent dense state
needs the sparse-to-dense replay, with the same data the original run saw. The converter
therefore runs a job on the layout that wrote the checkpoint: every rank builds the model and
optimizer, loads its sparse checkpoint (plain ``dist_checkpointing.load``), replays to the target
iteration (default: the last one whose optimizer scalars were saved; any iteration from the end
of the window on), and saves the model's ``sharded_state_dict()`` and the optimizer's with the
standard ``torch_dist`` backend. Plain Megatron-Core loads that into a fresh model, on any layout
(``dist_checkpointing`` reshards), without this package::

    moevement-convert /ckpt/durable /ckpt/dense            # newest complete iter_* under it
    python -m megatron_moevement.durable.convert /ckpt/durable/iter_0000099 /ckpt/dense \\
        --iteration 97 --no-optimizer

The dense checkpoint's common part holds ``iteration`` (Megatron-LM's count of completed
iterations: target + 1) and ``moevement_conversion`` (source, window, target iteration).

The command builds the local harness model (``megatron_moevement.harness``), whose data is
addressable by iteration, from the description the writing job stored with the checkpoint
(``strategy.durable.metadata["harness"]``) and runs it as a local multi-process job. For another
training setup, call :func:`convert_in_job` inside that job's own processes, with its model,
optimizer and ``train_iteration`` (its data must be addressable by iteration too).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

from megatron_moevement.durable.errors import DurableCheckpointError
from megatron_moevement.logging_utils import configure_logging, get_logger

logger = get_logger("megatron_moevement.durable.convert")

DEFAULT_TIMEOUT_S = 1800.0


class ConversionError(DurableCheckpointError):
    """The checkpoint cannot be converted (e.g. it lacks the description of its job)."""


# ----------------------------------------------------------------------------- in a job
DENSE_CONTENT_METADATA = {
    "distrib_optim_sharding_type": "dp_reshardable",
    "singleton_local_shards": False,
    "chained_optim_avoid_prefix": True,
}
"""How model and optimizer state are sharded in the dense checkpoint (Megatron-LM's metadata
keys, stored as the checkpoint's ``content_metadata``). ``fully_reshardable`` lets a distributed
optimizer's state be loaded on any layout; Megatron's default for it in 0.16.1
(``fully_sharded_model_space``) cannot be saved by that release."""


def dense_sharded_state_dict(
    gpt_model, optimizer=None, is_loading: bool = False, metadata: dict | None = None
) -> dict:
    """``{"model": ..., "optimizer": ...}`` as Megatron-LM lays out a single-chunk checkpoint.

    Args:
        gpt_model: The unwrapped ``GPTModel`` stage.
        optimizer: Its Megatron optimizer, or ``None`` for the model only.
        is_loading: Build the request for a load (initializes optimizer state).
        metadata: Sharding metadata (default :data:`DENSE_CONTENT_METADATA`; on load, pass
            ``dist_checkpointing.load_content_metadata(path)``).
    """
    metadata = DENSE_CONTENT_METADATA if metadata is None else metadata
    model_sd = gpt_model.sharded_state_dict(metadata=metadata)
    state = {"model": model_sd}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata=metadata
        )
    return state


def save_dense(gpt_model, optimizer, output: str | Path, common: dict | None = None) -> None:
    """Saves the model (and optimizer, unless ``None``) with the ``torch_dist`` backend (all
    ranks); the sharding metadata goes into the checkpoint's ``content_metadata``."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    state = dense_sharded_state_dict(gpt_model, optimizer)
    state.update(common or {})
    dist_checkpointing.save(
        state,
        str(output),
        sharded_strategy=("torch_dist", 1),
        content_metadata=dict(DENSE_CONTENT_METADATA),
    )


def convert_in_job(
    strategy,
    train_iteration: Callable[[int], object],
    source: str | Path,
    output: str | Path,
    iteration: int | None = None,
    optimizer: bool = True,
) -> dict:
    """Converts inside a running job (every rank calls it): load, replay, save ``torch_dist``.

    Args:
        strategy: A ``MoEvementStrategy`` built on the layout and model that wrote ``source``.
        train_iteration: ``f(iteration)`` running one iteration with addressable data.
        source: The durable checkpoint (or a durable directory: its newest complete one).
        output: Where to write the dense checkpoint.
        iteration: Target iteration (default: the checkpoint's last saved iteration).
        optimizer: Also save the optimizer state.

    Returns:
        A report (source, target iteration, replayed iterations, seconds per phase).
    """
    from megatron.core import dist_checkpointing

    from megatron_moevement.durable.backend import STATE_DICT_KEY, moevement_sharded_state_dict
    from megatron_moevement.durable.files import resolve_checkpoint

    source = resolve_checkpoint(source)
    t0 = time.perf_counter()
    loaded = dist_checkpointing.load(moevement_sharded_state_dict(strategy), str(source))
    state = loaded[STATE_DICT_KEY]
    t1 = time.perf_counter()
    replay = state.restore(strategy, train_iteration, target=iteration, resume=False)
    t2 = time.perf_counter()
    target = replay["target_iteration"]
    common = {
        "iteration": target + 1,
        "moevement_conversion": dict(
            source=str(source),
            window=state.checkpoint.generation,
            window_start=state.window_start,
            window_size=state.checkpoint.window_size,
            target_iteration=target,
        ),
    }
    save_dense(strategy.gpt_model, strategy.optimizer if optimizer else None, output, common)
    t3 = time.perf_counter()
    return dict(
        source=str(source),
        output=str(output),
        target_iteration=target,
        iterations_replayed=replay["iterations_replayed"],
        load_s=t1 - t0,
        replay_s=t2 - t1,
        save_s=t3 - t2,
    )


def run_convert_job(spec) -> None:
    """Harness job ``durable_convert`` (one process per rank of the layout that wrote it).

    ``spec.moevement``: ``source``, ``output``, optional ``iteration``, ``optimizer`` (bool) and
    ``config`` (the writing job's ``MoEvementConfig`` fields).
    """
    import torch.distributed as dist

    from megatron_moevement.harness.layout import ParallelLayout
    from megatron_moevement.harness.model import TinyMoEConfig
    from megatron_moevement.harness.trainer import HarnessTrainer
    from megatron_moevement.strategy import MoEvementStrategy

    opts = dict(spec.moevement)
    trainer = HarnessTrainer(TinyMoEConfig.from_dict(spec.model), ParallelLayout(**spec.layout))
    strategy = MoEvementStrategy(
        trainer.gpt_model, trainer.optimizer, replay_config(opts.get("config", {}))
    )
    try:
        report = convert_in_job(
            strategy,
            trainer.train_iteration,
            opts["source"],
            opts["output"],
            opts.get("iteration"),
            bool(opts.get("optimizer", True)),
        )
    finally:
        strategy.shutdown()
    if dist.get_rank() == 0 and spec.output_dir:
        (Path(spec.output_dir) / "convert.json").write_text(json.dumps(report, indent=1))


def replay_config(saved: dict):
    """A ``MoEvementConfig`` for replaying a saved checkpoint: the writing job's settings that
    matter for loading (checksums), without replication, logging or durable saves."""
    from dataclasses import fields

    from megatron_moevement.config import MoEvementConfig

    known = {f.name for f in fields(MoEvementConfig)}
    values = {k: v for k, v in saved.items() if k in known}
    values.update(
        replication_factor=0,
        durable_dir=None,
        durable_interval=None,
        upstream_logging=False,
        d2h_bandwidth_bytes_per_s=1e10,
    )
    if values.get("iteration_time_s") is None:
        values["iteration_time_s"] = 1.0
    return MoEvementConfig.from_dict(values)


# ----------------------------------------------------------------------------- launcher
def convert(
    source: str | Path,
    output: str | Path,
    iteration: int | None = None,
    optimizer: bool = True,
    timeout: float = DEFAULT_TIMEOUT_S,
    work_dir: str | Path | None = None,
) -> dict:
    """Runs the conversion as a local multi-process job (one process per rank that wrote it).

    Args:
        source: A durable checkpoint, or a durable directory (its newest complete checkpoint).
        output: Directory for the dense ``torch_dist`` checkpoint (must be empty or absent).
        iteration: Target iteration (default: the checkpoint's last saved iteration).
        optimizer: Also convert the optimizer state.
        timeout: Seconds before the job is killed.
        work_dir: Where the job's spec and per-process logs go (default: ``output`` + ``.logs``).

    Returns:
        The job's report (see :func:`convert_in_job`).
    """
    from megatron_moevement.durable.files import resolve_checkpoint
    from megatron_moevement.durable.reader import read_index
    from megatron_moevement.harness.launcher import run_worker_job
    from megatron_moevement.harness.worker import WorkerSpec

    source = resolve_checkpoint(source).resolve()
    output = Path(output).resolve()
    index = read_index(source)
    harness = (index.get("metadata") or {}).get("harness")
    if not harness:
        raise ConversionError(
            f"{source} does not describe the job that wrote it (no metadata['harness'] with its "
            "model and layout), so moevement-convert cannot rebuild the model and its data. Fix: "
            "call megatron_moevement.durable.convert.convert_in_job(strategy, train_iteration, "
            "source, output) inside your own training job on the same layout (its data must be "
            "addressable by iteration), or set strategy.durable.metadata['harness'] = "
            "{'model': ..., 'layout': ...} when saving."
        )
    if iteration is not None and not index["window_end"] <= iteration <= index["iteration"]:
        raise ConversionError(
            f"--iteration {iteration} cannot be reconstructed from {source}: choose one from "
            f"{index['window_end']} (end of its window) to {index['iteration']} (last saved)"
        )
    if output.exists() and any(output.iterdir()):
        raise ConversionError(f"output directory {output} is not empty; choose a new one")
    work_dir = Path(work_dir) if work_dir is not None else output.with_name(output.name + ".logs")
    spec = WorkerSpec(
        job="durable_convert",
        layout=harness["layout"],
        model=harness["model"],
        moevement=dict(
            source=str(source),
            output=str(output),
            iteration=iteration,
            optimizer=optimizer,
            config=index.get("config", {}),
        ),
        iterations=0,
    )
    logger.info(
        "converting %s (world size %d, window %d..%d, saved to iteration %d) into %s",
        source,
        index["world_size"],
        index["window_start"],
        index["window_end"],
        index["iteration"],
        output,
    )
    run_worker_job(spec, work_dir, timeout=timeout)
    report = json.loads((work_dir / "convert.json").read_text())
    logger.info(
        "wrote dense torch_dist checkpoint %s (iteration %d; load %.1fs, replay %.1fs, "
        "save %.1fs)",
        output,
        report["target_iteration"],
        report["load_s"],
        report["replay_s"],
        report["save_s"],
    )
    return report


def main(argv: list[str] | None = None) -> int:
    """Command line of ``moevement-convert``."""
    parser = argparse.ArgumentParser(
        prog="moevement-convert",
        description="Convert a durable MoEvement (sparse) checkpoint into a dense torch_dist "
        "checkpoint that plain Megatron-Core dist_checkpointing.load can read.",
    )
    parser.add_argument(
        "source",
        help="durable checkpoint directory, or a durable_dir "
        "(its newest complete iter_* checkpoint is used)",
    )
    parser.add_argument("output", help="directory for the dense torch_dist checkpoint")
    parser.add_argument(
        "--iteration",
        type=int,
        default=None,
        help="iteration to reconstruct (default: the last one saved)",
    )
    parser.add_argument(
        "--no-optimizer", action="store_true", help="convert only the model parameters"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help="seconds before the conversion job is killed (default %(default)s)",
    )
    parser.add_argument(
        "--work-dir", default=None, help="where the job's spec and logs go (default: OUTPUT.logs)"
    )
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        report = convert(
            args.source,
            args.output,
            args.iteration,
            not args.no_optimizer,
            args.timeout,
            args.work_dir,
        )
    except DurableCheckpointError as exc:
        logger.error("%s", exc)
        return 2
    sys.stdout.write(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
