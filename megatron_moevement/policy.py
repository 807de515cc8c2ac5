"""Capture policies: what a strategy snapshots after each optimizer step, and how it restores.

:class:`~megatron_moevement.strategy.MoEvementStrategy` owns the machinery (operator registry,
snapshot engine, replicator, scalar log, replay engine); a :class:`CapturePolicy` decides what
that machinery captures each iteration and how a rollback uses it. MoEvement's own policy,
:class:`SparseWindowPolicy`, is the paper's: Algorithm 1 windows (one slot per iteration, full
state for a slice of the operators) and sparse-to-dense replay. The baselines
(:mod:`megatron_moevement.baselines`) are other policies on the same machinery.

A policy is attached to exactly one strategy, which calls its hooks:

* :meth:`CapturePolicy.attach` once the machinery exists (install forward hooks here);
* :meth:`CapturePolicy.after_step` after every optimizer step (after the strategy's own
  bookkeeping: scalar log, popularity, timing);
* :meth:`CapturePolicy.restore` for a rollback to a checkpoint;
* :meth:`CapturePolicy.adopt` / :meth:`CapturePolicy.resume` around a recovery rebuild;
* :meth:`CapturePolicy.stats` for reports, :meth:`CapturePolicy.detach` at shutdown.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch

from megatron_moevement.config import MoEvementConfig
from megatron_moevement.logging_utils import get_logger
from megatron_moevement.replay.engine import ReplayEngine, ReplayReport
from megatron_moevement.replay.scalar_log import ScalarLog
from megatron_moevement.schedule.manager import ScheduleManager
from megatron_moevement.schedule.sparse_schedule import ScheduledOperator, SparseSchedule
from megatron_moevement.snapshot.slots import SparseCheckpoint

logger = get_logger(__name__)

__all__ = ["CapturePolicy", "PolicyHost", "SparseWindowPolicy"]

RECENT_ITERATIONS = 16
"""Iterations whose median time sizes the slot budget."""

MIN_BYTE_BUDGET_SHARE = 0.25
"""On a host, the least share of a slot's budget left for its bytes after the per-step stall
(a stall above the budget then asks for the least-stall window instead of none)."""


class PolicyHost(Protocol):
    """What a policy uses of the strategy it is attached to
    (:class:`~megatron_moevement.strategy.MoEvementStrategy` provides it)."""

    config: MoEvementConfig
    rank: int
    world_size: int
    gpt_model: Any
    optimizer: Any
    registry: Any
    """The operator registry."""
    popularity: Any
    """Routing statistics."""
    popularity_group: Any
    d2h_bandwidth: float
    """Probed copy (+ checksum on a host) bandwidth, bytes/s."""
    snapshot_bytes_total: int
    """Bytes captured on this rank so far."""
    stage_times: Any
    """:class:`~megatron_moevement.snapshot.stage_times.StageTimes` of this rank's snapshots."""
    iteration_times: list[float]
    checkpoints: list[SparseCheckpoint]
    windows_started: int
    scalar_log: ScalarLog
    replay: ReplayEngine
    replicator: Any
    replicator_ranks_per_node: int
    durable: Any
    persisted_checkpoint: SparseCheckpoint | None

    def agree_max(self, value: int) -> int:
        """The maximum of ``value`` over every rank (collective)."""

    def start_window(self, schedule: SparseSchedule, start_iteration: int) -> SparseCheckpoint:
        """Begins the next checkpoint."""

    def capture_and_replicate(self, ckpt: SparseCheckpoint, slot: int, iteration: int) -> None:
        """Starts the copy and the replication of one slot."""

    def flush(self) -> None:
        """Waits for pending copies and replication."""


class CapturePolicy:
    """Base class of capture policies (see the module docstring)."""

    name = ""
    """The strategy name (``--ckpt-strategy`` value) this policy implements."""

    keep_windows = 2
    """Windows whose host buffers and peer replicas coexist (one persisted, one in flight)."""

    def __init__(self) -> None:
        self.strategy: PolicyHost | None = None

    def attach(self, strategy: PolicyHost) -> None:
        """Binds the policy to ``strategy`` (called once, at the end of its construction)."""
        self.strategy = strategy

    def after_step(self, iteration: int) -> None:
        """Captures what ``iteration`` snapshots (called right after its optimizer step)."""
        raise NotImplementedError

    def restore(
        self, target_iteration: int, train_iteration: Callable[[int], object], ckpt=None
    ) -> ReplayReport:
        """Rebuilds the state of ``target_iteration`` from ``ckpt`` (default: the persisted
        checkpoint); collective over the ranks that roll back."""
        raise NotImplementedError

    def adopt(self, old: "CapturePolicy") -> None:
        """Takes over a failed-over predecessor's policy state (beyond the strategy's)."""

    def resume(self, committed: int, windows_started: int, ckpt) -> None:
        """After a recovery to ``committed``: keep ``ckpt`` as the persisted checkpoint (none
        after a replay from the initial state) and start afresh at the next iteration."""
        strategy = self.strategy
        strategy.checkpoints = [] if ckpt is None else [ckpt]
        strategy.windows_started = windows_started

    def stats(self) -> dict:
        """Policy facts for reports."""
        return {"strategy": self.name}

    def detach(self) -> None:
        """Removes what :meth:`attach` installed."""


