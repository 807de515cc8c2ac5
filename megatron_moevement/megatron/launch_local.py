"""Local (single-node) launcher for Megatron-LM pretrain scripts with MoEvement and spares.

The single-node counterpart of the SLURM templates: starts ``--nprocs`` ranks plus ``--spares``
spare processes of a script with :class:`~megatron_moevement.harness.launcher.LocalJob` (env://
rendezvous on 127.0.0.1, one log file per process, every process killed by pid when the launcher
exits), and adds the same MoEvement options the templates pass::

    python -m megatron_moevement.megatron.launch_local --nprocs 8 --spares 1 \\
        --log-dir /tmp/run1 --host-memory-budget 64GiB -- \\
        /opt/Megatron-LM/pretrain_gpt.py --num-layers 4 --num-experts 8 ...

``--ckpt-strategy gemini`` or ``moc`` runs a baseline instead of MoEvement (its
``--baseline-*`` policy options go with the script arguments); they run with a one-slot window,
so ``--window-size`` is MoEvement's only.

(``scripts/launch_local.sh`` wraps this.) Each rank gets ``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``. Spare processes get
``MOEVEMENT_SPARE=1`` and no rank.

With ``--ckpt-strategy moevement`` the job runs under an
:class:`~megatron_moevement.launch.local.ElasticAgent`: the launcher hosts the job's store and
coordinator, every rank joins it through :func:`megatron_moevement.megatron.inloop.start_session`,
and when a rank dies the survivors keep running: a spare takes its rank and the job recovers in
memory inside Megatron-LM's loop (:mod:`megatron_moevement.megatron.inloop`). A used spare is
replaced by a new spare process (``--no-refill-spares`` turns that off). Each rank's recovery
reports go to ``<log-dir>/recovery_rank<R>.jsonl``. The baselines and ``--no-moevement`` run
as a plain job, whose first failure ends it.

Each rank runs the script through :mod:`megatron_moevement.megatron.pretrain`, so on a machine
without CUDA Megatron-LM's training loop runs on CPU with gloo (``--distributed-backend gloo``,
``--transformer-impl local``; see ``docs/megatron_integration.md``).
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from megatron_moevement.argtypes import NON_NEGATIVE_INT, POSITIVE_FLOAT, POSITIVE_INT
from megatron_moevement.config import MoEvementConfig, MoEvementConfigError
from megatron_moevement.constants import CKPT_STRATEGIES, ELASTIC_ENV, REPORT_DIR_ENV
from megatron_moevement.launch.local import ElasticAgent, LocalJob, exit_after_success
from megatron_moevement.logging_utils import configure_logging, get_logger
from megatron_moevement.megatron.args import parse_byte_size
from megatron_moevement.megatron.pretrain import TREE_ENV, exec_in_main, prepare
from megatron_moevement.recovery.coordinator import JobFailed, JobTimeout
from megatron_moevement.recovery.warm_spare import is_spare_process

__all__ = ["RANK_COMMAND", "build_job", "main", "moevement_flags", "run_job", "run_rank"]

MODULE = "megatron_moevement.megatron.launch_local"
"""This module's import name (``__name__`` is ``__main__`` when it runs with ``-m``)."""

logger = get_logger(MODULE)

DEFAULT_TIMEOUT_S = 7 * 24 * 3600.0

RANK_COMMAND = "_rank"
"""First argument of the per-process entry point (``python -m ... _rank SCRIPT ARGS...``)."""


_OPTION_OF_FIELD = {
    "host_memory_budget_bytes": "--host-memory-budget",
    "replication_factor": "--replication-factor",
    "ranks_per_node": "--nprocs",
    "window_size": "--window-size",
}


