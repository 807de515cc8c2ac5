"""Renders the SLURM sbatch templates in ``scripts/slurm/`` for multi-node MoEvement runs.

A template is a bash script with ``{{name}}`` placeholders. :class:`SbatchValues` holds and
validates the values (node counts, paths, MoEvement options); :func:`render_sbatch` fills a
template and refuses templates with unknown placeholders and values that are missing or unknown,
so a rendered script never contains a ``{{...}}`` left over or a value that would break bash.

Command line::

    python -m megatron_moevement.megatron.slurm render \\
        scripts/slurm/moevement_pretrain.sbatch.template \\
        --nodes 4 --spare-nodes 1 --gpus-per-node 8 \\
        --megatron-dir /opt/Megatron-LM --data-path /data/corpus_text_document \\
        --log-dir /shared/logs --host-memory-budget 256GiB --replication-factor 1 \\
        --extra-args "--num-layers 24 --num-experts 64 ..." -o job.sbatch
    python -m megatron_moevement.megatron.slurm placeholders TEMPLATE

Placeholders computed from the values (not set directly): ``total_nodes`` (nodes plus spare
nodes), ``data_args`` (``--mock-data`` or ``--data-path ...``), ``sbatch_directives``
(``#SBATCH --partition/--account`` lines, or a comment), ``worker_command`` (the worker's command
line, from ``program``), ``agent_args`` (options of the elastic task agent,
:mod:`megatron_moevement.megatron.elastic`) and ``window_args`` (``--moevement-window-size W``
with ``ckpt_strategy`` ``moevement``; empty for the ``gemini`` / ``moc`` baselines, which run
with a one-slot window and take their ``--baseline-*`` options from ``extra_args``).

The templates run one elastic task agent per GPU on every node, spare nodes included: spare
tasks start their worker as a spare that waits in the rendezvous and takes over a failed rank
(see :mod:`megatron_moevement.megatron.elastic`).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, NoReturn, Optional, Sequence, Set, Union

from megatron_moevement.config import MoEvementConfig, MoEvementConfigError
from megatron_moevement.constants import CKPT_STRATEGIES
from megatron_moevement.megatron.args import parse_byte_size

__all__ = [
    "TEMPLATE_DIR",
    "SbatchTemplateError",
    "SbatchValues",
    "available_templates",
    "main",
    "render_sbatch",
    "template_placeholders",
]

TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "scripts" / "slurm"
"""Where the templates of a source checkout live."""

PLACEHOLDER_RE = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")

# Characters that need no quoting in bash and in #SBATCH lines (no spaces, quotes, $, globs).
_SAFE_RE = re.compile(r"^[A-Za-z0-9_./+:=@%,-]+$")
_JOB_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_TIME_RE = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$")
_DERIVED = (
    "total_nodes",
    "data_args",
    "sbatch_directives",
    "worker_command",
    "agent_args",
    "window_args",
)
_MODULE_RE = re.compile(r"^module:([A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*)$")
PRETRAIN_GPT = "pretrain_gpt"
"""``program`` value: Megatron-LM's ``pretrain_gpt.py`` (patched), the default."""


class SbatchTemplateError(ValueError):
    """A template or its values are invalid; the message names the placeholder/value and fix."""


def _fail(name: str, value: object, problem: str, fix: str) -> NoReturn:
    raise SbatchTemplateError(f"sbatch value {name}={value!r} is invalid: {problem}. Fix: {fix}.")


