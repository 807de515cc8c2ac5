"""The optimizer scalars of the original run, logged per iteration and reused by every replay.

Global values an optimizer step depends on are not recomputed from the partial gradients of a
replay (frozen operators produce no weight gradients, and other stages do not run): the total
gradient norm (hence the clip coefficient), the skip decision of fp16 loss scaling, the loss
scaler's state and the learning rates are recorded at every normal step (:class:`StepScalars`
in a :class:`ScalarLog`) and put back when the iteration is replayed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megatron_moevement.state.optim_view import first_leaf, iter_optimizers


class ReplayError(RuntimeError):
    """Replay cannot reproduce the original run (missing log entry, layout mismatch, ...)."""


@dataclass
class StepScalars:
    """What one optimizer step of the original run depended on beyond local gradients."""

    iteration: int
    grad_norm: float | None
    """Total gradient norm over all parameters of all stages (``None`` without clipping)."""
    update_successful: bool
    """False when fp16 loss scaling skipped the step (found inf/nan)."""
    learning_rates: list[list[float]] = field(default_factory=list)
    """``param_group["lr"]`` of every param group of every leaf optimizer, at step time."""
    scaler_state: dict | None = None
    """The fp16 loss scaler's state before the step (``None`` without a scaler)."""

    def to_dict(self) -> dict:
        return dict(
            iteration=self.iteration,
            grad_norm=self.grad_norm,
            update_successful=self.update_successful,
            learning_rates=self.learning_rates,
            scaler_state=self.scaler_state,
        )

    @classmethod
    def from_dict(cls, d: dict) -> "StepScalars":
        return cls(**d)


class ScalarLog:
    """Per-iteration :class:`StepScalars` of the original run, kept in host memory."""

    def __init__(self) -> None:
        self._entries: dict[int, StepScalars] = {}

    def record(self, entry: StepScalars) -> None:
        self._entries[entry.iteration] = entry

    def get(self, iteration: int) -> StepScalars:
        try:
            return self._entries[iteration]
        except KeyError:
            raise ReplayError(
                f"no logged optimizer scalars for iteration {iteration} (have "
                f"{self.span()}); replay needs the log from the original run — fall back to a "
                "global rollback from an older checkpoint or the durable tier"
            ) from None

    def __contains__(self, iteration: int) -> bool:
        return iteration in self._entries

    def span(self) -> str:
        if not self._entries:
            return "none"
        return f"{min(self._entries)}..{max(self._entries)}"

    def discard_before(self, iteration: int) -> None:
        """Frees entries older than ``iteration`` (the start of the persisted checkpoint)."""
        for key in [k for k in self._entries if k < iteration]:
            del self._entries[key]

    def to_dict(self) -> dict:
        return {str(k): v.to_dict() for k, v in sorted(self._entries.items())}

    def load_dict(self, data: dict) -> None:
        for value in data.values():
            self.record(StepScalars.from_dict(value))

    def __len__(self) -> int:
        return len(self._entries)


def learning_rates(optimizer) -> list[list[float]]:
    return [
        [float(g["lr"]) for g in leaf.optimizer.param_groups] for leaf in iter_optimizers(optimizer)
    ]


def scaler_state(optimizer) -> dict | None:
    """The fp16 dynamic loss scaler's state as plain numbers (``None`` without a scaler)."""
    scaler = getattr(first_leaf(optimizer), "grad_scaler", None)
    if scaler is None:
        return None
    return {
        k: (float(v.item()) if torch.is_tensor(v) else v) for k, v in scaler.state_dict().items()
    }


def restore_scaler_state(optimizer, scalars: StepScalars) -> None:
    """Puts the fp16 loss scaler back in the state it had before the original step (call before
    the replayed forward/backward, whose loss it scales)."""
    if scalars.scaler_state is None:
        return
    for leaf in iter_optimizers(optimizer):
        scaler = getattr(leaf, "grad_scaler", None)
        if scaler is not None:
            scaler.load_state_dict(
                {
                    k: torch.tensor([v]) if k == "scale" else v
                    for k, v in scalars.scaler_state.items()
                }
            )
