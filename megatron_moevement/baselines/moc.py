"""MoC-System-like baseline: partial expert checkpointing, recovery with lost tokens.

Every iteration, after the optimizer step, one checkpoint captures the full state (FP32 main
parameters, optimizer state, compute weights) of every *non-expert* operator of the stage plus
one rotating group of each layer's experts (:mod:`~megatron_moevement.baselines.rotation`), and
replicates it to peers — MoEvement's engine and replicator with a one-slot window per checkpoint
and ``n + 1`` generations retained (:mod:`~megatron_moevement.baselines.retention`).

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

from megatron_moevement.baselines.base import BaselineStrategy
from megatron_moevement.baselines.config import BaselineConfig
from megatron_moevement.baselines.lost_tokens import TokenLedger
from megatron_moevement.baselines.retention import retain_generations
from megatron_moevement.baselines.rotation import group_of_expert, latest_capture, num_groups
from megatron_moevement.config import MoEvementConfig
from megatron_moevement.replay.frozen import SlotLoader, default_operator_groups
from megatron_moevement.logging_utils import get_logger
from megatron_moevement.schedule.scheduler import SparseSchedule
from megatron_moevement.strategy import _owning_layer

__all__ = ["CheckpointFetchError", "PartialExpertStrategy"]

logger = get_logger(__name__)

# Bytes per parameter of the full state (FP32 main param + two FP32 Adam moments), as in
# strategy._FULL_STATE_BYTES_PER_PARAM: sizes that are the same on every replica.
_FULL_STATE_BYTES_PER_PARAM = 12


class CheckpointFetchError(RuntimeError):
    """A replacement rank's older checkpoint has no surviving replica."""


