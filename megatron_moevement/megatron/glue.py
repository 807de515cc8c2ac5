"""The functions that the Megatron-LM patch (``patches/``) calls.

Each hunk of the patch is one or two lines that call into this module, so the integration logic
lives (and is tested) here rather than in Megatron-LM's files. The call sites, for
Megatron-LM ``core_v0.16.1``:

* ``pretrain_gpt.py``: ``extra_args_provider=extra_args_provider(<ModelOpt's or None>)``;
* ``setup_model_and_optimizer()``: ``recover_or_load(args, load_checkpoint, model, ...)`` in
  place of ``load_checkpoint(model, ...)``: builds the strategy on the fresh model and optimizer
  *first* and routes the restore through it (see :func:`recover_or_load`);
* ``pretrain()``, once model and optimizer are built:
  ``checkpointing_context["moevement"] = maybe_build_strategy(args, model, optimizer)`` (the
  strategy :func:`recover_or_load` built) and ``install_p2p_logging(checkpointing_context[...])``;
* ``train()``, where it gets the schedule: ``forward_backward_func =
  wrap_forward_backward_func(forward_backward_func, strategy_from(checkpointing_context), args)``,
  which hands the strategy's ``LoggingP2PCommunicator`` (upstream logging) and its
  ``ProcessGroupCollection`` to every ``forward_backward_func(...)`` call of ``train_step``;
* ``train()``, after each ``train_step()``:
  ``after_optimizer_step(strategy_from(checkpointing_context), iteration)``;
* ``train()``, after the loop: ``shutdown(strategy_from(checkpointing_context))``.

The strategy travels in Megatron's ``checkpointing_context`` dict (key ``"moevement"``), which is
already passed from ``pretrain()`` to ``train()``; no Megatron signature changes.

``--ckpt-strategy`` picks the strategy: ``moevement``
(:class:`~megatron_moevement.strategy.MoEvementStrategy`) or one of the baselines ``gemini`` /
``moc`` (:mod:`megatron_moevement.baselines`, built by
:func:`~megatron_moevement.baselines.build_strategy` with the ``--baseline-*`` policy). Every
function here works the same for all three; the baselines run without upstream logging, so
:func:`wrap_forward_backward_func` leaves the schedule alone for them.

``megatron/training/training.py`` is shared by every Megatron-LM pretrain script, most of which
do not register :func:`~megatron_moevement.megatron.args.add_moevement_args`. Every function here
therefore treats arguments without ``--ckpt-strategy`` as ``--ckpt-strategy default``: MoEvement
off, Megatron unchanged.

Not implemented (and said at runtime rather than failing silently): rolling back to the sparse
checkpoints in peers' host memory *inside Megatron-LM's training loop*. Megatron-LM's ``train()``
hosts no :class:`~megatron_moevement.recovery.driver.RecoveryDriver` (its data iterator is consumed, not
addressable by iteration, and its loop cannot rejoin a new process-group generation), so after a
failure a Megatron-LM job restarts and :func:`recover_or_load` restores from the durable tier;
:func:`last_restore` and a log line say so. Training loops built on Megatron-Core with
``RecoveryDriver`` recover in memory (``docs/recovery.md``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import numbers
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

from megatron_moevement.baselines.config import BaselineConfig
from megatron_moevement.config import MoEvementConfig
from megatron_moevement.logging_utils import get_logger
from megatron_moevement.megatron import inloop
from megatron_moevement.megatron.args import (
    MoEvementArgsError,
    add_moevement_args,
    baseline_config_from_args,
    moevement_config_from_args,
    spare_hosts_from_args,
)

__all__ = [
    "CONTEXT_KEY",
    "MoEvementIntegrationError",
    "RestoreReport",
    "active_strategy",
    "after_optimizer_step",
    "extra_args_provider",
    "forget_strategy",
    "install_p2p_logging",
    "last_restore",
    "maybe_build_strategy",
    "moevement_requested",
    "recover_after_restart",
    "recover_or_load",
    "replay_after_restart",
    "requested_strategy",
    "shutdown",
    "strategy_from",
    "unwrap_gpt_model",
    "wrap_forward_backward_func",
    "wrap_pretrain",
]

logger = get_logger(__name__)

CONTEXT_KEY = "moevement"
"""Key of the strategy in Megatron-LM's ``checkpointing_context`` dict."""

_MAX_WRAPPER_DEPTH = 16