def moevement_flags(
    nprocs: int,
    window_size: Optional[str] = None,
    replication_factor: int = 1,
    host_memory_budget: str = "none",
    ckpt_strategy: str = "moevement",
) -> List[str]:
    """The ``--ckpt-strategy <name> --moevement-*`` flags for a local job of ``nprocs`` ranks.

    Values are checked with :class:`MoEvementConfig`'s rules, and the replication factor
    against the number of ranks.

    Args:
        nprocs: Training ranks (also ``--moevement-ranks-per-node``: one node).
        window_size: ``--moevement-window-size`` (``None``: ``auto``); MoEvement only.
        replication_factor: ``--moevement-replication-factor``.
        host_memory_budget: ``--moevement-host-memory-budget-bytes`` (bytes, ``64GiB``, ``none``).
        ckpt_strategy: ``moevement``, ``gemini`` or ``moc``.

    Raises:
        ValueError: An invalid value or combination; the message names the launcher option.
    """
    if ckpt_strategy not in CKPT_STRATEGIES:
        raise ValueError(
            f"--ckpt-strategy={ckpt_strategy!r} is invalid. Fix: use one of "
            f"{', '.join(CKPT_STRATEGIES)} (or --no-moevement for Megatron's own "
            "checkpointing only)."
        )
    if ckpt_strategy != "moevement" and window_size is not None:
        raise ValueError(
            f"--window-size has no effect with --ckpt-strategy {ckpt_strategy}, which always "
            "runs with a one-slot window. Fix: drop --window-size, or use --ckpt-strategy "
            "moevement."
        )
    window = "auto" if window_size is None else str(window_size).strip().lower()
    budget = str(host_memory_budget).strip().lower()
    try:
        window_value = window if window == "auto" else int(window)
    except ValueError:
        raise ValueError(
            f"--window-size={window_size!r} is invalid. Fix: use auto or an integer >= 1."
        ) from None
    budget_bytes = None
    if budget != "none":
        try:
            budget_bytes = int(parse_byte_size(budget))
        except ValueError as exc:
            raise ValueError(f"--host-memory-budget is invalid: {exc}.") from None
    try:
        MoEvementConfig(
            window_size=window_value,
            replication_factor=replication_factor,
            ranks_per_node=nprocs,
            host_memory_budget_bytes=budget_bytes,
        )
    except MoEvementConfigError as exc:
        message = str(exc)
        for field, option in _OPTION_OF_FIELD.items():
            message = message.replace(f"MoEvementConfig.{field}", option)
            message = message.replace(field, option)
        raise ValueError(f"invalid launcher option: {message}") from None
    if replication_factor > nprocs - 1:
        raise ValueError(
            f"--replication-factor={replication_factor} needs more ranks than --nprocs={nprocs} "
            f"(each replica goes to another rank). Fix: use at most {nprocs - 1}."
        )
    window_flags = (
        [] if ckpt_strategy != "moevement" else ["--moevement-window-size", str(window_value)]
    )
    return [
        "--ckpt-strategy",
        ckpt_strategy,
        *window_flags,
        "--moevement-replication-factor",
        str(replication_factor),
        "--moevement-ranks-per-node",
        str(nprocs),
        "--moevement-host-memory-budget-bytes",
        "none" if budget_bytes is None else str(budget_bytes),
    ]


def build_job(
    script: str,
    script_args: Sequence[str],
    nprocs: int,
    spares: int = 0,
    log_dir: Optional[Path] = None,
    moevement: bool = True,
    window_size: Optional[str] = None,
    replication_factor: int = 1,
    host_memory_budget: str = "none",
    ckpt_strategy: str = "moevement",
) -> LocalJob:
    """An unstarted :class:`LocalJob` running ``script`` on ``nprocs`` ranks plus ``spares``.

    Args:
        script: Path of the training script (e.g. Megatron-LM's ``pretrain_gpt.py``).
        script_args: Its arguments.
        nprocs: Training ranks.
        spares: Spare processes.
        log_dir: Folder for ``proc<i>.log`` (``None``: inherit the launcher's streams).
        moevement: Append the ``--ckpt-strategy`` and MoEvement flags (:func:`moevement_flags`);
            with ``False`` the script arguments are passed unchanged.
        window_size: ``--moevement-window-size`` (``None``: ``auto``); MoEvement only.
        replication_factor: ``--moevement-replication-factor``.
        host_memory_budget: ``--moevement-host-memory-budget-bytes`` (bytes, ``64GiB``, ``none``).
        ckpt_strategy: ``--ckpt-strategy``: ``moevement``, or the ``gemini`` / ``moc`` baseline
            (whose ``--baseline-*`` options go in ``script_args``).

    Raises:
        ValueError: ``nprocs`` < 1, ``spares`` < 0, a missing script or an invalid MoEvement
            value (the message names the option).
    """
    if not isinstance(nprocs, int) or nprocs < 1:
        raise ValueError(f"--nprocs={nprocs!r} is invalid. Fix: pass an integer >= 1.")
    if not isinstance(spares, int) or spares < 0:
        raise ValueError(f"--spares={spares!r} is invalid. Fix: pass an integer >= 0.")
    path = Path(script)
    if not path.is_file():
        raise ValueError(
            f"training script {script!r} does not exist. Fix: pass the path of e.g. "
            "Megatron-LM's pretrain_gpt.py (patched with scripts/apply_megatron_patch.sh)."
        )
    args = list(script_args)
    if moevement:
        if "--ckpt-strategy" in args:
            raise ValueError(
                "the script arguments already contain --ckpt-strategy. Fix: drop it, or pass "
                "--no-moevement to the launcher to forward the script arguments unchanged "
                "(the launcher's own --ckpt-strategy picks moevement, gemini or moc)."
            )
        args += moevement_flags(
            nprocs, window_size, replication_factor, host_memory_budget, ckpt_strategy
        )
    return LocalJob(
        nprocs=nprocs + spares,
        module=MODULE,
        args=[RANK_COMMAND, str(path.resolve()), *args],
        spares=spares,
        log_dir=log_dir,
        env={"LOCAL_WORLD_SIZE": str(nprocs)},
    )


