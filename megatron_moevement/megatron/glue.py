"""The functions that the Megatron-LM patch (``patches/``) calls.

Each hunk of the patch is one or two lines that call into this module, so the integration logic
lives (and is tested) here rather than in Megatron-LM's files. The call sites, for
Megatron-LM ``core_v0.16.1``:

* ``pretrain_gpt.py``: ``extra_args_provider=extra_args_provider(<ModelOpt's or None>)``;
* ``setup_model_and_optimizer()``: ``recover_or_load(args, load_checkpoint, model, ...)`` in
  place of ``load_checkpoint(model, ...)``;
* ``pretrain()``, once model and optimizer are built:
  ``checkpointing_context["moevement"] = maybe_build_strategy(args, model, optimizer)`` and
  ``install_p2p_logging(checkpointing_context["moevement"])``;
* ``train()``, after each ``train_step()``:
  ``after_optimizer_step(strategy_from(checkpointing_context), iteration)``;
* ``train()``, after the loop: ``shutdown(strategy_from(checkpointing_context))``.

The strategy travels in Megatron's ``checkpointing_context`` dict (key ``"moevement"``), which is
already passed from ``pretrain()`` to ``train()``; no Megatron signature changes.

``megatron/training/training.py`` is shared by every Megatron-LM pretrain script, most of which
do not register :func:`~megatron_moevement.megatron.args.add_moevement_args`. Every function here
therefore treats arguments without ``--ckpt-strategy`` as ``--ckpt-strategy default``: MoEvement
off, Megatron unchanged.

What is not implemented yet (and says so at runtime rather than failing silently):

* **Upstream logging** (activations/gradients at pipeline-stage boundaries):
  :func:`install_p2p_logging` installs nothing and returns ``False`` unless the strategy object
  offers ``install_p2p_logging()`` (it will once upstream logging lands).
* **In-memory recovery**: :func:`recover_or_load` always restores through Megatron's own
  ``load_checkpoint`` (the durable tier) and records that in :func:`last_restore`; localized
  rollback from peers' host memory after a failure lands with the recovery issue.
"""

from __future__ import annotations

import argparse
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

from megatron_moevement.config import MoEvementConfig
from megatron_moevement.logging_utils import get_logger
from megatron_moevement.megatron.args import (
    add_moevement_args,
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
    "install_p2p_logging",
    "last_restore",
    "maybe_build_strategy",
    "moevement_requested",
    "recover_or_load",
    "shutdown",
    "strategy_from",
    "unwrap_gpt_model",
]

logger = get_logger(__name__)

CONTEXT_KEY = "moevement"
"""Key of the strategy in Megatron-LM's ``checkpointing_context`` dict."""

_MAX_WRAPPER_DEPTH = 16

ArgsProvider = Callable[[argparse.ArgumentParser], argparse.ArgumentParser]
StrategyFactory = Callable[[Any, Any, MoEvementConfig], Any]


class MoEvementIntegrationError(RuntimeError):
    """The Megatron-LM job cannot run with ``--ckpt-strategy moevement`` as configured; the
    message says what to change."""


@dataclass(frozen=True)
class RestoreReport:
    """Where the training state of this process came from at startup.

    Attributes:
        source: ``"megatron_checkpoint"`` (Megatron's ``load_checkpoint`` from ``--load``, the
            durable tier). In-memory sources (peer replicas) will be added with recovery.
        iteration: The iteration the load returned, if it returned one.
        detail: A human-readable explanation, also logged.
    """

    source: str
    iteration: Optional[int]
    detail: str


@dataclass
class _GlueState:
    active: Any = None
    last_restore: Optional[RestoreReport] = None
    warned_p2p: bool = False


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


def moevement_requested(args: Any) -> bool:
    """True for ``--ckpt-strategy moevement``; False for ``default`` or when the arguments were
    parsed without our provider (another pretrain script sharing ``training.py``)."""
    return getattr(args, "ckpt_strategy", "default") == "moevement"


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
    """Rejects Megatron-LM options that the strategy does not handle, naming the option."""
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
            "--ckpt-strategy moevement does not support: "
            + "; ".join(unsupported)
            + ". Fix: drop those options or use --ckpt-strategy default."
        )


def _build_strategy(gpt_model: Any, optimizer: Any, config: MoEvementConfig) -> Any:
    from megatron_moevement.strategy import MoEvementStrategy

    return MoEvementStrategy(gpt_model, optimizer, config)


