"""Accounting of tokens per (iteration, layer, expert) and of MoC's lost tokens.

MoC-System restores each expert from its latest snapshot. When that snapshot is older than the
iteration the rest of the model is restored to, the expert's updates since the snapshot are gone:
the *lost tokens* are the token-to-expert assignments routed to it in those iterations. The
*proportion of lost tokens* (PLT, MoC-System's metric) is the lost assignments over every
assignment trained.

:class:`TokenLedger` keeps the job-wide routing counts of every iteration (``[layers, experts]``
integers, the same on every rank) so that any rank can compute the lost tokens of a recovery.
An iteration that is retrained after a rollback replaces its counts (the discarded execution is
not counted twice).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Tuple

import numpy as np

__all__ = ["LostTokenEvent", "TokenLedger"]


@dataclass
class LostTokenEvent:
    """The tokens one recovery lost."""

    restore_iteration: int
    """Iteration the non-expert state was restored to."""
    lost_tokens: int
    """Token-to-expert assignments whose updates were lost."""
    stale_experts: Dict[str, int] = field(default_factory=dict)
    """``"layer<L>.expert<E>"`` -> iterations of updates lost (experts restored stale)."""

    def to_dict(self) -> dict:
        return dict(
            restore_iteration=self.restore_iteration,
            lost_tokens=self.lost_tokens,
            stale_experts=dict(self.stale_experts),
        )


class TokenLedger:
    """Job-wide routing counts per iteration, and the lost tokens of recoveries.

    Args:
        num_layers: Transformer layers of the whole model (global layer ids index the rows).
        num_experts: Routed experts per layer.
    """

    def __init__(self, num_layers: int, num_experts: int) -> None:
        if num_layers < 1 or num_experts < 1:
            raise ValueError(
                f"TokenLedger needs layers and experts >= 1, got {num_layers}, {num_experts}"
            )
        self.num_layers = num_layers
        self.num_experts = num_experts
        self._counts: Dict[int, np.ndarray] = {}
        self._folded = np.zeros((num_layers, num_experts), dtype=np.int64)
        self._folded_before = 0
        self.events: list[LostTokenEvent] = []

    # ------------------------------------------------------------------ recording
    def record(self, iteration: int, counts) -> None:
        """Sets the counts of ``iteration`` (``[layers, experts]``), replacing earlier ones."""
        array = np.asarray(counts, dtype=np.int64).reshape(self.num_layers, self.num_experts)
        if iteration < self._folded_before:
            raise ValueError(f"iteration {iteration} was folded into the running total already")
        self._counts[int(iteration)] = array.copy()

    def fold_before(self, iteration: int) -> None:
        """Adds the counts of iterations before ``iteration`` to a running total and frees them
        (call with the oldest iteration a recovery may still restore an expert to)."""
        for it in [i for i in self._counts if i < iteration]:
            self._folded += self._counts.pop(it)
        self._folded_before = max(self._folded_before, int(iteration))

    def counts(self, iteration: int) -> np.ndarray:
        """Counts of one iteration (zeros when it was not recorded)."""
        return self._counts.get(
            iteration, np.zeros((self.num_layers, self.num_experts), dtype=np.int64)
        )

    @property
    def iterations(self) -> list[int]:
        """Recorded (unfolded) iterations, ascending."""
        return sorted(self._counts)

    # ------------------------------------------------------------------ totals
    @property
    def total_tokens(self) -> int:
        """Token-to-expert assignments trained (every recorded iteration, latest execution)."""
        return int(self._folded.sum() + sum(int(c.sum()) for c in self._counts.values()))

    @property
    def lost_tokens(self) -> int:
        """Assignments lost over every recovery so far."""
        return sum(e.lost_tokens for e in self.events)

    @property
    def proportion_lost(self) -> float:
        """PLT: lost assignments over assignments trained (0 before any training)."""
        total = self.total_tokens
        return self.lost_tokens / total if total else 0.0

    # ------------------------------------------------------------------ recoveries
    def lost_since(
        self, layer: int, expert: int, last_capture: Optional[int], restore_iteration: int
    ) -> Tuple[int, int]:
        """(assignments, iterations) of ``(layer, expert)`` after ``last_capture`` up to and
        including ``restore_iteration``; ``last_capture=None`` means never captured."""
        first = 0 if last_capture is None else last_capture + 1
        if first < self._folded_before:
            raise ValueError(
                f"counts of iteration {first} were folded away; keep the ledger back to the "
                "oldest checkpoint a recovery may restore from"
            )
        tokens = sum(
            int(self.counts(it)[layer, expert]) for it in range(first, restore_iteration + 1)
        )
        return tokens, max(0, restore_iteration + 1 - first)

    def account_recovery(
        self, restore_iteration: int, last_capture: Mapping[Tuple[int, int], Optional[int]]
    ) -> LostTokenEvent:
        """Records the tokens lost by a recovery to ``restore_iteration``.

        Args:
            restore_iteration: Iteration the non-expert state is restored to.
            last_capture: ``(layer, expert)`` -> iteration of the snapshot the expert is restored
                from (``None``: never captured, it keeps its initial state).
        """
        event = LostTokenEvent(restore_iteration=restore_iteration, lost_tokens=0)
        for (layer, expert), captured in sorted(last_capture.items()):
            tokens, iterations = self.lost_since(layer, expert, captured, restore_iteration)
            if iterations:
                event.stale_experts[f"layer{layer}.expert{expert}"] = iterations
            event.lost_tokens += tokens
        self.events.append(event)
        return event

    # ------------------------------------------------------------------ transfer
    def history_array(self, first: int, last: int) -> np.ndarray:
        """Counts of iterations ``first..last`` stacked as ``[iterations, layers, experts]``."""
        return (
            np.stack([self.counts(it) for it in range(first, last + 1)])
            if last >= first
            else np.zeros((0, self.num_layers, self.num_experts), dtype=np.int64)
        )

    def load_history_array(self, first: int, array: np.ndarray) -> None:
        """Records ``array[i]`` as the counts of iteration ``first + i``."""
        for i, counts in enumerate(np.asarray(array)):
            self.record(first + i, counts)

    def state_dict(self) -> dict:
        """Everything needed to continue the accounting elsewhere (JSON-ready)."""
        return dict(
            num_layers=self.num_layers,
            num_experts=self.num_experts,
            counts={str(k): v.tolist() for k, v in self._counts.items()},
            folded=self._folded.tolist(),
            folded_before=self._folded_before,
            events=[e.to_dict() for e in self.events],
        )

    def load_state_dict(self, state: Mapping) -> None:
        """Restores :meth:`state_dict` output."""
        self._counts = {int(k): np.asarray(v, dtype=np.int64) for k, v in state["counts"].items()}
        self._folded = np.asarray(state["folded"], dtype=np.int64)
        self._folded_before = int(state["folded_before"])
        self.events = [LostTokenEvent(**e) for e in state["events"]]