ArgsProvider = Callable[[argparse.ArgumentParser], argparse.ArgumentParser]
StrategyFactory = Callable[[Any, Any, MoEvementConfig], Any]
"""``f(gpt_model, optimizer, config) -> strategy``: builds the strategy of one rank."""

_STRATEGY_LABELS = {"moevement": "MoEvement", "gemini": "Gemini-like", "moc": "MoC-like"}


class MoEvementIntegrationError(RuntimeError):
    """The Megatron-LM job cannot run with the requested ``--ckpt-strategy`` as configured; the
    message says what to change."""


@dataclass(frozen=True)
class RestoreReport:
    """Where the training state of this process came from at startup.

    Attributes:
        source: ``"megatron_checkpoint"``: Megatron's ``load_checkpoint`` from ``--load`` (the
            durable tier; with MoEvement's ``dist_checkpointing`` backend it loads through the
            strategy built just before it).
        iteration: The iteration the load returned, if it returned one.
        detail: A human-readable explanation, also logged.
        tiers: Every restore tier considered, in order, with what happened to it
            (``("in-memory", "...")``, ``("durable", "...")``).
    """

    source: str
    iteration: Optional[int]
    detail: str
    tiers: Tuple[Tuple[str, str], ...] = ()


@dataclass
class _GlueState:
    active: Any = None
    built_for: Optional[Tuple[int, int]] = None
    """``(id(gpt_model), id(optimizer))`` the active strategy was built on."""
    last_restore: Optional[RestoreReport] = None


_state = _GlueState()


# --------------------------------------------------------------------------------- arguments


def extra_args_provider(*others: Optional[ArgsProvider]) -> ArgsProvider:
    """An ``extra_args_provider`` that runs ``others`` (skipping ``None``), then adds ours.

    Megatron-LM's ``pretrain()`` takes a single provider, and ``pretrain_gpt.py`` already passes
    ModelOpt's when it is installed; this chains them.

    Args:
        others: Other providers (``parser -> parser``) or ``None``.

    Returns:
        A provider suitable for ``pretrain(..., extra_args_provider=...)``.

    Raises:
        TypeError: One of ``others`` is neither callable nor ``None``.
    """
    chained = [p for p in others if p is not None]
    for provider in chained:
        if not callable(provider):
            raise TypeError(
                f"extra_args_provider got {provider!r}, which is not callable. Fix: pass "
                "functions that take an argparse parser and return it, or None."
            )

    def provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        for other in chained:
            result = other(parser)
            parser = parser if result is None else result
        return add_moevement_args(parser)

    return provider


def requested_strategy(args: Any) -> str:
    """The ``--ckpt-strategy`` value: ``default``, ``moevement``, ``gemini`` or ``moc``
    (``default`` when the arguments were parsed without our provider: another pretrain script
    sharing ``training.py``)."""
    return getattr(args, "ckpt_strategy", "default")


def moevement_requested(args: Any) -> bool:
    """True when an in-memory strategy was requested (``--ckpt-strategy moevement``, ``gemini``
    or ``moc``); False for ``default`` or arguments parsed without our provider."""
    return requested_strategy(args) != "default"


def _check_default_args(args: Any) -> None:
    """With ``--ckpt-strategy default``: rejects ``--baseline-*`` options, which only a baseline
    reads (a forgotten ``--ckpt-strategy gemini`` / ``moc``)."""
    if hasattr(args, "ckpt_strategy"):
        baseline_config_from_args(args)


# --------------------------------------------------------------------------------- model


def _default_gpt_model_types() -> Tuple[type, ...]:
    from megatron.core.models.gpt import GPTModel

    return (GPTModel,)