def _check_int(name: str, value: object, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        _fail(name, value, f"must be an integer >= {minimum}", f"pass an integer >= {minimum}")
    return int(value)  # type: ignore[arg-type]


def _check_safe(name: str, value: object, what: str) -> str:
    if not isinstance(value, str) or not _SAFE_RE.match(value):
        _fail(
            name,
            value,
            f"must be a non-empty {what} without spaces, quotes, '$', '*' or other characters "
            "that bash or #SBATCH lines would interpret",
            f"use a {what} made of letters, digits and _ . / + : = @ % , -",
        )
    return value  # type: ignore[return-value]


@dataclass
class SbatchValues:
    """Values for ``scripts/slurm/*.sbatch.template``; validated when built.

    Attributes:
        nodes: Training nodes (each runs one task per GPU).
        gpus_per_node: GPUs, hence ranks, per training node.
        megatron_dir: Megatron-LM checkout (core_v0.16.1, MoEvement patch applied).
        data_path: Megatron ``--data-path`` value(s) (whitespace-separated weights/prefixes), or
            ``mock`` for ``--mock-data``.
        log_dir: Shared directory for SLURM output and per-rank logs (``<log_dir>/<job id>/``).
        spare_nodes: Extra nodes reserved as spares (exported as ``MOEVEMENT_SPARES``).
        ranks_per_node: ``--moevement-ranks-per-node``; must equal ``gpus_per_node`` (one task per
            GPU); ``None`` takes ``gpus_per_node``.
        host_memory_budget: ``--moevement-host-memory-budget-bytes`` per rank: bytes or a size
            such as ``256GiB``; ``none`` disables the check.
        replication_factor: ``--moevement-replication-factor``.
        window_size: ``--moevement-window-size``: ``auto`` or an integer >= 1 (``None``:
            ``auto``). MoEvement only: the baselines run with a one-slot window.
        ckpt_strategy: ``--ckpt-strategy``: ``moevement`` (default), or the ``gemini`` / ``moc``
            baseline (``--baseline-*`` options go in ``extra_args``).
        master_port: TCP port of the rendezvous store on the first training node.
        job_name: SLURM job name.
        time_limit: SLURM ``--time`` (``[D-]HH[:MM[:SS]]``).
        partition: SLURM partition, if the cluster needs one.
        account: SLURM account, if the cluster needs one.
        python: Python interpreter on the nodes.
        extra_args: Further Megatron-LM arguments (model, parallelism, tokenizer, ``--save`` /
            ``--load``, ``--moevement-*`` overrides), as a shell-quoted string.
        program: The worker: ``pretrain_gpt`` (Megatron-LM's ``pretrain_gpt.py`` with the data,
            extra and MoEvement arguments; with ``moevement`` a spare task takes over a failed
            rank and the job recovers in memory inside Megatron-LM's loop; with a baseline,
            spare tasks stay reserved and a failure ends the job at once), or
            ``module:NAME`` (``python -m NAME <extra_args>``, a training loop built on
            :class:`~megatron_moevement.recovery.driver.RecoveryDriver`: spares take over failed ranks).
        job_timeout_s: Seconds after which the task agents' coordinator ends the job
            (``None``: 7 days; SLURM's ``time_limit`` applies anyway).
    """

    nodes: int
    gpus_per_node: int
    megatron_dir: str
    data_path: str
    log_dir: str
    spare_nodes: int = 0
    ranks_per_node: Optional[int] = None
    host_memory_budget: Union[str, int] = "none"
    replication_factor: int = 1
    window_size: Union[str, int, None] = None
    ckpt_strategy: str = "moevement"
    master_port: int = 29500
    job_name: str = "moevement-pretrain"
    time_limit: str = "04:00:00"
    partition: Optional[str] = None
    account: Optional[str] = None
    python: str = "python"
    extra_args: str = ""
    program: str = PRETRAIN_GPT
    job_timeout_s: Optional[int] = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Checks every value; raises :class:`SbatchTemplateError` naming the first bad one."""
        _check_int("nodes", self.nodes, 1)
        _check_int("spare_nodes", self.spare_nodes, 0)
        _check_int("gpus_per_node", self.gpus_per_node, 1)
        if self.ranks_per_node is None:
            self.ranks_per_node = self.gpus_per_node
        _check_int("ranks_per_node", self.ranks_per_node, 1)
        if self.ranks_per_node != self.gpus_per_node:
            _fail(
                "ranks_per_node",
                self.ranks_per_node,
                f"the templates run one task per GPU, so it must equal gpus_per_node "
                f"({self.gpus_per_node})",
                "leave ranks_per_node unset or set it to gpus_per_node",
            )
        _check_int("replication_factor", self.replication_factor, 0)
        if not isinstance(self.master_port, int) or not 1024 <= self.master_port <= 65535:
            _fail("master_port", self.master_port, "must be in 1024..65535", "pick a free port")
        if not isinstance(self.ckpt_strategy, str) or self.ckpt_strategy not in CKPT_STRATEGIES:
            _fail(
                "ckpt_strategy",
                self.ckpt_strategy,
                "unknown in-memory checkpointing strategy",
                f"use one of {', '.join(CKPT_STRATEGIES)}",
            )
        if self.ckpt_strategy != "moevement":
            if self.window_size is not None:
                _fail(
                    "window_size",
                    self.window_size,
                    f"ckpt_strategy {self.ckpt_strategy} always runs with a one-slot window",
                    "leave window_size unset, or use ckpt_strategy moevement",
                )
        elif self.window_size is None:
            self.window_size = "auto"
        if isinstance(self.window_size, str) and self.window_size.strip().lower() == "auto":
            self.window_size = "auto"
        elif isinstance(self.window_size, str) and self.window_size.strip().isdigit():
            self.window_size = int(self.window_size)
        budget = self.host_memory_budget
        budget_bytes: Optional[int] = None
        if isinstance(budget, str) and budget.strip().lower() == "none":
            self.host_memory_budget = "none"
        else:
            try:
                value = float(budget) if isinstance(budget, int) else parse_byte_size(str(budget))
            except ValueError as exc:
                _fail("host_memory_budget", budget, str(exc), "use e.g. 256GiB, or none")
            if value != int(value):
                _fail(
                    "host_memory_budget", budget, "not a whole number of bytes", "use e.g. 256GiB"
                )
            budget_bytes = int(value)
            self.host_memory_budget = str(budget_bytes)
        try:  # the same rules as the job itself will apply
            MoEvementConfig(
                window_size=1 if self.window_size is None else self.window_size,
                replication_factor=self.replication_factor,
                ranks_per_node=self.ranks_per_node,
                host_memory_budget_bytes=budget_bytes,
            )
        except MoEvementConfigError as exc:
            raise SbatchTemplateError(f"invalid sbatch value: {exc}") from None
        world_size = self.nodes * self.gpus_per_node
        if self.replication_factor > world_size - 1:
            _fail(
                "replication_factor",
                self.replication_factor,
                f"each replica goes to another rank, and the job has {world_size} rank(s)",
                f"use at most {world_size - 1} (peers on other nodes need nodes >= 2)",
            )
        _check_safe("megatron_dir", self.megatron_dir, "path")
        _check_safe("log_dir", self.log_dir, "path")
        _check_safe("python", self.python, "command or path")
        if not isinstance(self.data_path, str) or not self.data_path.split():
            _fail("data_path", self.data_path, "must not be empty", "pass a prefix, or mock")
        for token in self.data_path.split():
            _check_safe("data_path", token, "data path or weight")
        if not isinstance(self.job_name, str) or not _JOB_NAME_RE.match(self.job_name):
            _fail("job_name", self.job_name, "must be letters, digits, _ . -", "e.g. moe-run1")
        if not isinstance(self.time_limit, str) or not _TIME_RE.match(self.time_limit):
            _fail("time_limit", self.time_limit, "not a SLURM time", "use e.g. 04:00:00 or 2-00")
        for name in ("partition", "account"):
            value = getattr(self, name)
            if value is not None:
                _check_safe(name, value, "SLURM name")
        if not isinstance(self.program, str) or not (
            self.program == PRETRAIN_GPT or _MODULE_RE.match(self.program)
        ):
            _fail(
                "program",
                self.program,
                "unknown worker program",
                f"use {PRETRAIN_GPT} or module:<python.module> (e.g. module:my_pkg.train)",
            )
        if self.job_timeout_s is not None:
            _check_int("job_timeout_s", self.job_timeout_s, 1)
        if not isinstance(self.extra_args, str):
            _fail("extra_args", self.extra_args, "must be a string", "quote it as one argument")
        try:
            shlex.split(self.extra_args)
        except ValueError as exc:
            _fail("extra_args", self.extra_args, f"not valid shell words ({exc})", "balance quotes")

    # ------------------------------------------------------------------ placeholder values

    def placeholders(self) -> Dict[str, str]:
        """The text of every placeholder, set and derived."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        text = {k: "" if v is None else str(v) for k, v in values.items()}
        text["extra_args"] = " ".join(shlex.quote(w) for w in shlex.split(self.extra_args))
        text["total_nodes"] = str(self.nodes + self.spare_nodes)
        if self.data_path.strip() == "mock":
            text["data_args"] = "--mock-data"
        else:
            text["data_args"] = "--data-path " + " ".join(self.data_path.split())
        directives = [
            f"#SBATCH --{name}={getattr(self, name)}"
            for name in ("partition", "account")
            if getattr(self, name) is not None
        ]
        text["sbatch_directives"] = "\n".join(directives) or "# (no --partition/--account set)"
        text["job_timeout_s"] = "" if self.job_timeout_s is None else str(self.job_timeout_s)
        if self.window_size is None:  # a baseline: one-slot window, no option
            text["window_size"] = "1"
            text["window_args"] = ""
        else:
            text["window_args"] = f"--moevement-window-size {self.window_size}"
        agent = [] if self.job_timeout_s is None else [f"--timeout {self.job_timeout_s}"]
        if self.program == PRETRAIN_GPT and self.ckpt_strategy == "moevement":
            # Through the rank entry point: it joins the job's elastic session (a spare waits
            # there for a rank), so a failed rank is recovered in memory inside Megatron-LM's
            # loop (megatron_moevement/megatron/inloop.py).
            text["worker_command"] = (
                '"$PYTHON" -m megatron_moevement.megatron.launch_local _rank '
                '"$MEGATRON_DIR/pretrain_gpt.py" "${DATA_ARGS[@]}" "${EXTRA_ARGS[@]}" '
                '"${MOEVEMENT_ARGS[@]}"'
            )
            agent.insert(0, "--elastic")
        elif self.program == PRETRAIN_GPT:
            # A baseline rolls every rank back and cannot take over a rank mid-job: a failure
            # ends the job at once.
            text["worker_command"] = (
                '"$PYTHON" "$MEGATRON_DIR/pretrain_gpt.py" "${DATA_ARGS[@]}" "${EXTRA_ARGS[@]}" '
                '"${MOEVEMENT_ARGS[@]}"'
            )
            agent.insert(0, "--no-elastic")
        else:
            module = _MODULE_RE.match(self.program).group(1)
            text["worker_command"] = f'"$PYTHON" -m {module} "${{EXTRA_ARGS[@]}}"'
            agent.insert(0, "--elastic")
        text["agent_args"] = " ".join(agent)
        return text


def template_placeholders(template_path: Union[str, Path]) -> Set[str]:
    """The placeholder names used in a template."""
    return set(PLACEHOLDER_RE.findall(Path(template_path).read_text()))


def available_templates(directory: Union[str, Path] = TEMPLATE_DIR) -> List[Path]:
    """The ``*.sbatch.template`` files of ``directory``, sorted."""
    return sorted(Path(directory).glob("*.sbatch.template"))


def _value_fields() -> Dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(SbatchValues)}


