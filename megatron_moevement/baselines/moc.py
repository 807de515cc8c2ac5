"""MoC-System-like baseline: partial expert checkpointing, recovery with lost tokens.

Every iteration, after the optimizer step, one checkpoint captures the full state (FP32 main
parameters, optimizer state, compute weights) of every *non-expert* operator of the stage plus
one rotating group of each layer's experts (:mod:`~megatron_moevement.baselines.rotation`), and
replicates it to peers — MoEvement's engine and replicator with a one-slot window per checkpoint
and ``n + 1`` checkpoints retained (the policy's ``keep_windows``).

Recovery rolls every rank back to the newest checkpoint persisted everywhere (iteration ``t``):
non-expert operators come from it, each expert group from the newest checkpoint that captured it
(``t - n + 1 .. t``), and training continues after ``t``. An expert restored from an older
checkpoint has lost its updates since then: the tokens routed to it in those iterations are
*lost tokens*. They are counted exactly (routing counts of every iteration are summed over the
job and kept on every rank, :class:`~megatron_moevement.baselines.lost_tokens.TokenLedger`) and
reported as the proportion of lost tokens (PLT). The recovered run is therefore *not* the
fault-free run: it is the point of comparing with MoEvement, which recovers exactly.
"""

from __future__ import annotations

import json

import torch
import torch.distributed as dist

from megatron_moevement.baselines.base import BaselineStrategy
from megatron_moevement.baselines.config import BaselineConfig
from megatron_moevement.baselines.lost_tokens import TokenLedger
from megatron_moevement.baselines.rotation import group_of_expert, latest_capture, num_groups
from megatron_moevement.logging_utils import get_logger
from megatron_moevement.policy import CapturePolicy
from megatron_moevement.replay.engine import ReplayReport
from megatron_moevement.schedule.sparse_schedule import ScheduledOperator, SparseSchedule
from megatron_moevement.snapshot.replication import choose_peers
from megatron_moevement.snapshot.slots import SparseCheckpoint
from megatron_moevement.snapshot.transport import recv_bytes, recv_slot, send_bytes, send_slot
from megatron_moevement.state.operators import layer_number_of

__all__ = ["CheckpointFetchError", "PartialExpertPolicy", "PartialExpertStrategy"]

logger = get_logger(__name__)


class CheckpointFetchError(RuntimeError):
    """A replacement rank's older checkpoint has no surviving replica."""