def maybe_build_strategy(
    args: Any,
    model: Any,
    optimizer: Any,
    *,
    strategy_factory: Optional[StrategyFactory] = None,
) -> Any:
    """Builds the :class:`~megatron_moevement.strategy.MoEvementStrategy` when requested.

    Call it on every rank after Megatron's ``setup_model_and_optimizer()`` (so that a checkpoint
    loaded from ``--load`` is already in the model and optimizer; the strategy holds references
    to their tensors).

    Args:
        args: Megatron's parsed arguments (``get_args()``).
        model: Megatron's model chunk list (or a single wrapped model).
        optimizer: Megatron's optimizer for that model.
        strategy_factory: ``f(gpt_model, optimizer, config) -> strategy``; default builds a
            ``MoEvementStrategy`` (tests pass a fake).

    Returns:
        The strategy, or ``None`` with ``--ckpt-strategy default`` (or arguments parsed without
        our provider) and when there is no optimizer (``--skip-train``).

    Raises:
        MoEvementArgsError: Invalid ``--moevement-*`` values (the message names the flag).
        MoEvementIntegrationError: Unsupported Megatron-LM options or model layout.
    """
    if not moevement_requested(args):
        return None
    config = moevement_config_from_args(args)
    if optimizer is None:
        logger.warning(
            "--ckpt-strategy moevement has nothing to checkpoint without an optimizer "
            "(--skip-train); MoEvement stays off"
        )
        return None
    _check_supported(args)
    gpt_model = unwrap_gpt_model(model)
    if _state.active is not None:
        logger.warning(
            "a MoEvement strategy from an earlier pretrain() call in this process is replaced "
            "(in-process restart); its in-memory checkpoints are discarded"
        )
        _state.active = None
    if config.durable_dir is not None:
        logger.warning(
            "--moevement-durable-dir is set, but MoEvementStrategy does not write the durable tier "
            "yet; under Megatron-LM the durable tier is Megatron's own --save / --save-interval"
        )
    spares = spare_hosts_from_args(args)
    if spares:
        logger.info(
            "%d spare node(s) reserved: %s (automatic spare join is not implemented yet)",
            len(spares),
            ",".join(spares),
        )
    factory = strategy_factory or _build_strategy
    strategy = factory(gpt_model, optimizer, config)
    _state.active = strategy
    logger.info("MoEvement sparse checkpointing enabled: %s", config.to_dict())
    return strategy


def install_p2p_logging(strategy: Any) -> bool:
    """Installs upstream logging of pipeline p2p traffic, where it is available.

    Upstream logging (paper §3.4) is not implemented yet. Until it is, this installs nothing
    and returns ``False`` (with one warning when ``--moevement-upstream-logging`` is on, the
    default). Once the strategy object offers ``install_p2p_logging()``, this calls it, so the
    Megatron-LM patch does not need to change.

    Args:
        strategy: The strategy from :func:`maybe_build_strategy`, or ``None``.

    Returns:
        True if a p2p logging hook was installed.
    """
    if strategy is None or not strategy.config.upstream_logging:
        return False
    install = getattr(strategy, "install_p2p_logging", None)
    if callable(install):
        install()
        return True
    if not _state.warned_p2p:
        _state.warned_p2p = True
        logger.warning(
            "upstream logging is not implemented yet: no p2p hook installed, so a failure cannot "
            "be recovered by rolling back only the failed stage (it lands with the recovery "
            "work). Pass --no-moevement-upstream-logging to silence this warning."
        )
    return False


def after_optimizer_step(strategy: Any, iteration: int) -> None:
    """Captures this iteration's sparse-checkpoint slot (no-op without a strategy).

    Call it once per training iteration, after ``train_step`` returned (its optimizer step has
    run), with Megatron's 0-based ``iteration`` counter *before* it is incremented, i.e. the
    number of iterations completed before this one.

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
    strategy.after_optimizer_step(int(iteration))


def recover_or_load(args: Any, load_fn: Callable[..., Any], *load_args: Any, **load_kwargs: Any):
    """Restores the training state at startup; returns what ``load_fn`` returns.

    With MoEvement, the state of a restarted process should come from the newest persisted
    sparse checkpoint in peers' host memory, falling back to Megatron's checkpoint (the durable
    tier). In-memory recovery is **not implemented yet**, so this always calls ``load_fn``
    (Megatron's ``load_checkpoint``) and records that in :func:`last_restore`. A strategy left
    over from an earlier ``pretrain()`` call in this process (in-process restart) is discarded
    with a warning.

    Args:
        args: Megatron's parsed arguments.
        load_fn: Megatron's ``load_checkpoint``.
        load_args: Positional arguments of ``load_fn``.
        load_kwargs: Keyword arguments of ``load_fn``.

    Returns:
        ``load_fn(*load_args, **load_kwargs)``, unchanged.
    """
    if not moevement_requested(args):
        return load_fn(*load_args, **load_kwargs)
    reason = "in-memory recovery from peer replicas is not implemented yet"
    if _state.active is not None:
        logger.warning(
            "found a MoEvement strategy from before an in-process restart; %s, so its sparse "
            "checkpoints are discarded",
            reason,
        )
        _state.active = None
    result = load_fn(*load_args, **load_kwargs)
    iteration = None
    if isinstance(result, tuple) and result and isinstance(result[0], numbers.Integral):
        iteration = int(result[0])
    detail = (
        f"restored from Megatron's checkpoint (--load {getattr(args, 'load', None)}, durable "
        f"tier) at iteration {iteration}: {reason}"
    )
    _state.last_restore = RestoreReport("megatron_checkpoint", iteration, detail)
    logger.info("MoEvement: %s", detail)
    return result


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