def unwrap_gpt_model(model: Any, gpt_model_types: Optional[Tuple[type, ...]] = None) -> Any:
    """The ``GPTModel`` stage inside Megatron-LM's model object.

    Megatron-LM hands ``pretrain()`` a list of model chunks (one per virtual pipeline stage), each
    wrapped in ``DistributedDataParallel`` and, for fp16/bf16, ``Float16Module``. Wrappers are
    peeled off through their ``module`` attribute until a ``GPTModel`` is reached.

    Args:
        model: A model chunk list, or a single (possibly wrapped) module.
        gpt_model_types: Types that count as the model stage (default: Megatron-Core's
            ``GPTModel``).

    Returns:
        The unwrapped model stage.

    Raises:
        MoEvementIntegrationError: Empty list, more than one chunk (virtual pipeline
            parallelism), or no model stage found inside the wrappers.
    """
    types = gpt_model_types or _default_gpt_model_types()
    if isinstance(model, (list, tuple)):
        if len(model) == 0:
            raise MoEvementIntegrationError(
                "the model list is empty: there is no model stage to checkpoint on this rank. "
                "Fix: call maybe_build_strategy after Megatron's setup_model_and_optimizer()."
            )
        if len(model) > 1:
            raise MoEvementIntegrationError(
                f"the model has {len(model)} chunks (virtual pipeline parallelism); "
                "MoEvementStrategy checkpoints one GPTModel stage per rank. Fix: run without "
                "--num-layers-per-virtual-pipeline-stage / --num-virtual-stages-per-pipeline-rank, "
                "or use --ckpt-strategy default."
            )
        model = model[0]
    current = model
    chain = []
    for _ in range(_MAX_WRAPPER_DEPTH):
        if isinstance(current, types):
            return current
        chain.append(type(current).__name__)
        inner = getattr(current, "module", None)
        if inner is None:
            break
        current = inner
    raise MoEvementIntegrationError(
        f"no {' or '.join(t.__name__ for t in types)} found inside the model (wrappers seen: "
        f"{' -> '.join(chain)}). MoEvement supports Megatron-Core GPTModel stages wrapped in "
        "DistributedDataParallel / Float16Module. Fix: use pretrain_gpt.py with the Megatron-Core "
        "model (not --use-legacy-models), or --ckpt-strategy default."
    )


# --------------------------------------------------------------------------------- strategy


def _check_supported(args: Any) -> None:
    """Rejects Megatron-LM options that the strategies do not handle, naming the option."""
    unsupported = []
    if getattr(args, "use_torch_fsdp2", False) or getattr(args, "use_megatron_fsdp", False):
        unsupported.append(
            "--use-torch-fsdp2 / --use-megatron-fsdp (fully sharded parameters are not mapped to "
            "operators; use DDP, optionally with --use-distributed-optimizer)"
        )
    if getattr(args, "iterations_to_skip", None):
        unsupported.append(
            "--iterations-to-skip, also filled from --result-rejected-tracker-filename (a "
            "skipped iteration would leave a hole in a sparse checkpointing window)"
        )
    if getattr(args, "use_legacy_models", False):
        unsupported.append("--use-legacy-models (use the Megatron-Core GPTModel)")
    if unsupported:
        raise MoEvementIntegrationError(
            f"--ckpt-strategy {requested_strategy(args)} does not support: "
            + "; ".join(unsupported)
            + ". Fix: drop those options or use --ckpt-strategy default."
        )


def _scope_for_megatron_lm(args: Any, config: MoEvementConfig, name: str) -> MoEvementConfig:
    """Tied input and output embeddings with pipeline parallelism (Megatron-LM's default without
    ``--untie-embeddings-and-output-weights``): their gradients are all-reduced between the first
    and the last stage inside every iteration, so one stage cannot replay without the other and
    recovery must be global."""
    tied = not getattr(args, "untie_embeddings_and_output_weights", True)
    pp = int(getattr(args, "pipeline_model_parallel_size", 1) or 1)
    if name != "moevement" or not tied or pp == 1 or config.recovery_scope != "auto":
        return config
    logger.warning(
        "MoEvement: the input and output embeddings are tied across pipeline stages, so a "
        "failed stage cannot replay alone (their gradients are all-reduced between the first and "
        "last stage every iteration): recovery is global. Pass "
        "--untie-embeddings-and-output-weights for scoped recovery."
    )
    return dataclasses.replace(config, recovery_scope="global")


def _build_strategy(gpt_model: Any, optimizer: Any, config: MoEvementConfig) -> Any:
    """Builds a :class:`~megatron_moevement.strategy.MoEvementStrategy` (tests replace this)."""
    from megatron_moevement.baselines import build_strategy

    return build_strategy("moevement", gpt_model, optimizer, config)


def _default_factory(name: str, baseline: Optional[BaselineConfig]) -> StrategyFactory:
    """The factory for ``--ckpt-strategy name``: :func:`_build_strategy` for ``moevement``, else
    one that builds the baseline with its policy (closed over, so that every factory keeps the
    ``f(gpt_model, optimizer, config)`` signature)."""
    if baseline is None:
        return _build_strategy  # looked up at call time, so that tests can replace it

    def build_baseline(gpt_model: Any, optimizer: Any, config: MoEvementConfig) -> Any:
        from megatron_moevement.baselines import build_strategy

        return build_strategy(name, gpt_model, optimizer, config, baseline)

    build_baseline.__name__ = f"build_{name}"
    return build_baseline


