"""Sparse-to-dense conversion: rolling a rank back to a sparse checkpoint and replaying it.

:class:`ReplayEngine` loads slot 0 of a window, replays the next iteration with the operators of
later slices frozen, loads slot 1, ... until every operator is active (the dense state of the
window's last iteration), then replays on, all active, to the target iteration. Every replayed
optimizer step uses the original run's logged scalars (:mod:`.scalar_log`), through
:meth:`ReplayEngine.optimizer_step`, which the strategy's wrapped ``optimizer.step`` calls while an
iteration is being replayed. Every replay returns a :class:`ReplayReport`.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

from megatron_moevement.logging_utils import get_logger
from megatron_moevement.replay.frozen import (
    frozen_main_params,
    frozen_operators,
    replay_optimizer_step,
)
from megatron_moevement.replay.loader import SlotLoader
from megatron_moevement.replay.scalar_log import ScalarLog, restore_scaler_state
from megatron_moevement.snapshot.sharding import default_operator_groups
from megatron_moevement.snapshot.slots import SparseCheckpoint

logger = get_logger(__name__)

TrainIteration = Callable[[int], object]
"""``f(iteration)``: trains one iteration on that iteration's microbatches (forward/backward over
every microbatch and ``optimizer.step()``); the data accessor replay needs."""


@dataclass
class ReplayReport:
    """What one rollback did on this rank."""

    window: int
    """Window number of the checkpoint rolled back to (-1: the job's initial state)."""
    window_start: int
    """Iteration whose state slot 0 holds (the iteration before the first replayed one)."""
    window_size: int
    """Slots of that checkpoint (0 for the initial state)."""
    target_iteration: int
    """Last iteration replayed: the state is that of this iteration afterwards."""
    iterations_replayed: list[int] = field(default_factory=list)
    """Iterations trained again, in order."""
    frozen_operators: dict[int, int] = field(default_factory=dict)
    """Per replayed iteration, how many operators were frozen."""
    lost_tokens: int | None = None
    """Token-to-expert assignments whose updates were lost (MoC-like baseline only)."""
    stale_experts: dict | None = None
    """``{"layer<L>.expert<E>": iterations behind}`` of experts restored stale (MoC only)."""

    def to_dict(self) -> dict:
        """JSON-serializable form (``None`` fields left out)."""
        return {k: v for k, v in asdict(self).items() if v is not None}


class ReplayEngine:
    """Rolls one rank back to a sparse checkpoint and replays it with the original run's scalars.

    Args:
        registry: This rank's operator registry.
        optimizer: Its Megatron optimizer.
        shard_plan: What this rank captured (which replica holds which operator).
        sharding: This rank's place in the data-parallel groups.
        scalar_log: The original run's per-iteration optimizer scalars.
    """

    def __init__(self, registry, optimizer, shard_plan, sharding, scalar_log: ScalarLog) -> None:
        self.registry = registry
        self.optimizer = optimizer
        self.shard_plan = shard_plan
        self.sharding = sharding
        self.scalar_log = scalar_log
        self.reports: list[ReplayReport] = []
        """Every replay this engine ran, oldest first."""
        self.use_logged_norm = True
        """Diagnostics only: False recomputes the grad norm from a replay's partial gradients."""
        self.probe: Callable | None = None
        """Diagnostics only: ``f(iteration, frozen_main_params)`` called before a replayed step."""
        self._iteration: int | None = None
        self._frozen_mains: list = []
        self._depth = 0

    # ------------------------------------------------------------------ state
    @property
    def replaying(self) -> bool:
        """True while a rollback runs (training iterations then re-run past work: routing
        statistics must not count it twice)."""
        return self._depth > 0

    @property
    def in_replayed_step(self) -> bool:
        """True while an iteration driven by logged scalars is being replayed."""
        return self._iteration is not None

    @contextlib.contextmanager
    def replaying_context(self) -> Iterator[None]:
        """Marks a rollback (also a baseline's ordinary retraining) as running."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if not self._depth:
                self._iteration = None
                self._frozen_mains = []

    def optimizer_step(self):
        """The optimizer step of the iteration being replayed (called from the strategy's
        wrapped ``optimizer.step``): Megatron's step phases with the logged scalars, the frozen
        operators' main parameters left untouched."""
        if self.probe is not None:
            self.probe(self._iteration, self._frozen_mains)
        return replay_optimizer_step(
            self.optimizer,
            self.scalar_log.get(self._iteration),
            self._frozen_mains,
            use_logged_norm=self.use_logged_norm,
        )

    def _replay(self, iteration: int, train_iteration: TrainIteration, frozen_mains=()) -> None:
        self._frozen_mains = list(frozen_mains)
        self._iteration = iteration
        restore_scaler_state(self.optimizer, self.scalar_log.get(iteration))
        try:
            train_iteration(iteration)
        finally:
            self._iteration = None
            self._frozen_mains = []

    def loader(self) -> SlotLoader:
        """A :class:`SlotLoader` for this rank's checkpoints."""
        return SlotLoader(self.registry, self.shard_plan, self.sharding, default_operator_groups())

    # ------------------------------------------------------------------ replays
    def rollback_and_replay(
        self, ckpt: SparseCheckpoint, target_iteration: int, train_iteration: TrainIteration
    ) -> ReplayReport:
        """Rebuilds the dense state of ``target_iteration`` from ``ckpt`` (see the module doc).

        All ranks that hold replicas of the replayed operators must call this together.

        Raises:
            ValueError: ``target_iteration`` precedes the end of the checkpoint's window.
        """
        start, window = ckpt.start_iteration, ckpt.window_size
        if target_iteration < start + window - 1:
            raise ValueError(
                f"target iteration {target_iteration} precedes the end of window "
                f"{ckpt.window} ({start}..{start + window - 1})"
            )
        loader = self.loader()
        slices = ckpt.schedule["slices"]
        report = ReplayReport(ckpt.window, start, window, target_iteration)
        with self.replaying_context():
            for k in range(window):
                loader.apply(ckpt, k)
                iteration = start + k + 1
                if k == window - 1 or iteration > target_iteration:
                    break
                frozen = [n for sl in slices[k + 1 :] for n in sl]
                with frozen_operators(self.registry, frozen):
                    mains = frozen_main_params(self.registry, frozen)
                    self._replay(iteration, train_iteration, mains)
                report.frozen_operators[iteration] = len(frozen)
                report.iterations_replayed.append(iteration)
            for iteration in range(start + window, target_iteration + 1):
                self._replay(iteration, train_iteration)
                report.frozen_operators[iteration] = 0
                report.iterations_replayed.append(iteration)
        self.reports.append(report)
        logger.info(
            "replayed iterations %s from window %d (start %d, W=%d)",
            report.iterations_replayed,
            ckpt.window,
            start,
            window,
        )
        return report

    def replay_from_initial_state(
        self, first_iteration: int, target_iteration: int, train_iteration: TrainIteration
    ) -> ReplayReport:
        """Replays ``first_iteration..target_iteration`` all active, from the state the job
        started from (which the model and optimizer must hold), with the logged scalars."""
        report = ReplayReport(-1, first_iteration - 1, 0, target_iteration)
        with self.replaying_context():
            for iteration in range(first_iteration, target_iteration + 1):
                self._replay(iteration, train_iteration)
                report.iterations_replayed.append(iteration)
                report.frozen_operators[iteration] = 0
        self.reports.append(report)
        logger.info("replayed iterations %s from the initial state", report.iterations_replayed)
        return report

    def retrain(
        self,
        window: int,
        start: int,
        target_iteration: int,
        train_iteration: TrainIteration,
        after_iteration: Callable[[int], None] | None = None,
    ) -> ReplayReport:
        """Re-runs ``start + 1 .. target_iteration`` as ordinary training iterations (their
        own gradient norms and decisions, no frozen operators) on a state the caller restored:
        the recovery of the dense-snapshot baselines.

        Args:
            window: Number of the checkpoint the state came from (for the report).
            start: Iteration whose state the model and optimizer hold.
            target_iteration: Last iteration to re-run.
            train_iteration: The data accessor.
            after_iteration: Called after each re-run iteration (e.g. statistics).
        """
        report = ReplayReport(window, start, 1, target_iteration)
        with self.replaying_context():
            for iteration in range(start + 1, target_iteration + 1):
                train_iteration(iteration)
                if after_iteration is not None:
                    after_iteration(iteration)
                report.iterations_replayed.append(iteration)
                report.frozen_operators[iteration] = 0
        self.reports.append(report)
        return report