class PartialExpertPolicy(CapturePolicy):
    """Partial expert checkpointing every iteration (MoC-System-like), with lost-token accounting.

    Args:
        baseline: The policy's settings (``expert_fraction``).
        num_experts: Experts per MoE layer.
        num_layers: Transformer layers of the whole model.
    """

    name = "moc"

    def __init__(self, baseline: BaselineConfig, num_experts: int, num_layers: int) -> None:
        super().__init__()
        self.baseline = baseline
        self.num_experts = num_experts
        self.groups = num_groups(num_experts, baseline.expert_fraction)
        self.keep_windows = self.groups + 1  # the newest n persisted checkpoints plus one in flight
        self.ledger = TokenLedger(num_layers, num_experts)
        self._pending_counts = torch.zeros(num_layers, num_experts, dtype=torch.int64)
        self._handles: list = []
        self._nonexpert: list[str] = []
        self._group_ops: dict[int, list[str]] = {}
        self._adopted = False

    def attach(self, strategy) -> None:
        super().attach(strategy)
        registry = strategy.registry
        self._nonexpert = [op.name for op in registry if op.kind != "expert"]
        self._group_ops = {
            j: [
                op.name
                for op in registry.of_kind("expert")
                if group_of_expert(op.expert, self.groups) == j
            ]
            for j in range(self.groups)
        }
        self._handles = self._install_count_hooks(strategy.gpt_model)
        logger.info(
            "MoC on rank %d: %d expert groups (fraction %.3f), keeps %d checkpoints",
            strategy.rank,
            self.groups,
            self.baseline.expert_fraction,
            self.keep_windows,
        )

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # ------------------------------------------------------------------ routing counts
    def _install_count_hooks(self, gpt_model) -> list:
        handles = []
        for name, module in gpt_model.named_modules():
            if not name.endswith("mlp.router"):
                continue
            layer = layer_number_of(gpt_model, name)

            def hook(mod, args, output, layer=layer):
                if mod.training:
                    self._pending_counts[layer] += output[1].detach().sum(dim=0).to(torch.int64)

            handles.append(module.register_forward_hook(hook))
        return handles

    def _record_counts(self, iteration: int) -> None:
        """Sums this iteration's routing counts over the job and records them (collective)."""
        counts = self._pending_counts.clone()
        dist.all_reduce(counts)
        self.ledger.record(iteration, counts.numpy())
        self._pending_counts.zero_()

    # ------------------------------------------------------------------ checkpoints
    def _schedule_for(self, window: int) -> SparseSchedule:
        """One slot: every non-expert operator and the experts of this checkpoint's group."""
        registry = self.strategy.registry
        names = self._nonexpert + self._group_ops[window % self.groups]
        sizes = [ScheduledOperator.of(registry[name]) for name in names]
        return SparseSchedule(
            slices=[names],
            compute_bytes={op.name: op.compute_bytes for op in sizes},
            full_state_bytes={op.name: op.full_state_bytes for op in sizes},
            include_compute_in_full_slot=True,
            policy="moc",
        )

    def after_step(self, iteration: int) -> None:
        s = self.strategy
        self._record_counts(iteration)
        ckpt = s.start_window(self._schedule_for(s.windows_started), iteration)
        oldest = s.checkpoints[0].start_iteration
        s.scalar_log.discard_before(oldest)
        if ckpt.window >= self.groups:  # every group has a capture among the kept checkpoints
            self.ledger.fold_before(oldest)
        s.capture_and_replicate(ckpt, 0, iteration)

    # ------------------------------------------------------------------ recovery
    def adopt(self, old: "PartialExpertPolicy") -> None:
        self.ledger = old.ledger
        self._adopted = True

    def restore(self, target_iteration, train_iteration, ckpt=None) -> ReplayReport:
        """Restores non-expert state from ``ckpt`` (default: the persisted checkpoint) and each
        expert group from its newest capture, accounts the lost tokens, and trains on from the
        checkpoint's iteration to ``target_iteration``. All ranks must call this together."""
        s = self.strategy
        ckpt = ckpt or s.persisted_checkpoint
        if ckpt is None:
            raise RuntimeError(
                "no persisted MoC checkpoint to roll back to (a failure before the "
                "first one was replicated); restart from the durable tier"
            )
        s.flush()
        self._pending_counts.zero_()
        g, restore_it = ckpt.window, ckpt.start_iteration
        needed = [w for w in range(g - self.groups + 1, g + 1) if w >= 0]
        self._fetch_missing(needed)
        held = {c.window: c for c in s.checkpoints}
        missing = [w for w in needed if w not in held]
        if missing:
            raise CheckpointFetchError(
                f"rank {s.rank} lacks MoC checkpoints {missing} needed to restore from "
                f"checkpoint {g}; restart from the durable tier"
            )
        loader = s.replay.loader()
        for w in needed:  # oldest first: newer captures override (non-expert state from g)
            loader.apply(held[w], 0)
        captured_at = {}
        for j in range(self.groups):
            w = latest_capture(j, g, self.groups, needed)
            captured_at[j] = None if w is None else held[w].start_iteration
        self._sync_ledger()
        event = self.ledger.account_recovery(
            restore_it,
            {
                (layer, e): captured_at[group_of_expert(e, self.groups)]
                for layer in range(self.ledger.num_layers)
                for e in range(self.num_experts)
            },
        )
        report = s.replay.retrain(
            g, restore_it, target_iteration, train_iteration, after_iteration=self._record_counts
        )
        report.lost_tokens = event.lost_tokens
        report.stale_experts = event.stale_experts
        s.checkpoints = [held[w] for w in needed]
        logger.warning(
            "MoC rollback to iteration %d: %d expert(s) restored stale, %d tokens lost "
            "(PLT so far %.4f%%); retrained %s",
            restore_it,
            len(event.stale_experts),
            event.lost_tokens,
            100 * self.ledger.proportion_lost,
            report.iterations_replayed,
        )
        return report

    def resume(self, committed: int, windows_started: int, ckpt) -> None:
        """Keeps the checkpoints the restore used (they hold the newest capture of each expert
        group) and captures the next checkpoint after ``ckpt``'s again."""
        s = self.strategy
        kept = list(s.checkpoints)
        super().resume(committed, ckpt.window + 1, ckpt)
        s.checkpoints = kept

    def _sync_ledger(self) -> None:
        """Every rank takes the routing counts of the lowest rank that kept them (replacement
        ranks have none; survivors may differ in the last, uncommitted iteration)."""
        s = self.strategy
        flags = torch.zeros(s.world_size, dtype=torch.int64)
        flags[s.rank] = int(self._adopted)
        dist.all_reduce(flags)
        holders = [r for r, f in enumerate(flags.tolist()) if f]
        if not holders:
            raise CheckpointFetchError("no surviving rank holds the routing counts")
        box = [self.ledger.state_dict() if s.rank == holders[0] else None]
        dist.broadcast_object_list(box, src=holders[0])
        if s.rank != holders[0]:
            self.ledger.load_state_dict(box[0])

    def _fetch_missing(self, needed: list[int]) -> None:
        """Each rank lacking some of the checkpoints ``needed`` receives them from the lowest
        of its replica peers that is not itself a replacement (collective)."""
        s = self.strategy
        have = {c.window for c in s.checkpoints}
        lacks = torch.zeros(s.world_size, max(1, len(needed)), dtype=torch.int64)
        for i, w in enumerate(needed):
            lacks[s.rank, i] = int(w not in have)
        dist.all_reduce(lacks)
        replaced = {r for r in range(s.world_size) if lacks[r].any()}
        for lost in sorted(replaced):
            windows = [w for i, w in enumerate(needed) if lacks[lost, i]]
            peers = choose_peers(
                lost, s.world_size, s.config.replication_factor, s.replicator_ranks_per_node
            )
            holders = [p for p in peers if p not in replaced]
            if not holders:
                raise CheckpointFetchError(
                    f"rank {lost}'s MoC checkpoints {windows} have no surviving replica (peers "
                    f"{peers}); raise replication_factor or restart from the durable tier"
                )
            sender = holders[0]
            if s.rank == sender:
                store = s.replicator.replicas.get(lost)
                slots = [
                    None if store is None else (store.windows.get(w) or [None])[0] for w in windows
                ]
                if any(slot is None for slot in slots):
                    error = (
                        f"rank {sender} lacks replicas of rank {lost}'s MoC checkpoints "
                        f"{[w for w, slot in zip(windows, slots) if slot is None]}"
                    )
                    send_bytes(json.dumps(dict(error=error)).encode(), lost)
                    raise CheckpointFetchError(error)
                for slot in slots:
                    send_slot(slot, lost)
            elif s.rank == lost:
                for _ in windows:
                    manifest = json.loads(recv_bytes(sender))
                    if "error" in manifest:
                        raise CheckpointFetchError(manifest["error"])
                    slot = recv_slot(sender, manifest)
                    s.checkpoints.append(SparseCheckpoint.from_slots([slot]))
                s.checkpoints.sort(key=lambda c: c.window)
                logger.info(
                    "rank %d fetched MoC checkpoints %s from rank %d", s.rank, windows, sender
                )

    # ------------------------------------------------------------------ reporting
    def stats(self) -> dict:
        """Policy facts for reports: groups, bytes, and the lost-token accounting."""
        return dict(
            super().stats(),
            expert_fraction=self.baseline.expert_fraction,
            groups=self.groups,
            window_size=1,
            lost_tokens=self.ledger.lost_tokens,
            total_tokens=self.ledger.total_tokens,
            proportion_lost_tokens=self.ledger.proportion_lost,
            recoveries=[e.to_dict() for e in self.ledger.events],
        )


class PartialExpertStrategy(BaselineStrategy):
    """Partial expert checkpointing every iteration (MoC-System-like), with lost-token
    accounting. Constructed like :class:`~megatron_moevement.baselines.base.BaselineStrategy`
    (``baseline`` holds the policy's settings)."""

    name = "moc"

    def __init__(self, gpt_model, optimizer, config=None, baseline=None, num_experts=None, **kw):
        self._model_sizes = (
            num_experts or gpt_model.config.num_moe_experts,
            gpt_model.config.num_layers + (getattr(gpt_model.config, "mtp_num_layers", None) or 0),
        )
        super().__init__(gpt_model, optimizer, config, baseline, num_experts, **kw)

    def make_policy(self, baseline: BaselineConfig) -> PartialExpertPolicy:
        return PartialExpertPolicy(baseline, *self._model_sizes)

    @property
    def ledger(self) -> TokenLedger:
        """The lost-token accounting (shared by every rank)."""
        return self.policy.ledger
