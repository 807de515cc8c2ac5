"""Starts local multi-process jobs (one process per rank, gloo) and always cleans them up by pid.

Every process is started in its own session so that it and anything it spawns can be killed as a
group. :class:`LocalJob` is a context manager: leaving it (normally, on an exception, or on a
timeout) kills every process it started that is still alive."""

from __future__ import annotations

from pathlib import Path

from megatron_moevement.launch.local import ElasticAgent, LocalJob
from megatron_moevement.logging_utils import get_logger

logger = get_logger(__name__)


def run_worker_job(spec, output_dir: Path, timeout: float, spares: int = 0) -> list[int]:
    """Runs a :class:`~megatron_moevement.harness.worker.WorkerSpec` on ``world_size`` local
    processes (plus ``spares``), logging each to ``output_dir/logs``; raises on failure/timeout."""
    from megatron_moevement.harness.layout import ParallelLayout

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    spec.output_dir = str(output_dir)
    spec_path = spec.save(output_dir / "spec.json")
    nprocs = ParallelLayout(**spec.layout).world_size + spares
    with LocalJob(
        nprocs,
        "megatron_moevement.harness.worker",
        [str(spec_path)],
        spares=spares,
        log_dir=output_dir / "logs",
    ) as job:
        return job.check(timeout=timeout)


def run_elastic_job(
    spec, output_dir: Path, timeout: float, spares: int, check_faults: bool = True
) -> ElasticAgent:
    """Runs an elastic :class:`~megatron_moevement.harness.worker.WorkerSpec` (ranks + spares)
    under an :class:`ElasticAgent`; returns the agent (its ``failures`` list what happened).

    With ``check_faults`` (default), every fault the spec asks for must have fired and every
    SIGKILL victim must have died of it, else ``AssertionError``: a run whose fault never
    happened is a fault-free run, and must not pass as a recovery."""
    from megatron_moevement.harness.layout import ParallelLayout

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    spec.output_dir = str(output_dir)
    spec_path = spec.save(output_dir / "spec.json")
    world = ParallelLayout(**spec.layout).world_size
    job = LocalJob(
        world + spares,
        "megatron_moevement.harness.worker",
        [str(spec_path)],
        spares=spares,
        log_dir=output_dir / "logs",
    )
    agent = ElasticAgent(job)
    try:
        agent.start()
        agent.run(timeout)
    finally:
        job.terminate()
    faults = (spec.moevement or {}).get("faults", [])
    if check_faults and faults:
        from megatron_moevement.harness.faults import check_faults_fired

        check_faults_fired(faults, output_dir, agent.failures)
    return agent