def run_rank(script: str, script_args: Sequence[str]) -> int:
    """Runs ``script`` as ``__main__`` in this process, as one rank of a local job.

    Sets ``LOCAL_RANK`` from ``RANK`` (one node) when the launcher did not, puts the script's
    folder first on ``sys.path`` (Megatron-LM's scripts import their neighbours) and restores
    ``sys.argv``/``sys.path`` afterwards. Under an elastic agent (``MOEVEMENT_ELASTIC=1``) the
    rank first joins the job's elastic session (a spare waits there until it takes a failed
    rank, or leaves with status 0 when the job ends without it). Without one, a spare process
    has nothing to take over: it logs that and returns 0.

    Returns:
        The process exit status (0, or the script's ``SystemExit`` code).
    """
    elastic = os.environ.get(ELASTIC_ENV) == "1"
    if is_spare_process() and not elastic:
        logger.warning(
            "spare process %d: this job has no elastic agent (it runs a baseline or "
            "--no-moevement), so no spare is used",
            os.getpid(),
        )
        return 0
    if not elastic and "RANK" not in os.environ:
        raise RuntimeError(
            "RANK is not set. Fix: start ranks through "
            "python -m megatron_moevement.megatron.launch_local (or torchrun/srun)."
        )
    saved_argv, saved_path = list(sys.argv), list(sys.path)
    try:
        # The script's tree first on sys.path and, for a Megatron-LM tree without CUDA, the CPU
        # redirections of runtime/cpu_compat.py (nothing is patched on a GPU), before anything
        # imports megatron (the elastic session does). Spawned children re-import this module,
        # which re-applies them (megatron/pretrain.py).
        prepare(Path(script).resolve().parent)
        if elastic and is_spare_process():
            # While it has nothing to do: compile what the first pretrain() of the rank it takes
            # would compile on the recovery's critical path (spare_warm_up.py).
            from megatron_moevement.megatron.spare_warm_up import warm_up_megatron_spare

            warm_up_megatron_spare(script, script_args)
        if elastic:
            from megatron_moevement.megatron.inloop import start_session

            start_session()  # a spare returns from here with the rank it takes
        os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
        sys.argv = [script, *script_args]
        main_spec = getattr(sys.modules["__main__"], "__spec__", None)
        if getattr(main_spec, "name", None) == MODULE:
            # The rank process (python -m this module): spawned children (torch_dist saves)
            # import this module by name and get the redirections (see the end of the module).
            exec_in_main(script)
        else:  # called from another program (tests): leave its __main__ alone
            runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    return 0