def maybe_build_strategy(
    args: Any,
    model: Any,
    optimizer: Any,
    *,
    strategy_factory: Optional[StrategyFactory] = None,
) -> Any:
    """Builds the strategy that ``--ckpt-strategy`` requests (none with ``default``).

    ``moevement`` builds a :class:`~megatron_moevement.strategy.MoEvementStrategy`; ``gemini``
    and ``moc`` build the baseline (:func:`~megatron_moevement.baselines.build_strategy`) with the
    ``--baseline-*`` policy and the ``--moevement-*`` storage settings. Call it on every rank once
    Megatron's model and optimizer exist. :func:`recover_or_load` calls it before Megatron's
    checkpoint load (so that the load can go through the strategy); the call in ``pretrain()``
    then returns that same strategy. A strategy left from an earlier ``pretrain()`` call in this
    process (in-process restart) is replaced.

    Args:
        args: Megatron's parsed arguments (``get_args()``).
        model: Megatron's model chunk list (or a single wrapped model).
        optimizer: Megatron's optimizer for that model.
        strategy_factory: ``f(gpt_model, optimizer, config) -> strategy``; default builds the
            requested strategy (tests pass a fake). ``config`` is the shared
            :class:`MoEvementConfig`; a baseline's policy is not passed to it.

    Returns:
        The strategy, or ``None`` with ``--ckpt-strategy default`` (or arguments parsed without
        our provider) and when there is no optimizer (``--skip-train``).

    Raises:
        MoEvementArgsError: Invalid ``--moevement-*`` / ``--baseline-*`` values or combinations
            (the message names the flag).
        MoEvementIntegrationError: Unsupported Megatron-LM options or model layout.
    """
    name = requested_strategy(args)
    if name == "default":
        _check_default_args(args)
        return None
    config = moevement_config_from_args(args)
    baseline = baseline_config_from_args(args)
    if optimizer is None:
        logger.warning(
            "--ckpt-strategy %s has nothing to checkpoint without an optimizer (--skip-train); "
            "in-memory checkpointing stays off",
            name,
        )
        return None
    _check_supported(args)
    config = _scope_for_megatron_lm(args, config, name)
    gpt_model = unwrap_gpt_model(model)
    if _state.active is not None and _state.built_for == (id(gpt_model), id(optimizer)):
        return _state.active  # built by recover_or_load for this very model and optimizer
    if _state.active is not None:
        logger.warning(
            "a %s strategy from an earlier pretrain() call in this process is replaced "
            "(in-process restart); its in-memory checkpoints are discarded",
            _STRATEGY_LABELS[name],
        )
        _state.active = None
        _state.built_for = None
    # Only MoEvement gets here with a durable directory: moevement_config_from_args rejects it
    # for the baselines, whose checkpoints the periodic saver would not write correctly (MoC
    # never calls it and holds one expert group per checkpoint; Gemini calls it only at its
    # snapshot iterations), see args._check_baseline_flags.
    if config.durable_dir is not None:
        logger.warning(
            "--moevement-durable-dir is set: the strategy writes sparse durable checkpoints "
            "(dist_checkpointing backend 'moevement') every %d iterations to %s; turn one into a "
            "dense torch_dist checkpoint with moevement-convert. A restarted Megatron-LM job "
            "still restores from Megatron's own --save/--load: replaying a sparse checkpoint needs "
            "data addressable by iteration, which Megatron-LM's data iterator is not",
            config.durable_interval,
            config.durable_dir,
        )
    spares = spare_hosts_from_args(args)
    if spares:
        logger.info(
            "%d spare node(s) reserved: %s (with --ckpt-strategy moevement under the elastic "
            "agents a spare takes over a failed rank; see docs/megatron_integration.md)",
            len(spares),
            ",".join(spares),
        )
    factory = strategy_factory or _default_factory(name, baseline)
    session = inloop.current_session()
    if session is not None:  # fault point "model": model built, the strategy's group not yet
        session.fault_point(0, "model")
    strategy = factory(gpt_model, optimizer, config)
    if session is not None:  # fault point "build": the strategy is built, training not begun
        session.fault_point(0, "build")
    _state.active = strategy
    _state.built_for = (id(gpt_model), id(optimizer))
    if baseline is None:
        logger.info("MoEvement sparse checkpointing enabled: %s", config.to_dict())
    else:
        effective = getattr(strategy, "config", None)
        logger.info(
            "%s in-memory checkpointing (--ckpt-strategy %s) enabled: %s, %s",
            _STRATEGY_LABELS[name],
            name,
            baseline.to_dict(),
            (effective if isinstance(effective, MoEvementConfig) else config).to_dict(),
        )
    return strategy


