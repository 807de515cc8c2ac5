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
    python -m megatron_moevement.convert /ckpt/durable/iter_0000099 /ckpt/dense \\
        --iteration 97 --no-optimizer

The dense checkpoint's common part holds ``iteration`` (Megatron-LM's count of completed
iterations: target + 1) and ``moevement_conversion`` (source, window, target iteration).

The command rebuilds the writing job from what the checkpoint records: its layout (one process
per rank that wrote it) and its job builder (``strategy.durable.metadata["job"] = {"builder":
"module:function", "spec": {...}}``; ``function(spec)`` returns the rank's model, optimizer and
data accessor, see :class:`ReplayJob`). The local harness records
``megatron_moevement.harness.trainer:build_replay_job``; any training setup whose data is
addressable by iteration can record its own, or call :func:`convert_in_job` inside its own
processes. Before replaying, the rebuilt model's operators are checked against the
checkpoint's operator manifest.

This module is a tool on top of the library (it builds a strategy and launches processes); the
durable tier itself (:mod:`megatron_moevement.durable`) sits below the strategy.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Protocol

from megatron.core import dist_checkpointing

from megatron_moevement.argtypes import NON_NEGATIVE_INT, POSITIVE_FLOAT
from megatron_moevement.config import MoEvementConfig
from megatron_moevement.durable.backend import STATE_DICT_KEY, moevement_sharded_state_dict
from megatron_moevement.durable.errors import DurableCheckpointError
from megatron_moevement.durable.files import resolve_checkpoint
from megatron_moevement.durable.reader import read_index, read_rank_schedule
from megatron_moevement.launch.local import LocalJob, exit_after_success
from megatron_moevement.logging_utils import configure_logging, get_logger
from megatron_moevement.strategy import MoEvementStrategy