def render_sbatch(template_path: Union[str, Path], **values: object) -> str:
    """Fills a template's ``{{name}}`` placeholders.

    Args:
        template_path: A ``.sbatch.template`` file.
        values: The :class:`SbatchValues` fields (required: ``nodes``, ``gpus_per_node``,
            ``megatron_dir``, ``data_path``, ``log_dir``).

    Returns:
        The rendered script.

    Raises:
        SbatchTemplateError: Unknown or missing values, invalid values, a template that uses a
            placeholder no value fills, or a missing template file.
    """
    path = Path(template_path)
    if not path.is_file():
        raise SbatchTemplateError(
            f"sbatch template {str(path)!r} does not exist. Fix: use one of "
            f"{[str(p) for p in available_templates()] or 'scripts/slurm/*.sbatch.template'}."
        )
    fields = _value_fields()
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise SbatchTemplateError(
            f"unknown sbatch value(s) {unknown}. Fix: use only {sorted(fields)}."
        )
    required = [
        n
        for n, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [n for n in required if n not in values]
    if missing:
        flags = ", ".join("--" + n.replace("_", "-") for n in missing)
        raise SbatchTemplateError(
            f"missing sbatch value(s) {missing}. Fix: pass them (on the command line: {flags})."
        )
    text = SbatchValues(**values).placeholders()  # type: ignore[arg-type]
    template = path.read_text()
    used = set(PLACEHOLDER_RE.findall(template))
    undefined = sorted(used - set(text))
    if undefined:
        raise SbatchTemplateError(
            f"template {str(path)!r} uses unknown placeholder(s) "
            f"{['{{' + u + '}}' for u in undefined]}. Fix: correct the template; known "
            f"placeholders are {sorted(text)}."
        )
    rendered = PLACEHOLDER_RE.sub(lambda m: text[m.group(1)], template)
    leftover = re.search(r"\{\{|\}\}", rendered)
    if leftover:
        line = rendered.count("\n", 0, leftover.start()) + 1
        raise SbatchTemplateError(
            f"template {str(path)!r} has a malformed placeholder on line {line}. Fix: use "
            "{{name}} with a letter or _ first."
        )
    return rendered


# --------------------------------------------------------------------------------- CLI


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_moevement.megatron.slurm",
        description="Render MoEvement SLURM sbatch templates.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    render = sub.add_parser("render", help="fill a template and write the sbatch script")
    render.add_argument("template", type=Path, help="a scripts/slurm/*.sbatch.template file")
    render.add_argument("-o", "--output", type=Path, help="output file (default: stdout)")
    for name, field in _value_fields().items():
        flag = "--" + name.replace("_", "-")
        required = field.default is dataclasses.MISSING
        kind = int if field.type in ("int", "Optional[int]") else str
        help_text = "required" if required else f"default: {field.default}"
        render.add_argument(
            flag, dest=name, type=kind, required=required, default=None, help=help_text
        )
    listing = sub.add_parser("placeholders", help="list the placeholders of a template")
    listing.add_argument("template", type=Path)
    sub.add_parser("list", help="list the bundled templates")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m megatron_moevement.megatron.slurm``."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command == "list":
        for path in available_templates():
            sys.stdout.write(f"{path}\n")
        return 0
    if args.command == "placeholders":
        if not args.template.is_file():
            parser.error(f"template {str(args.template)!r} does not exist")
        for name in sorted(template_placeholders(args.template)):
            sys.stdout.write(f"{name}{'  (derived)' if name in _DERIVED else ''}\n")
        return 0
    values = {
        name: getattr(args, name) for name in _value_fields() if getattr(args, name) is not None
    }
    try:
        rendered = render_sbatch(args.template, **values)
    except SbatchTemplateError as exc:
        parser.error(str(exc))
    if args.output is None:
        sys.stdout.write(rendered)
    else:
        args.output.write_text(rendered)
        args.output.chmod(0o755)
    return 0


if __name__ == "__main__":
    sys.exit(main())
