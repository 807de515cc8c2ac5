"""In-situ timers for a running harness job (torch side of the profiler).

Nothing of Megatron-Core is patched: the timers wrap the callables the harness trainer hands to
Megatron (the forward-step function, ``finalize_model_grads_func``, ``optimizer.step``) and the
pipeline schedule gets a :class:`P2PCommunicator` subclass that times every send/receive, the way
upstream logging plugs in (:mod:`megatron_moevement.upstream.log`).

Inside ``forward_backward_func`` a rank's wall time is the sum of its forward passes, its backward
passes, its point-to-point calls (transfer *and* waiting for the neighbour stage: the pipeline
bubble) and the gradient synchronization (``finalize_model_grads``). Everything but the backward
passes is timed, so the backward time is the remainder.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Callable, Dict, Iterator, List

__all__ = ["PhaseTimer", "TrainerTimers", "make_timing_communicator"]


class PhaseTimer:
    """Wall time per named phase: every call's duration, and their sum."""

    def __init__(self) -> None:
        self.calls: Dict[str, List[float]] = defaultdict(list)
        self.active = True
        """When False nothing is recorded."""

    def add(self, phase: str, seconds: float) -> None:
        """Records one call of ``phase`` (if :attr:`active`)."""
        if self.active:
            self.calls[phase].append(seconds)

    @contextlib.contextmanager
    def time(self, phase: str) -> Iterator[None]:
        """Times the ``with`` block as one call of ``phase``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - start)

    def total(self, phase: str) -> float:
        """Sum of every call of ``phase`` (0 if none)."""
        return float(sum(self.calls.get(phase, ())))

    def count(self, phase: str) -> int:
        """Number of calls of ``phase``."""
        return len(self.calls.get(phase, ()))

    def reset(self) -> None:
        """Forgets every call."""
        self.calls.clear()


def make_timing_communicator(config, timer: PhaseTimer):
    """A ``P2PCommunicator`` of this rank's pipeline group that times every exchange as phase
    ``"p2p"``, and the ``ProcessGroupCollection`` the schedule needs next to it."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    from megatron_moevement.upstream.communicator import pipeline_process_groups

    class TimingP2PCommunicator(P2PCommunicator):
        """Megatron's communicator, timing each ``_communicate`` (every send/receive goes
        through it)."""

        def __init__(self) -> None:
            super().__init__(pp_group=ps.get_pipeline_model_parallel_group(), config=config)

        def _communicate(self, **kwargs):
            with timer.time("p2p"):
                return super()._communicate(**kwargs)

    return TimingP2PCommunicator(), pipeline_process_groups()


class TrainerTimers:
    """Times the phases of a :class:`~megatron_moevement.harness.trainer.HarnessTrainer`.

    Phases: ``forward`` (one per microbatch), ``p2p``, ``grad_sync`` (``finalize_model_grads``,
    the data-parallel reduction), ``forward_backward`` (the whole schedule), ``optimizer`` (the
    step, started after a barrier so that it does not include waiting for slower stages),
    ``step_wait`` (that barrier) and ``iteration`` (the whole training iteration).

    Args:
        trainer: The rank's trainer.
        timer: Where the calls go.
    """

    def __init__(self, trainer, timer: PhaseTimer) -> None:
        from megatron_moevement.harness import trainer as trainer_module

        self.trainer = trainer
        self.timer = timer
        self._forward_step = trainer_module._forward_step
        self._saved = (
            trainer.forward_backward_func,
            trainer.optimizer.step,
            trainer.transformer_config.finalize_model_grads_func,
            trainer.p2p_communicator,
            trainer.pg_collection,
        )
        trainer.forward_backward_func = self._timed(
            "forward_backward", trainer.forward_backward_func
        )
        trainer.transformer_config.finalize_model_grads_func = self._timed(
            "grad_sync", trainer.transformer_config.finalize_model_grads_func
        )
        trainer.optimizer.step = self._step(trainer.optimizer.step)
        if trainer.layout.pp > 1:
            trainer.p2p_communicator, trainer.pg_collection = make_timing_communicator(
                trainer.transformer_config, timer
            )
        self.skip_optimizer = False
        """When True the optimizer step is skipped (frozen-backward measurements)."""

    @property
    def enabled(self) -> bool:
        """False: plain iterations (nothing recorded, no barrier before the step)."""
        return self.timer.active

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self.timer.active = bool(value)

    def _timed(self, phase: str, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            with self.timer.time(phase):
                return fn(*args, **kwargs)

        return wrapper

    def _step(self, step: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            import torch.distributed as dist

            if not self.enabled:
                return step(*args, **kwargs)
            if self.skip_optimizer:
                return True, None, None
            with self.timer.time("step_wait"):
                dist.barrier()
            with self.timer.time("optimizer"):
                return step(*args, **kwargs)

        return wrapper

    def forward_step(self, data_iterator, model):
        """The harness forward step, timed as phase ``forward``."""
        with self.timer.time("forward"):
            return self._forward_step(data_iterator, model)

    def train_iteration(self, iteration: int):
        """One timed training iteration (phase ``iteration``)."""
        with self.timer.time("iteration"):
            return self.trainer.train_iteration(iteration, forward_step_func=self.forward_step)

    def uninstall(self) -> None:
        """Puts the trainer's own callables back."""
        t = self.trainer
        (
            t.forward_backward_func,
            t.optimizer.step,
            t.transformer_config.finalize_model_grads_func,
            t.p2p_communicator,
            t.pg_collection,
        ) = self._saved