def install_p2p_logging(strategy: Any) -> bool:
    """Checks that upstream logging of pipeline p2p traffic will run, and says so.

    The strategy builds its ``LoggingP2PCommunicator`` (:mod:`megatron_moevement.upstream.log`)
    and ``ProcessGroupCollection`` on pipeline-parallel jobs with ``--moevement-upstream-logging``
    (the default); :func:`wrap_forward_backward_func` hands them to the schedule.

    Args:
        strategy: The strategy from :func:`maybe_build_strategy`, or ``None``.

    Returns:
        True if the strategy logs what its pipeline stage sends (False without a strategy, with
        ``--no-moevement-upstream-logging``, for the ``gemini`` / ``moc`` baselines, which roll
        every rank back and run without it, or without pipeline parallelism: nothing to log).
    """
    if strategy is None or not strategy.config.upstream_logging:
        return False
    if getattr(strategy, "p2p_communicator", None) is None:
        logger.info("upstream logging: no pipeline parallelism, so no p2p traffic to log")
        return False
    logger.info("upstream logging: every tensor this pipeline stage sends is kept in host memory")
    return True


def wrap_forward_backward_func(
    forward_backward_func: Callable[..., Any], strategy: Any, args: Any
) -> Callable[..., Any]:
    """The schedule ``train_step`` calls, with MoEvement's upstream logging.

    Megatron-LM's ``train_step`` calls ``forward_backward_func(forward_step_func=...,
    data_iterator=..., model=..., ...)`` without a ``p2p_communicator``, so the 1F1B schedule
    builds a plain one. The wrapper passes the strategy's ``LoggingP2PCommunicator`` and the
    ``ProcessGroupCollection`` that goes with it (Megatron-Core 0.16.1's
    ``forward_backward_pipelining_without_interleaving(..., p2p_communicator=...,
    pg_collection=...)``), after telling the communicator which iteration starts (Megatron-LM
    sets ``args.curr_iteration`` before each ``train_step``; a re-run of the same iteration by
    the rerun state machine overwrites its log entries). Nothing in Megatron-LM is patched.

    Args:
        forward_backward_func: Megatron's ``get_forward_backward_func()`` (possibly wrapped).
        strategy: The strategy, or ``None``.
        args: Megatron's arguments object (read at call time for ``curr_iteration``).

    Returns:
        ``forward_backward_func`` itself when there is nothing to log (no strategy, no pipeline
        parallelism, ``--no-moevement-upstream-logging``, or a ``gemini`` / ``moc`` baseline:
        their config turns upstream logging off, so they have no ``p2p_communicator``), else the
        wrapper.
    """
    session = inloop.current_session()
    faults = session is not None and session.fault_hook is not None
    if strategy is None or (getattr(strategy, "p2p_communicator", None) is None and not faults):
        return forward_backward_func

    def forward_backward_with_upstream_logging(*fb_args: Any, **fb_kwargs: Any) -> Any:
        if fb_kwargs.get("forward_only"):
            return forward_backward_func(*fb_args, **fb_kwargs)  # nothing recovery replays
        if faults:
            _with_fault_points(session, fb_kwargs, getattr(args, "curr_iteration", -1))
        if getattr(strategy, "p2p_communicator", None) is None:
            return forward_backward_func(*fb_args, **fb_kwargs)
        for name in ("p2p_communicator", "pg_collection"):
            if fb_kwargs.get(name) is not None:
                raise MoEvementIntegrationError(
                    f"forward_backward_func got its own {name}; MoEvement's upstream logging "
                    "needs to supply it. Fix: drop it, or pass --no-moevement-upstream-logging."
                )
        # The strategy's logging communicator, or a replay's (fed by the neighbours' logs).
        communicator = inloop.p2p_communicator_for(strategy)
        iteration = getattr(args, "curr_iteration", None)
        if not isinstance(iteration, numbers.Integral) or isinstance(iteration, bool):
            raise MoEvementIntegrationError(
                f"args.curr_iteration={iteration!r} is not the iteration train_step runs. Fix: "
                "call the wrapped forward_backward_func from Megatron-LM's train() loop, which "
                "sets it."
            )
        communicator.begin_iteration(int(iteration))
        fb_kwargs["p2p_communicator"] = communicator
        fb_kwargs["pg_collection"] = strategy.pg_collection
        return forward_backward_func(*fb_args, **fb_kwargs)

    forward_backward_with_upstream_logging.__wrapped__ = forward_backward_func  # type: ignore
    return forward_backward_with_upstream_logging