logger = get_logger("megatron_moevement.convert")

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
    source = resolve_checkpoint(source)
    _check_operator_manifest(strategy, source)
    t0 = time.perf_counter()
    loaded = dist_checkpointing.load(moevement_sharded_state_dict(strategy), str(source))
    state = loaded[STATE_DICT_KEY]
    t1 = time.perf_counter()
    replay = state.restore(strategy, train_iteration, target=iteration, resume=False)
    t2 = time.perf_counter()
    target = replay.target_iteration
    common = {
        "iteration": target + 1,
        "moevement_conversion": dict(
            source=str(source),
            window=state.checkpoint.window,
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
        iterations_replayed=replay.iterations_replayed,
        load_s=t1 - t0,
        replay_s=t2 - t1,
        save_s=t3 - t2,
    )


def _check_operator_manifest(strategy, source: Path) -> None:
    """Every rank: the rebuilt model's operators must be the ones the checkpoint's schedule
    names (a different model configuration would fail deep inside the replay otherwise)."""
    import torch.distributed as dist

    saved = read_rank_schedule(source, dist.get_rank())["slices"]
    saved_names = {name for names in saved for name in names}
    live = {op.name for op in strategy.registry}
    if saved_names != live:
        raise ConversionError(
            f"{source}: rank {dist.get_rank()}'s rebuilt model does not match the checkpoint's "
            f"operators (missing {sorted(saved_names - live)[:5]}, unexpected "
            f"{sorted(live - saved_names)[:5]}). Fix: build the model with the configuration "
            "that wrote the checkpoint (the builder's spec in its metadata)."
        )


def replay_config(saved: dict):
    """A ``MoEvementConfig`` for replaying a saved checkpoint: the writing job's settings that
    matter for loading (checksums), without replication, logging or durable saves."""
    from dataclasses import fields

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
JOB_METADATA_KEY = "job"
"""Key of ``strategy.durable.metadata`` that describes the writing job for the converter:
``{"builder": "module:function", "spec": {...}}``, where ``function(spec)`` builds one rank's
model, optimizer and data accessor (a :class:`ReplayJob`) on an initialized process group."""


class ReplayJob(Protocol):
    """What a recorded builder returns on each rank: the job's model, optimizer and data."""

    gpt_model: Any
    optimizer: Any

    def train_iteration(self, iteration: int) -> Any:
        """Trains one iteration on its own microbatches (data addressable by iteration)."""


def job_description(index: dict, source: Path) -> dict:
    """The ``{"builder", "spec"}`` the writing job recorded, or a :class:`ConversionError`."""
    metadata = index.get("metadata") or {}
    job = metadata.get(JOB_METADATA_KEY)
    if job is None and "harness" in metadata:
        # Checkpoints written before the builder was recorded: the local harness wrote them.
        job = {
            "builder": "megatron_moevement.harness.trainer:build_replay_job",
            "spec": metadata["harness"],
        }
    if not job or ":" not in str(job.get("builder", "")):
        raise ConversionError(
            f"{source} does not describe the job that wrote it (no metadata[{JOB_METADATA_KEY!r}]"
            " with a 'module:function' builder and its spec), so moevement-convert cannot "
            "rebuild the model and its data. Fix: call megatron_moevement.convert."
            "convert_in_job(strategy, train_iteration, source, output) inside your own training "
            "job on the same layout (its data must be addressable by iteration), or set "
            f"strategy.durable.metadata[{JOB_METADATA_KEY!r}] = {{'builder': 'module:function', "
            "'spec': {...}}} when saving."
        )
    return job


def load_builder(name: str) -> Callable[[dict], ReplayJob]:
    """The builder ``"module:function"`` names (imported here, by name)."""
    module, _, function = name.partition(":")
    try:
        return getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as exc:
        raise ConversionError(
            f"cannot import the checkpoint's job builder {name!r} ({exc}). Fix: install the "
            "package that wrote the checkpoint, or convert inside that job with convert_in_job."
        ) from exc


def run_rank(spec_path: str | Path) -> None:
    """One rank of a conversion job (run by :func:`convert` as ``python -m
    megatron_moevement.convert --rank SPEC``): builds the writing job through its
    recorded builder, then loads, replays and saves (:func:`convert_in_job`)."""
    import torch.distributed as dist

    spec = json.loads(Path(spec_path).read_text())
    dist.init_process_group(backend="gloo", init_method="env://")
    try:
        job = load_builder(spec["job"]["builder"])(spec["job"]["spec"])
        strategy = MoEvementStrategy(
            job.gpt_model, job.optimizer, replay_config(spec.get("config", {}))
        )
        try:
            report = convert_in_job(
                strategy,
                job.train_iteration,
                spec["source"],
                spec["output"],
                spec.get("iteration"),
                bool(spec.get("optimizer", True)),
            )
        finally:
            strategy.shutdown()
        if dist.get_rank() == 0:
            Path(spec["report"]).write_text(json.dumps(report, indent=1))
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def convert(
    source: str | Path,
    output: str | Path,
    iteration: int | None = None,
    optimizer: bool = True,
    timeout: float = DEFAULT_TIMEOUT_S,
    work_dir: str | Path | None = None,
) -> dict:
    """Runs the conversion as a local multi-process job (one process per rank that wrote it).

    Every rank rebuilds the writing job through the builder the checkpoint records
    (:data:`JOB_METADATA_KEY`), so any training setup whose data is addressable by iteration
    can be converted, not just the one that ships with this package.

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
    source = resolve_checkpoint(source).resolve()
    output = Path(output).resolve()
    index = read_index(source)
    job = job_description(index, source)
    if iteration is not None and not index["window_end"] <= iteration <= index["iteration"]:
        raise ConversionError(
            f"--iteration {iteration} cannot be reconstructed from {source}: choose one from "
            f"{index['window_end']} (end of its window) to {index['iteration']} (last saved)"
        )
    if output.exists() and any(output.iterdir()):
        raise ConversionError(f"output directory {output} is not empty; choose a new one")
    work_dir = Path(work_dir) if work_dir is not None else output.with_name(output.name + ".logs")
    work_dir.mkdir(parents=True, exist_ok=True)
    spec_path = work_dir / "convert_spec.json"
    spec_path.write_text(
        json.dumps(
            dict(
                job=job,
                source=str(source),
                output=str(output),
                iteration=iteration,
                optimizer=optimizer,
                config=index.get("config", {}),
                report=str(work_dir / "convert.json"),
            ),
            indent=1,
        )
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
    with LocalJob(
        index["world_size"],
        "megatron_moevement.convert",
        ["--rank", str(spec_path)],
        log_dir=work_dir / "logs",
    ) as local:
        local.check(timeout=timeout)
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
        type=NON_NEGATIVE_INT,
        default=None,
        help="iteration to reconstruct (default: the last one saved)",
    )
    parser.add_argument(
        "--no-optimizer", action="store_true", help="convert only the model parameters"
    )
    parser.add_argument(
        "--timeout",
        type=POSITIVE_FLOAT,
        default=DEFAULT_TIMEOUT_S,
        help="seconds before the conversion job is killed (default %(default)s)",
    )
    parser.add_argument(
        "--work-dir", default=None, help="where the job's spec and logs go (default: OUTPUT.logs)"
    )
    parser.add_argument("--log-level", default="INFO")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--rank"]:  # one rank of the job convert() starts
        configure_logging("INFO")
        run_rank(argv[1])
        exit_after_success()
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