class PartialExpertStrategy(BaselineStrategy):
    """Partial expert checkpointing every iteration (MoC-System-like), with lost-token accounting.

    Constructed like :class:`~megatron_moevement.baselines.base.BaselineStrategy` (``baseline``
    holds the policy).
    """

    name = "moc"

    def __init__(
        self,
        gpt_model,
        optimizer,
        config: MoEvementConfig | None = None,
        baseline: BaselineConfig | None = None,
        num_experts: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(gpt_model, optimizer, config, baseline, num_experts, **kwargs)
        experts = num_experts or gpt_model.config.num_moe_experts
        self.num_experts = experts
        self.groups = num_groups(experts, self.baseline.expert_fraction)
        self.keep = self.groups + 1  # the newest n persisted checkpoints plus one in flight
        retain_generations(self, self.keep)
        self.ledger = TokenLedger(gpt_model.config.num_layers, experts)
        self._pending_counts = torch.zeros(gpt_model.config.num_layers, experts, dtype=torch.int64)
        self._hooks.extend(self._install_count_hooks())
        self._nonexpert = [op.name for op in self.registry if op.kind != "expert"]
        self._group_ops = {
            j: [
                op.name
                for op in self.registry.of_kind("expert")
                if group_of_expert(op.expert, self.groups) == j
            ]
            for j in range(self.groups)
        }
        self._adopted = False
        logger.info(
            "MoC on rank %d: %d expert groups (fraction %.3f), keeps %d checkpoints",
            self.rank,
            self.groups,
            self.baseline.expert_fraction,
            self.keep,
        )

    # ------------------------------------------------------------------ routing counts
    def _install_count_hooks(self) -> list:
        handles = []
        for name, module in self.gpt_model.named_modules():
            if not name.endswith("mlp.router"):
                continue
            layer = int(_owning_layer(self.gpt_model, name).layer_number) - 1

            def hook(mod, args, output, layer=layer):
                if mod.training:
                    self._pending_counts[layer] += output[1].detach().sum(dim=0).to(torch.int64)

            handles.append(module.register_forward_hook(hook))
        return handles

    def _record_counts(self, iteration: int) -> None:
        """Sums this iteration's routing counts over the job and records them (collective)."""
        import torch.distributed as dist

        counts = self._pending_counts.clone()
        dist.all_reduce(counts)
        self.ledger.record(iteration, counts.numpy())
        self._pending_counts.zero_()

    def _record_iteration(self, iteration: int) -> None:
        super()._record_iteration(iteration)
        self._record_counts(iteration)

    # ------------------------------------------------------------------ checkpoints
    def _schedule_for(self, generation: int) -> SparseSchedule:
        """One slot: every non-expert operator and the experts of this generation's group."""
        group = generation % self.groups
        names = self._nonexpert + self._group_ops[group]
        compute, full = {}, {}
        for name in names:
            op = self.registry[name]
            compute[name] = op.compute_bytes
            full[name] = sum(p.param.numel() for p in op.params) * _FULL_STATE_BYTES_PER_PARAM
        return SparseSchedule(
            slices=[names],
            compute_bytes=compute,
            full_state_bytes=full,
            include_compute_in_full_slot=True,
            policy="moc",
        )

    def _capture_slot(self, iteration: int) -> None:
        # The previous checkpoint must be persisted before a buffer is reused for a new one.
        if self.checkpoints and not self.checkpoints[-1].persisted:
            self.engine.drain()
            self.replicator.drain()
        generation = self._window_count
        ckpt = self.engine.begin_window(self._schedule_for(generation), iteration, generation)
        self._window_count += 1
        self.checkpoints.append(ckpt)
        del self.checkpoints[: max(0, len(self.checkpoints) - self.keep)]
        oldest = self.checkpoints[0].start_iteration
        self.scalar_log.discard_before(oldest)
        if generation >= self.groups:  # every group has a capture among the kept checkpoints
            self.ledger.fold_before(oldest)
        slot = self.engine.capture(ckpt, 0, iteration)
        self.replicator.replicate(ckpt, slot)
        self._count_snapshot()

    # ------------------------------------------------------------------ recovery
    def adopt_host_state(self, old: "PartialExpertStrategy") -> None:
        super().adopt_host_state(old)
        self.ledger = old.ledger
        self._adopted = True

    def rollback_and_replay(self, target_iteration: int, train_iteration, ckpt=None) -> dict:
        """Restores non-expert state from ``ckpt`` (default: the persisted checkpoint) and each
        expert group from its newest capture, accounts the lost tokens, and trains on from the
        checkpoint's iteration to ``target_iteration``. All ranks must call this together."""
        ckpt = ckpt or self.persisted_checkpoint
        if ckpt is None:
            raise RuntimeError(
                "no persisted MoC checkpoint to roll back to (a failure before the "
                "first one was replicated); restart from the durable tier"
            )
        self.flush()
        self._pending_counts.zero_()
        g, restore_it = ckpt.generation, ckpt.start_iteration
        needed = [gen for gen in range(g - self.groups + 1, g + 1) if gen >= 0]
        self._fetch_missing(needed)
        held = {c.generation: c for c in self.checkpoints}
        missing = [gen for gen in needed if gen not in held]
        if missing:
            raise CheckpointFetchError(
                f"rank {self.rank} lacks MoC checkpoints {missing} needed to restore from "
                f"generation {g}; restart from the durable tier"
            )
        loader = SlotLoader(
            self.registry, self.shard_plan, self.sharding, default_operator_groups()
        )
        for gen in needed:  # oldest first: newer captures override (non-expert state from g)
            loader.apply(held[gen], 0)
        captured_at = {}
        for j in range(self.groups):
            gen = latest_capture(j, g, self.groups, needed)
            captured_at[j] = None if gen is None else held[gen].start_iteration
        self._sync_ledger()
        event = self.ledger.account_recovery(
            restore_it,
            {
                (layer, e): captured_at[group_of_expert(e, self.groups)]
                for layer in range(self.ledger.num_layers)
                for e in range(self.num_experts)
            },
        )
        retrained = list(range(restore_it + 1, target_iteration + 1))
        for iteration in retrained:
            train_iteration(iteration)
            self._record_counts(iteration)
        self.checkpoints = [held[gen] for gen in needed]
        report = dict(
            window=g,
            window_start=restore_it,
            window_size=1,
            target_iteration=target_iteration,
            iterations_replayed=retrained,
            frozen_operators={it: 0 for it in retrained},
            lost_tokens=event.lost_tokens,
            stale_experts=event.stale_experts,
        )
        self.replay_reports.append(report)
        logger.warning(
            "MoC rollback to iteration %d: %d expert(s) restored stale, %d tokens lost "
            "(PLT so far %.4f%%); retrained %s",
            restore_it,
            len(event.stale_experts),
            event.lost_tokens,
            100 * self.ledger.proportion_lost,
            retrained,
        )
        return report

    def resume_after_recovery(self, committed: int, window_count: int, ckpt) -> None:
        """Keeps the checkpoints the restore used (they hold the newest capture of each expert
        group) and captures the next generation after ``ckpt``'s again."""
        kept = list(self.checkpoints)
        super().resume_after_recovery(committed, ckpt.generation + 1, ckpt)
        self.checkpoints = kept

    def _sync_ledger(self) -> None:
        """Every rank takes the routing counts of the lowest rank that kept them (replacement
        ranks have none; survivors may differ in the last, uncommitted iteration)."""
        import torch.distributed as dist

        flags = torch.zeros(self.world_size, dtype=torch.int64)
        flags[self.rank] = int(self._adopted)
        dist.all_reduce(flags)
        holders = [r for r, f in enumerate(flags.tolist()) if f]
        if not holders:
            raise CheckpointFetchError("no surviving rank holds the routing counts")
        box = [self.ledger.state_dict() if self.rank == holders[0] else None]
        dist.broadcast_object_list(box, src=holders[0])
        if self.rank != holders[0]:
            self.ledger.load_state_dict(box[0])

    def _fetch_missing(self, needed: list[int]) -> None:
        """Each rank lacking some of the checkpoints ``needed`` receives them from the lowest of
        its replica peers that is not itself a replacement (collective)."""
        import torch.distributed as dist

        from megatron_moevement.snapshot.replication import choose_peers
        from megatron_moevement.snapshot.engine import SparseCheckpoint
        from megatron_moevement.snapshot.transport import recv_bytes, recv_slot, send_bytes, send_slot

        have = {c.generation for c in self.checkpoints}
        lacks = torch.zeros(self.world_size, max(1, len(needed)), dtype=torch.int64)
        for i, gen in enumerate(needed):
            lacks[self.rank, i] = int(gen not in have)
        dist.all_reduce(lacks)
        replaced = {r for r in range(self.world_size) if lacks[r].any()}
        for lost in sorted(replaced):
            gens = [gen for i, gen in enumerate(needed) if lacks[lost, i]]
            peers = choose_peers(
                lost,
                self.world_size,
                self.config.replication_factor,
                self.replicator_ranks_per_node,
            )
            holders = [p for p in peers if p not in replaced]
            if not holders:
                raise CheckpointFetchError(
                    f"rank {lost}'s MoC checkpoints {gens} have no surviving replica (peers "
                    f"{peers}); raise replication_factor or restart from the durable tier"
                )
            sender = holders[0]
            if self.rank == sender:
                store = self.replicator.replicas.get(lost)
                slots = [
                    None if store is None else (store.windows.get(gen) or [None])[0] for gen in gens
                ]
                if any(s is None for s in slots):
                    error = (
                        f"rank {sender} lacks replicas of rank {lost}'s MoC checkpoints "
                        f"{[gen for gen, s in zip(gens, slots) if s is None]}"
                    )
                    send_bytes(json.dumps(dict(error=error)).encode(), lost)
                    raise CheckpointFetchError(error)
                for slot in slots:
                    send_slot(slot, lost)
            elif self.rank == lost:
                for _ in gens:
                    manifest = json.loads(recv_bytes(sender))
                    if "error" in manifest:
                        raise CheckpointFetchError(manifest["error"])
                    slot = recv_slot(sender, manifest)
                    self.checkpoints.append(SparseCheckpoint.from_slots([slot]))
                self.checkpoints.sort(key=lambda c: c.generation)
                logger.info(
                    "rank %d fetched MoC checkpoints %s from rank %d", self.rank, gens, sender
                )

    # ------------------------------------------------------------------ reporting
    def stats(self) -> dict:
        """Policy facts for reports: groups, bytes, and the lost-token accounting."""
        return dict(
            super().stats(),
            strategy=self.name,
            expert_fraction=self.baseline.expert_fraction,
            groups=self.groups,
            window_size=1,
            lost_tokens=self.ledger.lost_tokens,
            total_tokens=self.ledger.total_tokens,
            proportion_lost_tokens=self.ledger.proportion_lost,
            recoveries=[e.to_dict() for e in self.ledger.events],
        )