def _with_fault_points(session: Any, fb_kwargs: dict, iteration: Any) -> None:
    """Fault-injection points (an installed ``fault_hook``): ``before`` the iteration and
    ``microbatch<k>`` before microbatch k's forward step."""
    forward_step_func = fb_kwargs["forward_step_func"]
    counter = iter(range(1 << 30))
    session.fault_point(iteration, "before")

    def forward_step_with_fault_points(*a: Any, **kw: Any) -> Any:
        session.fault_point(iteration, f"microbatch{next(counter)}")
        return forward_step_func(*a, **kw)

    fb_kwargs["forward_step_func"] = forward_step_with_fault_points


def after_optimizer_step(
    strategy: Any, iteration: int, num_floating_point_operations_so_far: Optional[float] = None
) -> None:
    """Captures this iteration's sparse-checkpoint slot (no-op without a strategy).

    Call it once per training iteration, after ``train_step`` returned (its optimizer step has
    run), with Megatron's 0-based ``iteration`` counter *before* it is incremented, i.e. the
    number of iterations completed before this one. In an elastic session
    (:mod:`megatron_moevement.megatron.inloop`) it also records Megatron's counters after this
    iteration (``num_floating_point_operations_so_far``: ``train()``'s count before it), which an
    in-memory recovery restores.

    Raises:
        ValueError: ``iteration`` is not an integer >= 0.
    """
    if strategy is None:
        return
    if not isinstance(iteration, numbers.Integral) or isinstance(iteration, bool) or iteration < 0:
        raise ValueError(
            f"after_optimizer_step got iteration={iteration!r}. Fix: pass Megatron's integer "
            "iteration counter (>= 0) before it is incremented."
        )
    session = inloop.current_session()
    if session is not None:
        from megatron.training import get_args

        # Counters from the start of the oldest checkpoint a rollback may use (read before this
        # step's capture, which may drop it: keeping one window more is harmless).
        checkpoints = getattr(strategy, "checkpoints", None) or []
        oldest = checkpoints[0].start_iteration if checkpoints else 0
        session.after_step(
            int(iteration), get_args(), num_floating_point_operations_so_far or 0, oldest
        )
        session.fault_point(int(iteration), "after_step")
    bytes_before = getattr(strategy, "snapshot_bytes_total", 0)
    started = time.perf_counter()
    strategy.after_optimizer_step(int(iteration))
    stall_s = time.perf_counter() - started
    if session is not None:
        session.fault_point(int(iteration), "after_snapshot")
    _report_iteration(
        int(iteration) + 1, getattr(strategy, "snapshot_bytes_total", 0) - bytes_before, stall_s
    )


def _report_iteration(count: int, snapshot_bytes: int, stall_s: float) -> None:
    """This iteration's snapshot figures where a Megatron-LM user looks: its TensorBoard / W&B
    writers (every iteration, when configured) and its log (the last rank, every
    ``--log-interval`` iterations)."""
    try:
        from megatron.training import get_args, get_tensorboard_writer, get_wandb_writer
        from megatron.training.utils import print_rank_last

        args = get_args()
    except (ImportError, AssertionError):  # a Megatron-Core loop without megatron.training
        return
    writer, wandb = get_tensorboard_writer(), get_wandb_writer()
    if writer is not None:
        writer.add_scalar("moevement/snapshot_bytes", snapshot_bytes, count)
        writer.add_scalar("moevement/snapshot_stall_s", stall_s, count)
    if wandb is not None:
        wandb.log(
            {"moevement/snapshot_bytes": snapshot_bytes, "moevement/snapshot_stall_s": stall_s},
            count,
        )
    interval = getattr(args, "log_interval", None)
    if isinstance(interval, int) and interval > 0 and count % interval == 0:
        print_rank_last(
            f" [MoEvement] after iteration {count}: snapshot {snapshot_bytes / 2**20:.2f} MiB, "
            f"training thread stalled {stall_s * 1e3:.1f} ms"
        )


