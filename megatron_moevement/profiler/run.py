"""Library entry point of the profiler: run the ``profile`` job, get a :class:`StageProfile`.

Example::

    from megatron_moevement.profiler import profile_harness

    profile = profile_harness(layout="pp2xdp2xep2", model=dict(precision="bf16"),
                              output="results/profile.json")
    print(profile.stages[0].forward_s, profile.metadata["measurements"]["restart_s"])
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

from megatron_moevement.sim.profile import StageProfile, load_profile

__all__ = ["profile_harness"]


def profile_harness(
    layout: str | Mapping[str, int] = "pp2xdp2xep2",
    model: Mapping[str, Any] | None = None,
    iterations: int = 8,
    warmup: int = 3,
    output: str | Path | None = None,
    strategy: str = "moevement",
    config: Mapping[str, Any] | None = None,
    baseline: Mapping[str, Any] | None = None,
    timeout_s: float = 900.0,
) -> StageProfile:
    """Profiles the harness model on local processes and returns the measured profile.

    Args:
        layout: A ``ParallelLayout`` string (``"pp2xdp2xep2"``) or its fields.
        model: ``TinyMoEConfig`` fields (defaults for the rest).
        iterations: Iterations per measurement (plain, instrumented, frozen).
        warmup: Untimed iterations first.
        output: Where to copy ``profile.json`` (``None``: nowhere).
        strategy: Checkpointing strategy whose rebuild a recovery pays (``moevement``,
            ``gemini``, ``moc``).
        config: ``MoEvementConfig`` fields of that strategy.
        baseline: ``BaselineConfig`` fields for a baseline strategy.
        timeout_s: Limit for the whole job.
    """
    from megatron_moevement.harness.launcher import run_worker_job
    from megatron_moevement.harness.layout import ParallelLayout
    from megatron_moevement.harness.worker import WorkerSpec

    fields = ParallelLayout.parse(layout).to_dict() if isinstance(layout, str) else dict(layout)
    options: dict[str, Any] = dict(warmup=warmup, config=dict(config or {}), strategy=strategy)
    if baseline is not None:
        options["baseline"] = dict(baseline)
    spec = WorkerSpec(
        job="profile",
        layout=fields,
        model=dict(model or {}),
        moevement=options,
        iterations=iterations,
        log_level="WARNING",
    )
    with tempfile.TemporaryDirectory(prefix="moevement-profile-") as tmp:
        run_worker_job(spec, Path(tmp), timeout=timeout_s)
        profile = load_profile(Path(tmp) / "profile.json")
        if output is not None:
            Path(output).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(tmp) / "profile.json", output)
    return profile