class SparseWindowPolicy(CapturePolicy):
    """MoEvement: one slot per iteration of an Algorithm 1 window, sparse-to-dense replay."""

    name = "moevement"

    def __init__(self) -> None:
        super().__init__()
        self.scheduler: ScheduleManager | None = None

    # ------------------------------------------------------------------ capture
    def after_step(self, iteration: int) -> None:
        self.capture(iteration)

    def capture(self, iteration: int) -> None:
        """Captures and replicates the slot that ``iteration`` snapshots (Algorithm 1)."""
        s = self.strategy
        if self.scheduler is None:
            self.scheduler = ScheduleManager(
                [ScheduledOperator.of(op) for op in s.registry.operators],
                s.config,
                s.popularity,
                iteration_time_s=self._slot_budget_s(),
                start_iteration=iteration,
                d2h_bandwidth_bytes_per_s=self._charged_bandwidth(),
                agree_window_size=s.agree_max,
                popularity_group=s.popularity_group,
                include_compute_in_full_slot=True,
            )
        elif s.iteration_times and s.config.auto_window:
            self.scheduler.update_measurements(
                iteration_time_s=self._slot_budget_s(),
                d2h_bandwidth_bytes_per_s=self._charged_bandwidth(),
            )
        assignment = self.scheduler.slot_for_iteration(iteration)
        if assignment.slot == 0:
            s.start_window(assignment.schedule, assignment.iteration)
        ckpt = s.checkpoints[-1]
        s.capture_and_replicate(ckpt, assignment.slot, iteration)
        s.durable.after_step(iteration)

    def _slot_budget_s(self) -> float:
        """The time budget of one slot's bytes: the median of the last
        :data:`RECENT_ITERATIONS` iteration times, scaled by
        the share of an iteration a snapshot may take; on a host, less the training thread's
        measured stall per step, which does not shrink with the slot (bookkeeping, the slot
        cut, queueing the copy), so that W is not grown to pay for it byte by byte."""
        s = self.strategy
        fraction = s.config.snapshot_budget_fraction
        if fraction is None:
            fraction = 1.0 if torch.cuda.is_available() else 0.05
        if s.iteration_times:
            # A long median: a short one followed the +-15% iteration-time noise of a shared
            # host, and every W it moved cost new buffers.
            recent = s.iteration_times[-RECENT_ITERATIONS:]
            budget = fraction * sorted(recent)[len(recent) // 2]
        else:
            budget = fraction * (s.config.iteration_time_s or 1.0)
        steps = s.stage_times.calls("after_step")
        if torch.cuda.is_available() or steps == 0:
            return budget
        stall_per_step = s.stage_times.totals()["stall"] / steps
        return max(budget - stall_per_step, MIN_BYTE_BUDGET_SHARE * budget)

    def _charged_bandwidth(self) -> float:
        """The bandwidth Algorithm 1 divides a slot's byte budget by: bytes per second of
        training time.

        On CUDA the copy engine runs beside the SMs, so a slot costs training only its copy time
        (the paper's rule: the measured device-to-host bandwidth). On a host the copy, checksum
        and replication run on cores and stream every byte through the memory that training's
        kernels stream too, so what a snapshot byte costs is measured in this run: the recurring
        background time of the snapshot threads (:class:`StageTimes`) per byte captured (the
        training thread's stall is a per-step cost, taken off the budget by
        :meth:`_slot_budget_s`). That holds with a free core as well: on the 2-core harness, one
        rank beside an idle core still lost ~0.3 s of training per second of background copy
        and checksum (memory bandwidth and caches are shared), and charging only the stall chose
        W = 2 at 1.034x. The slower of that and the probed copy + checksum rate is used, so
        ``auto`` never keeps a window whose copies take more of an iteration than its budget
        allows (with no idle core, W = 1 would copy every byte that a dense snapshot does on the
        same cores).
        """
        s = self.strategy
        if torch.cuda.is_available() or s.snapshot_bytes_total == 0:
            return s.d2h_bandwidth
        background = s.stage_times.totals()["background"]
        if background <= 0:
            return s.d2h_bandwidth
        return min(s.d2h_bandwidth, s.snapshot_bytes_total / background)

    # ------------------------------------------------------------------ restore
    def restore(self, target_iteration, train_iteration, ckpt=None) -> ReplayReport:
        s = self.strategy
        ckpt = ckpt or s.persisted_checkpoint
        if ckpt is None:
            raise RuntimeError(
                "no persisted sparse checkpoint to roll back to (the first window has not been "
                "captured and replicated yet); restart from the durable tier"
            )
        s.flush()
        return s.replay.rollback_and_replay(ckpt, target_iteration, train_iteration)

    def resume(self, committed: int, windows_started: int, ckpt) -> None:
        super().resume(committed, windows_started, ckpt)
        self.scheduler = None  # the next iteration starts a fresh window

    def stats(self) -> dict:
        window = self.scheduler.schedule.window_size if self.scheduler is not None else None
        return dict(super().stats(), window_size=window)