def _load_target(load_args: Tuple[Any, ...], load_kwargs: dict) -> Tuple[Any, Any]:
    """``(model, optimizer)`` from ``load_checkpoint``'s arguments."""
    model = load_kwargs.get("model", load_args[0] if load_args else None)
    optimizer = load_kwargs.get("optimizer", load_args[1] if len(load_args) > 1 else None)
    return model, optimizer


def recover_or_load(args: Any, load_fn: Callable[..., Any], *load_args: Any, **load_kwargs: Any):
    """Restores the training state at startup, through the strategy; returns what ``load_fn``
    returns.

    With an in-memory ``--ckpt-strategy`` (``moevement``, ``gemini``, ``moc``):

    1. builds the strategy on the fresh model and optimizer (:func:`maybe_build_strategy`) before
       anything is loaded, so that the load goes through it: MoEvement's ``dist_checkpointing``
       backend (the durable tier, :mod:`megatron_moevement.durable`) restores into the strategy
       that is active when ``load_fn`` runs, and an invalid configuration fails before a long
       load;
    2. considers the restore tiers in order. *In memory* (the newest sparse checkpoint in peers'
       host memory): not available inside Megatron-LM's loop (see the module docstring), so a
       strategy left from an in-process restart is discarded with a warning. *Durable*: ``load_fn``
       (Megatron's ``load_checkpoint`` from ``--load``);
    3. refreshes the strategy's view of the model and optimizer tensors, which the load may
       have replaced (optimizer state dicts are rebuilt by ``load_state_dict``);
    4. records what happened in :func:`last_restore` (and a log line).

    Args:
        args: Megatron's parsed arguments.
        load_fn: Megatron's ``load_checkpoint``.
        load_args: Positional arguments of ``load_fn`` (``model, optimizer, scheduler, ...``).
        load_kwargs: Keyword arguments of ``load_fn``.

    Returns:
        ``load_fn(*load_args, **load_kwargs)``, unchanged.

    Raises:
        MoEvementArgsError, MoEvementIntegrationError: As :func:`maybe_build_strategy`.
    """
    name = requested_strategy(args)
    if name == "default":
        _check_default_args(args)
        return load_fn(*load_args, **load_kwargs)
    tiers = []
    session = inloop.current_session()
    if session is not None and session.pending is not None:
        # In-memory recovery (phase A, in pretrain() once the strategy exists) comes first;
        # Megatron's checkpoint stays the fallback, loaded only if no in-memory tier can serve.
        session.load_fallback = lambda: load_fn(*load_args, **load_kwargs)
        _state.last_restore = RestoreReport(
            "in-memory",
            None,
            "in-memory recovery from peer replicas (generation "
            f"{session.ctx.generation}); Megatron's --load is the fallback",
            (("in-memory", "pending"), ("durable", "deferred: --load is the fallback")),
        )
        model, optimizer = _load_target(load_args, load_kwargs)
        maybe_build_strategy(args, model, optimizer)
        return 0, 0
    previous = _state.active
    if previous is not None:
        persisted = getattr(previous, "persisted_checkpoint", None)
        what = (
            "no persisted sparse checkpoint"
            if persisted is None
            else (
                f"the sparse checkpoint of window {persisted.window} (iteration "
                f"{persisted.start_iteration} on)"
            )
        )
        tiers.append(
            (
                "in-memory",
                f"{what} from before an in-process restart, discarded: "
                "Megatron-LM's training loop cannot replay it",
            )
        )
        logger.warning(
            "MoEvement: found a %s strategy from before an in-process restart holding %s; "
            "Megatron-LM's training loop cannot roll back to it, so it is discarded",
            _STRATEGY_LABELS.get(name, name),
            what,
        )
        _state.active = None
        _state.built_for = None
    model, optimizer = _load_target(load_args, load_kwargs)
    strategy = maybe_build_strategy(args, model, optimizer)
    result = load_fn(*load_args, **load_kwargs)
    if strategy is not None and getattr(strategy, "registry", None) is not None:
        strategy.registry.refresh()
    iteration = None
    if isinstance(result, tuple) and result and isinstance(result[0], numbers.Integral):
        iteration = int(result[0])
    load = getattr(args, "load", None)
    tiers.append(
        (
            "durable",
            f"Megatron's load_checkpoint (--load {load}) returned iteration " f"{iteration}",
        )
    )
    detail = (
        f"restored from Megatron's checkpoint (--load {load}, durable tier) at iteration "
        f"{iteration}"
        + (
            ""
            if strategy is None
            else f", through the {_STRATEGY_LABELS[name]} strategy built before the load"
        )
        + "; in-memory recovery from peer replicas does not run inside Megatron-LM's loop"
    )
    _state.last_restore = RestoreReport("megatron_checkpoint", iteration, detail, tuple(tiers))
    logger.info("MoEvement: %s", detail)
    return result


