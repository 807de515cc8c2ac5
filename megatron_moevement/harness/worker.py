"""Entry point of one harness process: ``python -m megatron_moevement.harness.worker SPEC.json``.

The spec is a :class:`WorkerSpec` as JSON. The worker joins the gloo process group from the
``env://`` variables its launcher set, builds the Megatron-Core job and trains.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path

import torch

from megatron_moevement.harness.layout import ParallelLayout
from megatron_moevement.harness.model import TinyMoEConfig
from megatron_moevement.launch.local import exit_after_success
from megatron_moevement.logging_utils import configure_logging, get_logger

logger = get_logger(__name__)


@dataclass
class WorkerSpec:
    """What a harness job runs, shared by all of its processes."""

    job: str = "train"
    """What to run: a key of :data:`JOBS` ("train", "registry")."""

    layout: dict = field(default_factory=dict)
    """:class:`ParallelLayout` fields."""

    model: dict = field(default_factory=dict)
    """:class:`TinyMoEConfig` fields."""

    moevement: dict = field(default_factory=dict)
    """:class:`~megatron_moevement.config.MoEvementConfig` fields (MoEvement jobs)."""

    iterations: int = 8
    """Iterations to train (iterations are numbered from 0)."""

    output_dir: str = ""
    """Where each rank writes ``state_rank<r>.pt`` and ``result_rank<r>.json``; empty = nowhere."""

    log_level: str = "INFO"
    """Logging level of the workers."""

    timeout_s: float = 120.0
    """Timeout of collective operations."""

    def save(self, path: Path) -> Path:
        Path(path).write_text(json.dumps(asdict(self), indent=2))
        return Path(path)

    @classmethod
    def load(cls, path: Path) -> "WorkerSpec":
        return cls(**json.loads(Path(path).read_text()))


def init_distributed(timeout_s: float) -> None:
    """Joins the job's gloo process group from ``RANK``/``WORLD_SIZE``/``MASTER_*``."""
    import torch.distributed as dist

    dist.init_process_group(
        backend="gloo",
        init_method="env://",
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        timeout=timedelta(seconds=timeout_s),
    )


def run_training(spec: WorkerSpec) -> None:
    """Trains ``spec.iterations`` iterations and writes this rank's final state and losses."""
    import torch.distributed as dist

    from megatron_moevement.harness.trainer import HarnessTrainer

    layout = ParallelLayout(**spec.layout)
    trainer = HarnessTrainer(TinyMoEConfig.from_dict(spec.model), layout)
    results = []
    for it in range(spec.iterations):
        res = trainer.train_iteration(it)
        results.append(asdict(res))
        if res.loss is not None:
            logger.info("iteration %d loss %.6f grad_norm %.4f", it, res.loss, res.grad_norm)
    if spec.output_dir:
        out = Path(spec.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        rank = dist.get_rank()
        torch.save(trainer.capture_state(), out / f"state_rank{rank}.pt")
        (out / f"result_rank{rank}.json").write_text(json.dumps(results))


def run_registry_report(spec: WorkerSpec) -> None:
    """Trains ``spec.iterations`` iterations, then writes this rank's operator registry as JSON:
    every operator with its parameters and bytes per kind, and the model/optimizer totals counted
    independently of the registry."""
    import torch.distributed as dist

    from megatron_moevement.harness.trainer import HarnessTrainer
    from megatron_moevement.state.operators import OperatorRegistry, model_and_optimizer_bytes

    layout = ParallelLayout(**spec.layout)
    model_cfg = TinyMoEConfig.from_dict(spec.model)
    trainer = HarnessTrainer(model_cfg, layout)
    for it in range(spec.iterations):
        trainer.train_iteration(it)
    registry = OperatorRegistry(
        trainer.gpt_model, trainer.optimizer, trainer.ep_rank, model_cfg.num_experts
    )
    report = {
        "rank": dist.get_rank(),
        "pp_rank": trainer.pp_rank,
        "ep_rank": trainer.ep_rank,
        "dp_rank": trainer.dp_rank,
        "model_param_names": [n for n, _ in trainer.named_parameters()],
        "operators": [
            {
                "name": op.name,
                "kind": op.kind,
                "layer": op.layer,
                "expert": op.expert,
                "owner_ep_rank": op.owner_ep_rank,
                "params": op.param_names,
                "bytes": op.bytes_by_kind(),
            }
            for op in registry
        ],
        "bytes": registry.bytes_report(),
        "independent_totals": model_and_optimizer_bytes(trainer.gpt_model, trainer.optimizer),
    }
    out = Path(spec.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"registry_rank{dist.get_rank()}.json").write_text(json.dumps(report, indent=1))


# Jobs of other harness modules, imported only when run: "name": (module, function).
_LAZY_JOBS = {
    "snapshot_check": ("megatron_moevement.harness.snapshot_check", "run_snapshot_check"),
    "overhead": ("megatron_moevement.harness.overhead", "run_overhead"),
    "replay_check": ("megatron_moevement.harness.replay_check", "run_replay_check"),
    "replay_cost": ("megatron_moevement.harness.replay_cost", "run_replay_cost"),
    "upstream_check": ("megatron_moevement.harness.upstream_check", "run_upstream_check"),
    "dense_save": ("megatron_moevement.harness.dense_restart", "run_dense_save"),
    "dense_restart": ("megatron_moevement.harness.dense_restart", "run_dense_restart"),
    "profile": ("megatron_moevement.profiler.job", "run_profile"),
    "durable_save_check": ("megatron_moevement.harness.durable_check", "run_durable_save_check"),
    "durable_verify_check": (
        "megatron_moevement.harness.durable_check",
        "run_durable_verify_check",
    ),
}

JOBS = {"train": run_training, "registry": run_registry_report}


def _job(name: str):
    """The function that runs job ``name``."""
    import importlib

    if name in JOBS:
        return JOBS[name]
    if name in _LAZY_JOBS:
        module, function = _LAZY_JOBS[name]
        return getattr(importlib.import_module(module), function)
    raise ValueError(
        f"unknown job {name!r}; use one of {sorted([*JOBS, *_LAZY_JOBS, 'resilient'])}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("spec", type=Path, help="WorkerSpec JSON file")
    args = parser.parse_args(argv)
    spec = WorkerSpec.load(args.spec)
    configure_logging(spec.log_level)
    import torch.distributed as dist

    if spec.job == "resilient":
        # Elastic jobs manage their own process-group generations (see recovery.py).
        from megatron_moevement.harness.resilient import run_resilient

        run_resilient(spec)
        return
    init_distributed(spec.timeout_s)
    try:
        _job(spec.job)(spec)
    finally:
        # Drop Megatron's references to its groups first, so that none outlives the teardown.
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_after_success()
