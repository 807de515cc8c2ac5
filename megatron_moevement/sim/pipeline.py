"""Iteration time of a 1F1B pipeline and of a localized (log-fed, bubble-free) replay.

Paper Appendix C: with ``p`` stages, ``m`` micro-batches and per-micro-batch stage times
``t_s``, a 1F1B pipeline spends ``(m - 1) * max_s t_s + sum_s t_s`` on forward/backward (the
``(m + p - 1) * t`` formula when stages are equal: ``p - 1`` warm-up/cool-down slots of the
slowest stage's rhythm plus ``m`` steady-state slots). With ``v`` interleaved model chunks the
warm-up/cool-down shrinks by ``v``. The iteration adds the slowest stage's per-iteration tail
(optimizer step plus exposed gradient synchronization).

A localized replay (paper §3.4) runs only the failed stage, fed by its neighbours' upstream
logs, so it has no pipeline bubble: ``m`` micro-batches back to back plus the stage's tail,
where frozen operators skip the weight-gradient and optimizer work.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_moevement.sim.profile import StageProfile, StageTimes

__all__ = ["IterationTimes", "iteration_times", "localized_iteration_s"]


@dataclass(frozen=True)
class IterationTimes:
    """Decomposition of one training iteration."""

    iteration_s: float
    """Wall time of one fault-free iteration without checkpointing (s)."""

    pipeline_s: float
    """Forward/backward part of the pipeline schedule (s)."""

    overlap_s: float
    """Time between two optimizer steps that a snapshot copy can overlap with: everything but
    the slowest stage's optimizer step (forward, backward and gradient synchronization) (s).
    A copy running longer delays the next optimizer step (paper footnote 4)."""

    tail_s: float
    """Optimizer step plus exposed gradient synchronization of the slowest stage (s)."""

    bubble_s: float
    """Idle warm-up/cool-down time inside ``pipeline_s`` (s)."""


def iteration_times(
    profile: StageProfile, num_microbatches: int, virtual_pipeline_stages: int = 1
) -> IterationTimes:
    """Iteration time of a (possibly interleaved) 1F1B schedule.

    Args:
        profile: Per-stage costs.
        num_microbatches: Micro-batches per iteration m.
        virtual_pipeline_stages: Model chunks per stage v (1 for plain 1F1B).

    Returns:
        The iteration's decomposition.
    """
    per_stage = [s.microbatch_s for s in profile.stages]
    slowest = max(per_stage)
    warmup_cooldown = (sum(per_stage) - slowest) / virtual_pipeline_stages
    pipeline_s = num_microbatches * slowest + warmup_cooldown
    tail_s = max(s.step_s for s in profile.stages)
    bubble_s = pipeline_s - num_microbatches * (sum(per_stage) / len(per_stage))
    iteration_s = pipeline_s + tail_s
    return IterationTimes(
        iteration_s=iteration_s,
        pipeline_s=pipeline_s,
        overlap_s=iteration_s - max(s.optimizer_s for s in profile.stages),
        tail_s=tail_s,
        bubble_s=bubble_s,
    )


def localized_iteration_s(
    stage: StageTimes,
    num_microbatches: int,
    weight_grad_share: float = 1.0,
    param_share: float = 1.0,
    log_transfer_s: float = 0.0,
) -> float:
    """Time to replay one iteration of a single stage from upstream logs.

    Args:
        stage: The replaying stage's costs.
        num_microbatches: Micro-batches per iteration m.
        weight_grad_share: Fraction of the stage's weight-gradient work done by active
            operators (frozen ones skip it); 1 when every operator is active.
        param_share: Fraction of the stage's parameters that are active (optimizer step and
            gradient synchronization only touch those).
        log_transfer_s: Time to fetch this iteration's logged activations and gradients from
            the neighbours; it overlaps with compute, so the replay takes the larger of both.

    Returns:
        Replay time of one iteration (s).
    """
    compute = num_microbatches * (
        stage.forward_s + stage.backward_s + weight_grad_share * stage.weight_grad_s
    )
    compute += param_share * (stage.optimizer_s + stage.grad_sync_s)
    return max(compute, log_transfer_s)