def wrap_pretrain(pretrain: Callable[..., Any]) -> Callable[..., Any]:
    """Megatron-LM's ``pretrain`` under MoEvement's restart engine: in an elastic session (the
    local launcher's or the SLURM agents' ranks) a failed collective makes ``pretrain()`` run
    again in the next process-group generation and recover in memory
    (:mod:`megatron_moevement.megatron.inloop`); otherwise ``pretrain`` itself runs."""

    @functools.wraps(pretrain)
    def pretrain_with_in_memory_recovery(*args: Any, **kwargs: Any) -> Any:
        return inloop.run_pretrain(
            lambda: pretrain(*args, **kwargs),
            take_strategy=_take_strategy,
            fatal=(MoEvementArgsError, MoEvementIntegrationError),
        )

    return pretrain_with_in_memory_recovery


def recover_after_restart(args: Any, strategy: Any, opt_param_scheduler: Any) -> None:
    """Phase A of an in-memory recovery, once ``pretrain()`` rebuilt the model, optimizer and
    strategy (no-op outside an elastic session or without a strategy): plans, fetches, restores
    the ranks outside the scope and sets Megatron's counters to where each rank resumes. At the
    job's start it records that start (counters, initial weights)."""
    session = inloop.current_session()
    if session is None or strategy is None:
        return
    if not hasattr(strategy, "rollback_and_replay"):
        raise MoEvementIntegrationError(
            f"--ckpt-strategy {requested_strategy(args)} cannot recover in memory inside "
            "Megatron-LM's loop (only moevement can). Fix: use --ckpt-strategy moevement, or "
            "launch without spares/elastic agent."
        )
    session.begin(args, strategy, opt_param_scheduler)


def replay_after_restart(
    iteration: int,
    forward_step_func: Callable[..., Any],
    train_data_iterator: Any,
    model: Any,
    optimizer: Any,
    opt_param_scheduler: Any,
    forward_backward_func: Callable[..., Any],
) -> Tuple[int, bool]:
    """Phase B of an in-memory recovery, from ``train()`` before its loop: the ranks in scope
    replay to the committed iteration, every rank meets the others.

    Returns:
        ``(iteration count train() continues from, whether it resumes after a recovery)``:
        ``(iteration, False)`` when nothing is pending. After a recovery ``train()`` must not
        treat its first iteration as the run's first (Megatron logs that one without resetting
        its accumulators), so that its log lines continue the fault-free run's.
    """
    session = inloop.current_session()
    if session is None or session.replay is None:
        return iteration, False
    from megatron.training import get_args

    args = get_args()
    step = inloop.megatron_iteration(
        args,
        forward_step_func,
        train_data_iterator,
        model if isinstance(model, list) else [model],
        optimizer,
        opt_param_scheduler,
        forward_backward_func,
    )
    return session.finish_replay(iteration, args, step), True


def forget_strategy() -> None:
    """Drops the module's reference to the active strategy (the restart engine keeps its own)."""
    _state.active = None
    _state.built_for = None


def _take_strategy() -> Any:
    """The active strategy, which the module forgets (the restart engine takes it over)."""
    strategy = _state.active
    forget_strategy()
    return strategy


def shutdown(strategy: Any) -> None:
    """Flushes pending snapshot copies and replication, then releases the strategy (no-op for
    ``None``)."""
    if strategy is None:
        return
    try:
        strategy.shutdown()
    finally:
        if _state.active is strategy:
            _state.active = None
            _state.built_for = None


def strategy_from(checkpointing_context: Any) -> Any:
    """The strategy stored in Megatron's ``checkpointing_context`` (``None`` when there is none,
    or when the context itself is ``None``)."""
    if not isinstance(checkpointing_context, dict):
        return None
    return checkpointing_context.get(CONTEXT_KEY)


# --------------------------------------------------------------------------------- inspection


def active_strategy() -> Any:
    """The strategy built by the last :func:`maybe_build_strategy` in this process, if live."""
    return _state.active


def last_restore() -> Optional[RestoreReport]:
    """How the last :func:`recover_or_load` with MoEvement enabled restored the state."""
    return _state.last_restore


def _reset_state_for_tests() -> None:
    """Forgets the module state (active strategy, last restore, warnings)."""
    global _state
    _state = _GlueState()