def run_job(
    job: LocalJob, timeout: float, elastic: bool = True, refill_spares: bool = True
) -> List[dict]:
    """Runs ``job`` (from :func:`build_job`) to the end; every process it started is killed by
    pid when this returns or raises.

    Args:
        job: The unstarted job.
        timeout: Seconds before every process is killed (:class:`JobTimeout`).
        elastic: Run it under an :class:`ElasticAgent` (the job store and coordinator that let
            ranks recover in memory, ``--ckpt-strategy moevement``); otherwise a rank's failure
            fails the job.
        refill_spares: Start a new spare process whenever one takes over a rank (elastic only).

    Returns:
        The coordinator's record of every failed rank (empty without failures or elasticity).

    Raises:
        JobFailed: A process failed and the job could not go on.
        JobTimeout: ``timeout`` passed.
    """
    if not elastic:
        with job:
            job.check(timeout=timeout)
        return []
    if job.log_dir is not None:
        job.env = dict(job.env, **{REPORT_DIR_ENV: str(Path(job.log_dir).resolve())})
    agent = ElasticAgent(job, refill_spares=refill_spares)
    try:
        agent.start()
        agent.run(timeout=timeout)
    finally:
        job.terminate()  # every process it started, by pid (spares left waiting too)
    return list(agent.failures)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_moevement.megatron.launch_local",
        description="Run a Megatron-LM pretrain script on local processes with MoEvement and "
        "spare processes.",
    )
    parser.add_argument("--nprocs", type=POSITIVE_INT, required=True, help="training ranks")
    parser.add_argument(
        "--spares", type=NON_NEGATIVE_INT, default=0, help="spare processes (default: 0)"
    )
    parser.add_argument("--log-dir", type=Path, default=None, help="per-process logs")
    parser.add_argument(
        "--timeout",
        type=POSITIVE_FLOAT,
        default=DEFAULT_TIMEOUT_S,
        help="seconds before every process is killed (default: 7 days)",
    )
    parser.add_argument(
        "--ckpt-strategy",
        choices=CKPT_STRATEGIES,
        default="moevement",
        help="in-memory strategy passed to the script: moevement (default), or the gemini / moc "
        "baseline (put its --baseline-* options with the script arguments)",
    )
    parser.add_argument(
        "--window-size", default=None, help="--moevement-window-size (moevement only; default auto)"
    )
    parser.add_argument("--replication-factor", type=NON_NEGATIVE_INT, default=1)
    parser.add_argument("--host-memory-budget", default="none", help="e.g. 64GiB, or none")
    parser.add_argument(
        "--no-refill-spares",
        dest="refill_spares",
        action="store_false",
        help="do not start a new spare process when one takes over a failed rank",
    )
    parser.add_argument(
        "--no-moevement",
        dest="moevement",
        action="store_false",
        help="do not add --ckpt-strategy and the --moevement-* flags",
    )
    parser.add_argument("script", help="training script, e.g. Megatron-LM's pretrain_gpt.py")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="its arguments")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m megatron_moevement.megatron.launch_local``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == RANK_COMMAND:
        if len(argv) < 2:
            raise SystemExit(f"usage: {RANK_COMMAND} SCRIPT [ARGS...]")
        if is_spare_process():
            configure_logging()  # a rank's training script configures logging itself
        code = run_rank(argv[1], argv[2:])
        if code == 0 and os.environ.get(ELASTIC_ENV) == "1":
            # The coordinator reads every exit status: no teardown abort may turn 0 into SIGABRT.
            exit_after_success()
        return code
    configure_logging()
    parser = _parser()
    args = parser.parse_args(argv)
    script_args = args.script_args[1:] if args.script_args[:1] == ["--"] else args.script_args
    try:
        job = build_job(
            args.script,
            script_args,
            args.nprocs,
            args.spares,
            args.log_dir,
            args.moevement,
            args.window_size,
            args.replication_factor,
            args.host_memory_budget,
            args.ckpt_strategy,
        )
    except ValueError as exc:
        parser.error(str(exc))
    logger.info(
        "starting %d rank(s) + %d spare(s) of %s%s",
        args.nprocs,
        args.spares,
        args.script,
        f", logs in {args.log_dir}" if args.log_dir else "",
    )
    try:
        failures = run_job(
            job,
            timeout=args.timeout,
            elastic=args.moevement and args.ckpt_strategy == "moevement",
            refill_spares=args.refill_spares,
        )
    except (JobFailed, JobTimeout) as exc:
        logger.error("%s", exc)
        return 1
    for failure in failures:
        logger.warning(
            "rank %d (pid %s) failed in generation %d; spare process %d took it%s",
            failure["rank"],
            failure["pid"],
            failure["generation"],
            failure["spare"],
            f", spare process {failure['refill']} started" if "refill" in failure else "",
        )
    return 0


if os.environ.get(TREE_ENV) and __name__ != "__main__":
    # A child a rank's script started with the spawn method (the torch_dist save does) imports
    # this module again as its __main__: the CPU redirections must be there too.
    prepare(os.environ[TREE_ENV])

if __name__ == "__main__":
    sys.exit(main())
