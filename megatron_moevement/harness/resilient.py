"""Harness job ``resilient``: MoEvement training that survives SIGKILLed ranks.

Faults are injected by the victim process itself sending SIGKILL to its own pid at a precise
point: ``{"rank": r, "iteration": i, "phase": p, "generation": g}`` with phase one of
``before`` (start of the iteration), ``model`` (``iteration`` 0: the generation's trainer is
built, the strategy and its process group not yet: peers wait for this rank in that group's
rendezvous), ``build`` (``iteration`` 0: the generation's trainer and strategy are built, the
initial state not yet recorded; peers may still be building),
``microbatch<k>`` (mid-iteration, before microbatch k's forward; on a pipeline stage > 0 this is
also where the upstream-log receive of the activations is), ``backward<k>`` (microbatch k's
backward reached this stage's output: gradients are being computed and sent upstream),
``optimizer_step`` (gradients reduced, step not yet taken),
``after_step`` (optimizer step done, snapshot not yet taken), ``after_snapshot`` (snapshot copy
and replication just launched, in flight), ``fetch`` (a recovery's exchange of checkpoints and
logs), ``replay`` (during a recovery's replay, ranks in scope) or ``recovery_wait`` (while a rank
outside the scope waits for the replay; ``iteration`` is then its last committed one; for
``fetch`` too). ``iteration`` may be ``"*"``: the first time the rank reaches the phase (e.g. the
first replayed iteration, which depends on the window). ``generation`` (default 0) selects which
incarnation of the rank dies. :mod:`megatron_moevement.harness.faults` validates the specs.
``"signal": "SIGSTOP"`` stops the victim instead of killing it (a hang that only the heartbeat
can notice). ``"with": [ranks]`` kills those ranks at the same moment, wherever they are (a node
failure: two victims that each waited for their own fault point could block each other).

``spec.moevement["durable_tier"] = "module:factory"`` installs a durable tier for the recovery
driver's last fallback: ``factory(spec)`` returns a
:class:`~megatron_moevement.recovery.driver.DurableCheckpointLoader` that may also have
``after_iteration(iteration, driver)`` (called after every committed iteration, e.g. to save).

``spec.moevement`` may also name the checkpointing strategy: ``"strategy"`` (``moevement``,
``gemini`` or ``moc``, see :mod:`megatron_moevement.baselines`) and ``"baseline"`` (its
:class:`~megatron_moevement.baselines.BaselineConfig` fields). Each rank writes the wall-clock
time at which training started and every iteration committed (``timeline``), the strategy's
``stats()`` if it has them, and a victim appends its kill instant to ``faults.jsonl``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from pathlib import Path

import torch

from megatron_moevement.harness.faults import corrupt_state, record_fired, validate_faults
from megatron_moevement.logging_utils import get_logger
from megatron_moevement.recovery.protocol import StoreKeys
from megatron_moevement.recovery.warm_spare import is_spare_process, warm_up_spare

logger = get_logger(__name__)


def _throwaway_iteration(model_cfg, layout) -> None:
    """Builds a single-process model of one rank's shapes (its share of the layers and experts,
    full-width layers) and trains one iteration of it: a spare's warm-up."""
    from megatron_moevement.harness.layout import ParallelLayout
    from megatron_moevement.harness.trainer import HarnessTrainer

    layers = max(-(-model_cfg.num_layers // layout.pp), model_cfg.dense_first_layers + 1)
    shaped = dataclasses.replace(
        model_cfg,
        num_layers=layers,
        num_experts=max(model_cfg.num_experts // layout.ep, model_cfg.moe_router_topk),
        mtp_num_layers=None,
    )
    HarnessTrainer(shaped, ParallelLayout.parse("single")).train_iteration(0)


def run_resilient(spec) -> None:
    import torch.distributed as dist

    from megatron_moevement.baselines import build_strategy
    from megatron_moevement.config import MoEvementConfig
    from megatron_moevement.harness.layout import ParallelLayout
    from megatron_moevement.harness.model import TinyMoEConfig
    from megatron_moevement.harness.trainer import HarnessTrainer
    from megatron_moevement.recovery.driver import RecoveryDriver
    from megatron_moevement.recovery.protocol import ElasticContext
    from megatron_moevement.runtime import ensure_runtime

    ensure_runtime()
    fields = dict(spec.moevement)
    faults = fields.pop("faults", [])
    strategy_name = fields.pop("strategy", "moevement")
    baseline = fields.pop("baseline", None)
    durable_tier = fields.pop("durable_tier", None)
    # Benchmark knob: record this rank's RSS and the strategy's host bytes every N iterations.
    memory_every = int(fields.pop("memory_every", 0))
    # Test knob: rebuilds after a failure use another seed, i.e. a build() that does not
    # reproduce the job's initial weights (the initial-state tier must refuse it).
    rebuild_seed_offset = int(fields.pop("rebuild_seed_offset", 0))
    # Benchmark knob: False lets a spare start cold (no throwaway iteration while it waits).
    warm_spare = bool(fields.pop("warm_spare", True))
    config = MoEvementConfig.from_dict(fields)
    layout = ParallelLayout(**spec.layout)
    model_cfg = TinyMoEConfig.from_dict(spec.model)
    faults = validate_faults(faults, layout.world_size, spec.iterations, model_cfg.num_microbatches)
    if config.d2h_bandwidth_bytes_per_s is None:
        # Probed now, once per process: a spare does it while it waits for a rank to take,
        # not on the recovery's critical path (the harness runs on the CPU: no device yet).
        from megatron_moevement.snapshot.engine import snapshot_bandwidth

        snapshot_bandwidth(config.checksum)
    if warm_spare and is_spare_process():
        # While it waits, too: one throwaway iteration of a rank's shapes, so that the rebuild
        # and first replayed iterations of the rank it takes do not run cold.
        warm_up_spare(lambda: _throwaway_iteration(model_cfg, layout))
    ctx = ElasticContext.from_env(timeout_s=spec.timeout_s)

    corrupted: set[int] = set()  # corrupt faults fire once (the rank lives on)

    def fault_hook(iteration: int, phase: str, driver) -> None:
        for index, f in enumerate(faults):
            if (
                f["rank"] == driver.ctx.rank
                and f["iteration"] in (iteration, "*")
                and f["phase"] == phase
                and f.get("generation", 0) == driver.ctx.generation
            ):
                if "corrupt" in f:
                    if index in corrupted:
                        continue
                    corrupted.add(index)
                    damaged = corrupt_state(driver.strategy, f["corrupt"], seed=iteration)
                    logger.warning(
                        "fault injection: rank %d corrupted %s", driver.ctx.rank, damaged
                    )
                    record_fired(spec.output_dir, f, damaged=damaged)
                    continue
                sig = getattr(signal, f.get("signal", "SIGKILL"))
                for other in f.get("with", []):
                    # A node failure: the co-victims die at the same moment, wherever they are.
                    beat = json.loads(driver.ctx.store.get(StoreKeys.heartbeat(other)).decode())
                    logger.warning("fault injection: %s rank %d too", sig.name, other)
                    os.kill(beat["pid"], sig)
                logger.warning(
                    "fault injection: %s rank %d at iteration %d (%s)",
                    sig.name,
                    driver.ctx.rank,
                    iteration,
                    phase,
                )
                record_fired(spec.output_dir, f)
                os.kill(os.getpid(), sig)

    def build():
        cfg = model_cfg
        if rebuild_seed_offset and ctx.generation > 0:
            cfg = dataclasses.replace(model_cfg, seed=model_cfg.seed + rebuild_seed_offset)
        trainer = HarnessTrainer(cfg, layout)
        trainer.fault_point_hook = lambda it, point: fault_hook(it, point, driver)
        # Fault point "model": the trainer is built, the strategy (and its group) not yet.
        fault_hook(0, "model", driver)
        strategy = build_strategy(
            strategy_name, trainer.gpt_model, trainer.optimizer, config, baseline
        )
        trainer.p2p_communicator = strategy.p2p_communicator
        trainer.pg_collection = strategy.pg_collection
        # Fault point "build": trainer and strategy built, the initial state not yet recorded.
        fault_hook(0, "build", driver)
        return trainer, strategy

    durable = None
    if durable_tier:
        import importlib

        module, _, name = durable_tier.partition(":")
        durable = getattr(importlib.import_module(module), name)(spec)
    driver = RecoveryDriver(ctx, build, fault_hook, config=config, durable_loader=durable)
    driver.start()
    started = time.time()
    commits: list[tuple[int, float]] = []
    memory: list[dict] = []

    def on_iteration(it: int, driver) -> None:
        commits.append((it, time.time()))
        if memory_every and (it + 1) % memory_every == 0:
            import psutil

            host = driver.strategy.host_memory_bytes()
            memory.append(dict(iteration=it, rss=psutil.Process().memory_info().rss, **host))
        if hasattr(durable, "after_iteration"):
            durable.after_iteration(it, driver)

    driver.train(spec.iterations, on_iteration=on_iteration)
    driver.close()
    rank = dist.get_rank()
    out = Path(spec.output_dir)
    torch.save(driver.trainer.capture_state(), out / f"state_rank{rank}.pt")
    (out / f"recovery_rank{rank}.json").write_text(
        json.dumps(
            dict(
                rank=rank,
                generation=ctx.generation,
                joined_as_spare=driver.joined_as_spare,
                reports=[r.to_dict() for r in driver.reports],
                timeline=dict(start=started, commits=commits),
                memory=memory,
                stats=driver.strategy.stats() if hasattr(driver.strategy, "stats") else {},
            ),
            indent=1,
        )
    )
    driver.strategy.shutdown()
    dist.destroy_process_group()
