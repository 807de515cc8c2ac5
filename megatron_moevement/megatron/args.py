"""Command-line arguments for ``--ckpt-strategy moevement`` on Megatron-LM pretrain scripts.

:func:`add_moevement_args` is an ``extra_args_provider`` for Megatron-LM's ``pretrain()`` (the
hook takes a parser and returns it). It adds one argument group with

* ``--ckpt-strategy {default,moevement}`` (default ``default``: Megatron's own checkpointing
  only, MoEvement stays off), and
* one ``--moevement-<field>`` option per :class:`~megatron_moevement.config.MoEvementConfig`
  field (underscores become dashes: ``ema_decay`` -> ``--moevement-ema-decay``). The options are
  generated from the dataclass fields and their type hints, and their help texts from the
  fields' docstrings, so a new config field gets its flag without touching this module (a field
  whose type cannot be mapped makes :func:`add_moevement_args` fail loudly instead of being
  skipped). Booleans come in pairs: ``--moevement-upstream-logging`` /
  ``--no-moevement-upstream-logging``.
* ``--moevement-spares HOST[,HOST...]``: the spare nodes reserved for the job (the SLURM
  templates fill it from ``$MOEVEMENT_SPARES``). It is launcher information, not a config field.

:func:`moevement_config_from_args` turns the parsed namespace into a validated
:class:`MoEvementConfig` (``None`` with ``--ckpt-strategy default``). Invalid combinations raise
:class:`MoEvementArgsError` (a :class:`MoEvementConfigError`) that names the *flag*, not the
dataclass field.

Example::

    parser = add_moevement_args(argparse.ArgumentParser())
    args = parser.parse_args(["--ckpt-strategy", "moevement", "--moevement-window-size", "4"])
    cfg = moevement_config_from_args(args)
    assert cfg.window_size == 4
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import os
import re
import textwrap
import typing
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from megatron_moevement.config import (
    CHECKSUM_ALGORITHMS,
    ORDERING_POLICIES,
    MoEvementConfig,
    MoEvementConfigError,
)

__all__ = [
    "CKPT_STRATEGIES",
    "FLAG_PREFIX",
    "LAUNCH_FLAGS",
    "MoEvementArgsError",
    "add_moevement_args",
    "config_field_flags",
    "flag_for_field",
    "moevement_config_from_args",
    "moevement_enabled",
    "parse_byte_size",
    "spare_hosts_from_args",
]

CKPT_STRATEGIES = ("default", "moevement")
"""Values of ``--ckpt-strategy``: ``default`` leaves Megatron-LM unchanged."""

FLAG_PREFIX = "--moevement-"
"""Prefix of every MoEvement option; the rest is the config field name with dashes."""

SPARES_ENV = "MOEVEMENT_SPARES"
"""Environment variable with the comma-separated spare hosts (set by the SLURM templates)."""

LAUNCH_FLAGS = ("--moevement-spares",)
"""MoEvement options that are launcher information rather than :class:`MoEvementConfig` fields."""

GROUP_TITLE = "MoEvement sparse in-memory checkpointing"


class MoEvementArgsError(MoEvementConfigError):
    """Invalid ``--moevement-*`` arguments; the message names the flag(s) and the fix."""


# --------------------------------------------------------------------------------- value parsing

_BYTE_UNITS = {
    "": 1,
    "b": 1,
    "k": 2**10,
    "kib": 2**10,
    "kb": 10**3,
    "m": 2**20,
    "mib": 2**20,
    "mb": 10**6,
    "g": 2**30,
    "gib": 2**30,
    "gb": 10**9,
    "t": 2**40,
    "tib": 2**40,
    "tb": 10**12,
}
_BYTE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*(/s)?\s*$")


def parse_byte_size(text: str) -> float:
    """Parses a byte count or rate such as ``"68719476736"``, ``"64GiB"``, ``"25GB/s"``, ``"1e10"``.

    Binary units: ``K``/``KiB``, ``M``/``MiB``, ``G``/``GiB``, ``T``/``TiB`` (powers of 1024, as in
    SLURM's ``--mem``); decimal units: ``KB``, ``MB``, ``GB``, ``TB``. A trailing ``/s`` is
    accepted (and ignored) for rates. Case-insensitive.

    Args:
        text: The value as typed on the command line.

    Returns:
        The number of bytes (or bytes per second) as a float.

    Raises:
        ValueError: ``text`` is not a number with an optional known unit.
    """
    match = _BYTE_RE.match(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _BYTE_UNITS:
        raise ValueError(
            f"{text!r} is not a byte size; use a number with an optional unit such as "
            "68719476736, 64GiB, 64G, 500MB or 25GB/s"
        )
    return float(match.group(1)) * _BYTE_UNITS[unit]


def _none_or(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """Wraps ``parse`` so that ``none`` (any case) yields ``None`` (for ``Optional`` fields)."""

    def parse_optional(text: str) -> Any:
        if str(text).strip().lower() == "none":
            return None
        return parse(text)

    parse_optional.__name__ = getattr(parse, "__name__", "value")
    return parse_optional


def _argtype(parse: Callable[[str], Any], what: str) -> Callable[[str], Any]:
    """Turns ``ValueError`` of ``parse`` into :class:`argparse.ArgumentTypeError` with a hint."""

    def parse_arg(text: str) -> Any:
        try:
            return parse(text)
        except (TypeError, ValueError) as exc:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r} ({exc})") from None

    parse_arg.__name__ = what
    return parse_arg


def _parse_window_size(text: str) -> Any:
    if text.strip().lower() == "auto":
        return "auto"
    return int(text)


def _parse_int(text: str) -> int:
    return int(text)


def _parse_byte_count(text: str) -> int:
    value = parse_byte_size(text)
    if value != int(value):
        raise ValueError("a byte count must be a whole number of bytes")
    return int(value)


# --------------------------------------------------------------------------------- flag table


@dataclass(frozen=True)
class _FlagSpec:
    """How one :class:`MoEvementConfig` field appears on the command line."""

    field: str
    flag: str
    kind: str  # "bool" or "value"
    parse: Optional[Callable[[str], Any]] = None
    metavar: Optional[str] = None
    choices: Optional[Tuple[str, ...]] = None
    help: str = ""


def flag_for_field(field_name: str) -> str:
    """The command-line flag of a :class:`MoEvementConfig` field (``ema_decay`` ->
    ``--moevement-ema-decay``)."""
    return FLAG_PREFIX + field_name.replace("_", "-")


def _dest(field_name: str) -> str:
    return "moevement_" + field_name


def _field_docs(cls: type) -> Dict[str, str]:
    """Attribute docstrings (the string literal after each field) of a dataclass, by field."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # pragma: no cover - source not shipped (zipapp, frozen)
        return {}
    body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
    docs: Dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _help_from_doc(doc: str) -> str:
    """A field docstring as option help: command-line spelling, safe for argparse's %-format."""
    text = doc.replace("``", "").rstrip(".")
    text = re.sub(r"\bNone\b", "none", text)
    return text.replace("%", "%%")


def _unwrap_optional(hint: Any) -> Tuple[Any, bool]:
    """``Optional[X]`` -> ``(X, True)``; anything else -> ``(hint, False)``."""
    if typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            return args[0], True
    return hint, False


# Fields whose command-line form is not derived from the type hint alone.
_OVERRIDES: Dict[str, Dict[str, Any]] = {
    "window_size": dict(
        parse=_argtype(_parse_window_size, "'auto' or an integer >= 1"), metavar="{auto,N}"
    ),
    "ordering": dict(metavar="{" + ",".join(ORDERING_POLICIES) + ",...}"),
    "checksum": dict(choices=CHECKSUM_ALGORITHMS),
    "durable_dir": dict(parse=_none_or(str), metavar="DIR|none"),
    "host_memory_budget_bytes": dict(
        parse=_argtype(_none_or(_parse_byte_count), "a byte count such as 64GiB, or none"),
        metavar="BYTES",
    ),
    "d2h_bandwidth_bytes_per_s": dict(
        parse=_argtype(_none_or(parse_byte_size), "bytes/s such as 25GB/s or 2.5e10, or none"),
        metavar="BYTES_PER_S",
    ),
}


def _spec_for(field: dataclasses.Field, hint: Any, doc: str) -> _FlagSpec:
    name = field.name
    flag = flag_for_field(name)
    help_text = _help_from_doc(doc) if doc else f"MoEvementConfig.{name}"
    override = _OVERRIDES.get(name, {})
    base, optional = _unwrap_optional(hint)
    if base is bool and not optional:
        return _FlagSpec(name, flag, "bool", help=help_text)
    if "parse" in override:
        parse = override["parse"]
    elif base is int:
        parse = _argtype(
            _none_or(_parse_int) if optional else _parse_int,
            "an integer" + (" or none" if optional else ""),
        )
    elif base is float:
        parse = _argtype(
            _none_or(float) if optional else float, "a number" + (" or none" if optional else "")
        )
    elif base is str:
        parse = _none_or(str) if optional else str
    else:
        raise TypeError(
            f"MoEvementConfig.{name} has type {hint!r}, which add_moevement_args cannot map to a "
            "command-line option. Fix: add an entry for it to _OVERRIDES in "
            "megatron_moevement/megatron/args.py (a parse function and metavar)."
        )
    metavar = override.get("metavar")
    if metavar is None and override.get("choices") is None:
        metavar = {int: "INT", float: "FLOAT", str: "STR"}[base] + ("|none" if optional else "")
    return _FlagSpec(
        name,
        flag,
        "value",
        parse=parse,
        metavar=metavar,
        choices=override.get("choices"),
        help=help_text,
    )


def _flag_specs() -> List[_FlagSpec]:
    hints = typing.get_type_hints(MoEvementConfig)
    docs = _field_docs(MoEvementConfig)
    return [
        _spec_for(f, hints[f.name], docs.get(f.name, ""))
        for f in dataclasses.fields(MoEvementConfig)
    ]


def config_field_flags() -> Dict[str, str]:
    """Maps every :class:`MoEvementConfig` field to its command-line flag."""
    return {f.name: flag_for_field(f.name) for f in dataclasses.fields(MoEvementConfig)}


# --------------------------------------------------------------------------------- public API


def add_moevement_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds ``--ckpt-strategy`` and the ``--moevement-*`` options to ``parser``.

    Signature and return value follow Megatron-LM's ``extra_args_provider`` hook.

    Args:
        parser: The parser to extend (Megatron-LM's, or any ``argparse`` parser).

    Returns:
        ``parser`` itself, with a new argument group.

    Raises:
        TypeError: A :class:`MoEvementConfig` field has a type this module cannot map to an
            option (so that no field silently lacks a flag).
        argparse.ArgumentError: ``parser`` already has one of these options (the provider was
            registered twice).
    """
    defaults = MoEvementConfig()
    group = parser.add_argument_group(
        title=GROUP_TITLE,
        description=(
            "MoEvement sparse in-memory checkpointing for MoE models. Enabled by "
            "--ckpt-strategy moevement; every --moevement-* option maps to the "
            "MoEvementConfig field of the same name."
        ),
    )
    group.add_argument(
        "--ckpt-strategy",
        dest="ckpt_strategy",
        choices=CKPT_STRATEGIES,
        default="default",
        help="'moevement' adds MoEvement sparse in-memory checkpointing next to Megatron's own "
        "checkpoints (--save/--load stay the durable tier); 'default' leaves training unchanged.",
    )
    for spec in _flag_specs():
        default = getattr(defaults, spec.field)
        if spec.kind == "bool":
            group.add_argument(
                spec.flag,
                dest=_dest(spec.field),
                action=argparse.BooleanOptionalAction,
                default=default,
                help=f"{spec.help} (default: {'on' if default else 'off'})",
            )
            continue
        group.add_argument(
            spec.flag,
            dest=_dest(spec.field),
            type=spec.parse,
            default=default,
            metavar=spec.metavar,
            choices=spec.choices,
            help=f"{spec.help} (default: {default})",
        )
    group.add_argument(
        "--moevement-spares",
        dest="moevement_spares",
        default=None,
        metavar="HOST[,HOST...]",
        help=f"Spare nodes reserved for this job (default: ${SPARES_ENV}), logged. The SLURM "
        "task agents put spare tasks on them (see docs/megatron_integration.md).",
    )
    return parser


def moevement_enabled(args: argparse.Namespace) -> bool:
    """True when ``args`` asks for ``--ckpt-strategy moevement``.

    Raises:
        MoEvementArgsError: ``args`` was not parsed with :func:`add_moevement_args`.
    """
    _require_provider(args)
    strategy = args.ckpt_strategy
    if strategy not in CKPT_STRATEGIES:
        raise MoEvementArgsError(
            f"--ckpt-strategy={strategy!r} is invalid. "
            f"Fix: use one of {', '.join(CKPT_STRATEGIES)}."
        )
    return strategy == "moevement"


def moevement_config_from_args(args: argparse.Namespace) -> Optional[MoEvementConfig]:
    """Builds the :class:`MoEvementConfig` from parsed arguments.

    Args:
        args: A namespace parsed by a parser extended with :func:`add_moevement_args` (Megatron's
            ``get_args()``).

    Returns:
        The validated config, or ``None`` with ``--ckpt-strategy default``.

    Raises:
        MoEvementArgsError: ``args`` lacks the MoEvement options (the args provider was not
            registered), or a value or combination is invalid; the message names the flags.
    """
    if not moevement_enabled(args):
        return None
    values: Dict[str, Any] = {}
    missing = []
    for field in dataclasses.fields(MoEvementConfig):
        dest = _dest(field.name)
        if not hasattr(args, dest):
            missing.append(flag_for_field(field.name))
            continue
        values[field.name] = getattr(args, dest)
    if missing:
        raise MoEvementArgsError(
            f"the parsed arguments lack {', '.join(missing)}. Fix: build the parser with "
            "megatron_moevement.megatron.args.add_moevement_args (a newer MoEvementConfig than "
            "the parser was built with also causes this)."
        )
    try:
        return MoEvementConfig(**values)
    except MoEvementConfigError as exc:
        raise MoEvementArgsError(_with_flag_names(str(exc))) from exc


def spare_hosts_from_args(args: argparse.Namespace) -> List[str]:
    """The spare hosts of ``--moevement-spares`` (or ``$MOEVEMENT_SPARES``), in order, no blanks."""
    value = getattr(args, "moevement_spares", None)
    if value is None:
        value = os.environ.get(SPARES_ENV, "")
    return [h.strip() for h in str(value).split(",") if h.strip()]


# --------------------------------------------------------------------------------- helpers


def _require_provider(args: Any) -> None:
    if not hasattr(args, "ckpt_strategy"):
        raise MoEvementArgsError(
            "the parsed arguments have no --ckpt-strategy. Fix: register "
            "megatron_moevement.megatron.args.add_moevement_args as Megatron-LM's "
            "extra_args_provider (scripts/apply_megatron_patch.sh does this for pretrain_gpt.py)."
        )


def _with_flag_names(message: str) -> str:
    """Rewrites a :class:`MoEvementConfigError` message in terms of command-line flags."""
    names = sorted((f.name for f in dataclasses.fields(MoEvementConfig)), key=len, reverse=True)
    message = re.sub(
        r"MoEvementConfig\.(\w+)",
        lambda m: flag_for_field(m.group(1)) if m.group(1) in names else m.group(0),
        message,
    )
    # Multi-word field names in the fix text (single words such as "checksum" are also prose).
    snake = [n for n in names if "_" in n]
    pattern = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, snake)) + r")(?![\w-])")
    message = pattern.sub(lambda m: flag_for_field(m.group(1)), message)
    message = re.sub(r"(--moevement-[\w-]+)=None\b", r"\1 none", message)
    return f"invalid MoEvement arguments: {message}"
