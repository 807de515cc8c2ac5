"""Command-line arguments for ``--ckpt-strategy`` on Megatron-LM pretrain scripts.

:func:`add_moevement_args` is an ``extra_args_provider`` for Megatron-LM's ``pretrain()`` (the
hook takes a parser and returns it). It adds one argument group with

* ``--ckpt-strategy {default,moevement,gemini,moc}`` (default ``default``: Megatron's own
  checkpointing only, nothing in memory). ``moevement`` is MoEvement's sparse in-memory
  checkpointing; ``gemini`` and ``moc`` are the baselines of :mod:`megatron_moevement.baselines`
  (dense snapshots every k iterations; non-expert state plus a rotating group of experts) on the
  same engine;
* one ``--moevement-<field>`` option per :class:`~megatron_moevement.config.MoEvementConfig`
  field (underscores become dashes: ``ema_decay`` -> ``--moevement-ema-decay``) and one
  ``--baseline-<field>`` option per :class:`~megatron_moevement.baselines.BaselineConfig` policy
  field (``--baseline-interval``, ``--baseline-expert-fraction``). The options are generated from
  the dataclass fields and their type hints, and their help texts from the fields' docstrings, so
  a new config field gets its flag without touching this module (a field whose type cannot be
  mapped makes :func:`add_moevement_args` fail loudly instead of being skipped). Booleans come in
  pairs: ``--moevement-upstream-logging`` / ``--no-moevement-upstream-logging``. Every generated
  option defaults to ``None``, "not given": the config's own default applies, and an option that
  was given can be told from one that was not;
* ``--moevement-spares HOST[,HOST...]``: the spare nodes reserved for the job (the SLURM
  templates fill it from ``$MOEVEMENT_SPARES``). It is launcher information, not a config field.

:func:`moevement_config_from_args` turns the parsed namespace into a validated
:class:`MoEvementConfig` (``None`` with ``--ckpt-strategy default``; for ``gemini`` and ``moc``
the shared storage settings, which the baseline adapts with
:meth:`~megatron_moevement.baselines.BaselineConfig.moevement_config`), and
:func:`baseline_config_from_args` into a validated :class:`BaselineConfig` (``None`` unless
``--ckpt-strategy`` is ``gemini`` or ``moc``). Invalid values and combinations raise
:class:`MoEvementArgsError` (a :class:`MoEvementConfigError`) that names the *flag*, not the
dataclass field, and the fix.

Example::

    parser = add_moevement_args(argparse.ArgumentParser())
    args = parser.parse_args(["--ckpt-strategy", "moevement", "--moevement-window-size", "4"])
    cfg = moevement_config_from_args(args)
    assert cfg.window_size == 4
    args = parser.parse_args(["--ckpt-strategy", "gemini", "--baseline-interval", "8"])
    assert baseline_config_from_args(args).interval == 8

One module on purpose: every option is generated from the config dataclasses' fields and types,
and the cross-option checks need all of them.
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
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from megatron_moevement.baselines.config import (
    BASELINE_OVERRIDES,
    POLICY_FIELDS,
    BaselineConfig,
    BaselineConfigError,
)
from megatron_moevement.config import MoEvementConfig, MoEvementConfigError
from megatron_moevement.constants import (
    BASELINE_STRATEGIES,
    CHECKSUM_ALGORITHMS,
    MEGATRON_CKPT_STRATEGIES,
    ORDERING_POLICIES,
)

__all__ = [
    "BASELINE_FLAG_PREFIX",
    "MEGATRON_CKPT_STRATEGIES",
    "FLAG_PREFIX",
    "LAUNCH_FLAGS",
    "MoEvementArgsError",
    "add_baseline_args",
    "add_moevement_args",
    "baseline_config_for",
    "baseline_config_from_args",
    "baseline_field_flags",
    "baseline_flag_for_field",
    "config_field_flags",
    "flag_for_field",
    "moevement_config_from_args",
    "moevement_enabled",
    "parse_byte_size",
    "spare_hosts_from_args",
]

FLAG_PREFIX = "--moevement-"
"""Prefix of every MoEvement option; the rest is the config field name with dashes."""

BASELINE_FLAG_PREFIX = "--baseline-"
"""Prefix of every baseline policy option; the rest is the field name with dashes."""

SPARES_ENV = "MOEVEMENT_SPARES"
"""Environment variable with the comma-separated spare hosts (set by the SLURM templates)."""

LAUNCH_FLAGS = ("--moevement-spares",)
"""MoEvement options that are launcher information rather than :class:`MoEvementConfig` fields."""

GROUP_TITLE = "MoEvement in-memory checkpointing"


class MoEvementArgsError(MoEvementConfigError):
    """Invalid ``--ckpt-strategy``, ``--moevement-*`` or ``--baseline-*`` arguments; the message
    names the flag(s) and the fix."""


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
    """How one config field appears on the command line."""

    field: str
    flag: str
    kind: str  # "bool" or "value"
    parse: Optional[Callable[[str], Any]] = None
    metavar: Optional[str] = None
    choices: Optional[Tuple[str, ...]] = None
    help: str = ""


@dataclass(frozen=True)
class _FlagFamily:
    """A config dataclass whose fields become ``<prefix><field>`` options."""

    cls: type
    prefix: str
    """Flag prefix, e.g. ``--moevement-``."""
    dest_prefix: str
    """Prefix of the namespace attribute, e.g. ``moevement_``."""
    overrides: Mapping[str, Mapping[str, Any]]
    """Fields whose command-line form is not derived from the type hint alone."""
    overrides_name: str
    """Name of ``overrides`` in this module (for the error about an unmappable field)."""
    what: str
    """What the options configure, for error messages (``MoEvement``, ``baseline``)."""
    exclude: Tuple[str, ...] = ()
    """Fields without an option (set another way)."""

    def flag(self, field_name: str) -> str:
        return self.prefix + field_name.replace("_", "-")

    def dest(self, field_name: str) -> str:
        return self.dest_prefix + field_name

    def fields(self) -> List[dataclasses.Field]:
        return [f for f in dataclasses.fields(self.cls) if f.name not in self.exclude]


def flag_for_field(field_name: str) -> str:
    """The command-line flag of a :class:`MoEvementConfig` field (``ema_decay`` ->
    ``--moevement-ema-decay``)."""
    return _MOEVEMENT.flag(field_name)


def baseline_flag_for_field(field_name: str) -> str:
    """The command-line flag of a :class:`BaselineConfig` field (``expert_fraction`` ->
    ``--baseline-expert-fraction``)."""
    return _BASELINE.flag(field_name)


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


# MoEvementConfig fields whose command-line form is not derived from the type hint alone.
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

# BaselineConfig fields likewise (none so far).
_BASELINE_OVERRIDES: Dict[str, Dict[str, Any]] = {}

_MOEVEMENT = _FlagFamily(
    MoEvementConfig, FLAG_PREFIX, "moevement_", _OVERRIDES, "_OVERRIDES", "MoEvement"
)
# ``strategy`` is --ckpt-strategy itself.
_BASELINE = _FlagFamily(
    BaselineConfig,
    BASELINE_FLAG_PREFIX,
    "baseline_",
    _BASELINE_OVERRIDES,
    "_BASELINE_OVERRIDES",
    "baseline",
    exclude=("strategy",),
)


def _spec_for(
    field: dataclasses.Field, hint: Any, doc: str, family: _FlagFamily = _MOEVEMENT
) -> _FlagSpec:
    name = field.name
    flag = family.flag(name)
    cls_name = family.cls.__name__
    help_text = _help_from_doc(doc) if doc else f"{cls_name}.{name}"
    override = family.overrides.get(name, {})
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
            f"{cls_name}.{name} has type {hint!r}, which add_moevement_args cannot map to a "
            f"command-line option. Fix: add an entry for it to {family.overrides_name} in "
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


def _flag_specs(family: _FlagFamily = _MOEVEMENT) -> List[_FlagSpec]:
    hints = typing.get_type_hints(family.cls)
    docs = _field_docs(family.cls)
    return [_spec_for(f, hints[f.name], docs.get(f.name, ""), family) for f in family.fields()]


def _add_family(
    group: Any, family: _FlagFamily, shown_defaults: Optional[Mapping[str, Any]] = None
) -> None:
    """Adds one option per field of ``family``; each defaults to ``None`` ("not given").

    ``shown_defaults`` replaces the config's defaults in the help texts (for a caller that fills
    other defaults in).
    """
    defaults = family.cls()
    for spec in _flag_specs(family):
        default = (shown_defaults or {}).get(spec.field, getattr(defaults, spec.field))
        if spec.kind == "bool":
            group.add_argument(
                spec.flag,
                dest=family.dest(spec.field),
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"{spec.help} (default: {'on' if default else 'off'})",
            )
            continue
        group.add_argument(
            spec.flag,
            dest=family.dest(spec.field),
            type=spec.parse,
            default=None,
            metavar=spec.metavar,
            choices=spec.choices,
            help=f"{spec.help} (default: {default})",
        )


def config_field_flags() -> Dict[str, str]:
    """Maps every :class:`MoEvementConfig` field to its command-line flag."""
    return {f.name: _MOEVEMENT.flag(f.name) for f in _MOEVEMENT.fields()}


def baseline_field_flags() -> Dict[str, str]:
    """Maps every :class:`BaselineConfig` policy field (all but ``strategy``) to its flag."""
    return {f.name: _BASELINE.flag(f.name) for f in _BASELINE.fields()}


# --------------------------------------------------------------------------------- public API


def add_moevement_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds ``--ckpt-strategy``, the ``--moevement-*`` and the ``--baseline-*`` options.

    Signature and return value follow Megatron-LM's ``extra_args_provider`` hook.

    Args:
        parser: The parser to extend (Megatron-LM's, or any ``argparse`` parser).

    Returns:
        ``parser`` itself, with a new argument group.

    Raises:
        TypeError: A :class:`MoEvementConfig` or :class:`BaselineConfig` field has a type this
            module cannot map to an option (so that no field silently lacks a flag).
        argparse.ArgumentError: ``parser`` already has one of these options (the provider was
            registered twice).
    """
    group = parser.add_argument_group(
        title=GROUP_TITLE,
        description=(
            "In-memory checkpointing for MoE models, chosen with --ckpt-strategy: MoEvement "
            "(sparse) or the gemini / moc baselines. Every --moevement-* option maps to the "
            "MoEvementConfig field of the same name (for the baselines: the shared storage "
            "settings), every --baseline-* option to the BaselineConfig field."
        ),
    )
    group.add_argument(
        "--ckpt-strategy",
        dest="ckpt_strategy",
        choices=MEGATRON_CKPT_STRATEGIES,
        default="default",
        help="'moevement' adds MoEvement sparse in-memory checkpointing next to Megatron's own "
        "checkpoints (--save/--load stay the durable tier); 'gemini' (dense snapshots every "
        "--baseline-interval iterations) and 'moc' (non-expert state plus a rotating "
        "--baseline-expert-fraction of the experts) are the baselines on the same engine; "
        "'default' leaves training unchanged.",
    )
    _add_family(group, _MOEVEMENT)
    _add_family(group, _BASELINE)
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
    """True when ``args`` asks for an in-memory strategy (``--ckpt-strategy`` ``moevement``,
    ``gemini`` or ``moc``).

    Raises:
        MoEvementArgsError: ``args`` was not parsed with :func:`add_moevement_args`, or its
            ``ckpt_strategy`` is not one of :data:`MEGATRON_CKPT_STRATEGIES`.
    """
    return _strategy(args) != "default"


def moevement_config_from_args(args: argparse.Namespace) -> Optional[MoEvementConfig]:
    """Builds the :class:`MoEvementConfig` from parsed arguments.

    For ``--ckpt-strategy gemini`` / ``moc`` it is the shared config (replication factor,
    checksum, ranks per node, bandwidth, ...) that the baseline adapts
    (:meth:`BaselineConfig.moevement_config`). Options the baseline overrides must then not be
    given with another value than the baseline's, and the durable tier is rejected (see
    :func:`_check_baseline_flags`).

    Args:
        args: A namespace parsed by a parser extended with :func:`add_moevement_args` (Megatron's
            ``get_args()``).

    Returns:
        The validated config, or ``None`` with ``--ckpt-strategy default``.

    Raises:
        MoEvementArgsError: ``args`` lacks the MoEvement options (the args provider was not
            registered), or a value or combination is invalid; the message names the flags.
    """
    strategy = _strategy(args)
    if strategy == "default":
        return None
    values = _given_values(args, _MOEVEMENT)
    if strategy in BASELINE_STRATEGIES:
        _check_baseline_flags(strategy, values)
    try:
        return MoEvementConfig(**values)
    except MoEvementConfigError as exc:
        raise MoEvementArgsError(_with_flag_names(str(exc), _MOEVEMENT)) from exc


def add_baseline_args(
    parser: Any, shown_defaults: Optional[Mapping[str, Any]] = None
) -> argparse.ArgumentParser:
    """Adds only the generated ``--baseline-*`` options (each defaulting to ``None``: not given)
    to ``parser`` (a parser or argument group), for a command line of its own such as
    ``moevement-train demo``; read them with :func:`baseline_config_for`.

    Args:
        parser: The parser or argument group to extend.
        shown_defaults: Defaults to show in the help texts instead of :class:`BaselineConfig`'s
            (pass the same mapping to :func:`baseline_config_for`).

    Returns:
        ``parser``.
    """
    _add_family(parser, _BASELINE, shown_defaults)
    return parser


def baseline_config_from_args(args: argparse.Namespace) -> Optional[BaselineConfig]:
    """Builds the :class:`BaselineConfig` of ``--ckpt-strategy gemini`` or ``moc``.

    Options not given take :class:`BaselineConfig`'s defaults.

    Args:
        args: A namespace parsed by a parser extended with :func:`add_moevement_args`.

    Returns:
        The validated policy, or ``None`` with ``--ckpt-strategy default`` or ``moevement``.

    Raises:
        MoEvementArgsError: ``args`` lacks the options; a ``--baseline-*`` option was given with
            ``--ckpt-strategy default`` or ``moevement``, or with the baseline that does not read
            it (``--baseline-expert-fraction`` with ``gemini``, ``--baseline-interval`` with
            ``moc``); or a value is invalid. The message names the flag and the fix.
    """
    return baseline_config_for(_strategy(args), args)


def baseline_config_for(
    strategy: str,
    args: Any,
    strategy_flag: str = "--ckpt-strategy",
    defaults: Optional[Mapping[str, Any]] = None,
) -> Optional[BaselineConfig]:
    """:func:`baseline_config_from_args` for a strategy chosen by another option.

    Args:
        strategy: The chosen strategy (``default``, ``moevement``, ``gemini`` or ``moc``).
        args: A namespace with the ``--baseline-*`` options (:func:`add_moevement_args` or
            :func:`add_baseline_args`).
        strategy_flag: The option that chose ``strategy``, for error messages.
        defaults: Values for the policy fields that were not given (default:
            :class:`BaselineConfig`'s); only the fields ``strategy`` reads are used.

    Returns:
        The validated policy, or ``None`` for a strategy that is not a baseline.

    Raises:
        MoEvementArgsError: As :func:`baseline_config_from_args`.
    """
    values = _given_values(args, _BASELINE)
    if strategy not in BASELINE_STRATEGIES:
        if values:
            flags = _flags(_BASELINE, values)
            readers = sorted(
                {s for name in values for s, fs in POLICY_FIELDS.items() if name in fs}
            )
            raise MoEvementArgsError(
                f"{flags} configure{'s' if len(values) == 1 else ''} a baseline, but "
                f"{strategy_flag} is {strategy}. Fix: drop {flags}, or use {strategy_flag} "
                f"{' or '.join(readers)}."
            )
        return None
    reads = POLICY_FIELDS[strategy]
    ignored = {name: v for name, v in values.items() if name not in reads}
    if ignored:
        flags = _flags(_BASELINE, ignored)
        readers = sorted({s for name in ignored for s, fs in POLICY_FIELDS.items() if name in fs})
        raise MoEvementArgsError(
            f"{flags} {'has' if len(ignored) == 1 else 'have'} no effect with {strategy_flag} "
            f"{strategy}, which reads only "
            f"{_flags(_BASELINE, reads) or 'no --baseline-* option'}. Fix: "
            f"drop {flags}, or use {strategy_flag} {' or '.join(readers)}."
        )
    filled = {k: v for k, v in (defaults or {}).items() if k in reads and k not in values}
    try:
        return BaselineConfig(strategy=strategy, **filled, **values)
    except BaselineConfigError as exc:
        raise MoEvementArgsError(_with_flag_names(str(exc), _BASELINE)) from exc


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


def _strategy(args: Any) -> str:
    """The validated ``--ckpt-strategy`` of ``args``."""
    _require_provider(args)
    strategy = args.ckpt_strategy
    if strategy not in MEGATRON_CKPT_STRATEGIES:
        raise MoEvementArgsError(
            f"--ckpt-strategy={strategy!r} is invalid. "
            f"Fix: use one of {', '.join(MEGATRON_CKPT_STRATEGIES)}."
        )
    return strategy


def _given_values(args: Any, family: _FlagFamily) -> Dict[str, Any]:
    """The fields of ``family`` whose options were given (not ``None``), by field name.

    For ``Optional`` fields ``none`` on the command line is the default anyway, so it counts as
    not given.
    """
    values: Dict[str, Any] = {}
    missing = []
    for field in family.fields():
        dest = family.dest(field.name)
        if not hasattr(args, dest):
            missing.append(family.flag(field.name))
            continue
        value = getattr(args, dest)
        if value is not None:
            values[field.name] = value
    if missing:
        raise MoEvementArgsError(
            f"the parsed arguments lack {', '.join(missing)}. Fix: build the parser with "
            f"megatron_moevement.megatron.args.add_moevement_args (a newer {family.cls.__name__} "
            "than the parser was built with also causes this)."
        )
    return values


def _flags(family: _FlagFamily, names: typing.Iterable[str]) -> str:
    return ", ".join(family.flag(name) for name in names)


def _as_flag(family: _FlagFamily, name: str, value: Any) -> str:
    """``value`` of field ``name`` as typed on the command line."""
    if isinstance(value, bool):
        return family.flag(name) if value else "--no-" + family.flag(name)[2:]
    return f"{family.flag(name)} {'none' if value is None else value}"


def _check_baseline_flags(strategy: str, values: Mapping[str, Any]) -> None:
    """Rejects ``--moevement-*`` options that a baseline would silently ignore.

    * The options a baseline overrides (:data:`BASELINE_OVERRIDES`: window size, upstream
      logging, recovery scope), when given with another value than the baseline's.
    * The durable tier (``--moevement-durable-dir`` / ``--moevement-durable-interval``). The
      periodic saver (:mod:`megatron_moevement.durable.periodic`) is driven from
      ``MoEvementStrategy._capture_slot``: ``moc`` replaces that method and never calls it (and
      its checkpoint holds only one group of experts, so restoring it alone would give stale
      experts); ``gemini`` calls it only at its snapshot iterations (``i % interval == 0``) while
      the saver saves at ``(i + 1) % durable_interval == 0``: with intervals that share a factor
      (e.g. 4 and 1000) it never saves.
      Megatron's own ``--save`` / ``--load`` stay the durable tier for both.
    """
    conflicts = [
        name
        for name, forced in BASELINE_OVERRIDES.items()
        if name in values and values[name] != forced
    ]
    if conflicts:
        given = " ".join(_as_flag(_MOEVEMENT, n, values[n]) for n in conflicts)
        forced = [_as_flag(_MOEVEMENT, n, v) for n, v in BASELINE_OVERRIDES.items()]
        raise MoEvementArgsError(
            f"--ckpt-strategy {strategy} ignores {given}: a baseline always runs with "
            f"{', '.join(forced[:-1])} and {forced[-1]} (a one-slot window, global rollback). "
            f"Fix: drop {_flags(_MOEVEMENT, conflicts)}, or use --ckpt-strategy moevement."
        )
    durable = [name for name in ("durable_dir", "durable_interval") if name in values]
    if durable:
        why = (
            "its checkpoints hold the non-expert state and one group of experts, so a durable "
            "copy would restore stale experts, and it never runs the periodic saver"
            if strategy == "moc"
            else "its periodic saves would run only at snapshot iterations that are also due "
            "for a durable save, and with a --baseline-interval and --moevement-durable-interval "
            "that share a factor (e.g. 4 and 1000) no iteration ever is"
        )
        raise MoEvementArgsError(
            f"{_flags(_MOEVEMENT, durable)}: the baselines have no durable tier, and "
            f"--ckpt-strategy {strategy} cannot use MoEvement's: {why}. Fix: drop "
            f"{_flags(_MOEVEMENT, durable)} (Megatron's --save/--load stay the durable tier), "
            "or use --ckpt-strategy moevement."
        )


def _with_flag_names(message: str, family: _FlagFamily = _MOEVEMENT) -> str:
    """Rewrites a config error message in terms of ``family``'s command-line flags."""
    names = sorted((f.name for f in family.fields()), key=len, reverse=True)
    cls_name = family.cls.__name__
    message = re.sub(
        re.escape(cls_name) + r"\.(\w+)",
        lambda m: family.flag(m.group(1)) if m.group(1) in names else m.group(0),
        message,
    )
    # Multi-word field names in the fix text (single words such as "checksum" are also prose,
    # unless an assignment such as "interval=4" follows).
    snake = [n for n in names if "_" in n]
    if snake:
        pattern = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, snake)) + r")(?![\w-])")
        message = pattern.sub(lambda m: family.flag(m.group(1)), message)
    words = [n for n in names if "_" not in n]
    if words:
        pattern = re.compile(r"(?<![\w.-])(" + "|".join(map(re.escape, words)) + r")(?==)")
        message = pattern.sub(lambda m: family.flag(m.group(1)), message)
    message = re.sub(r"(" + re.escape(family.prefix) + r"[\w-]+)=None\b", r"\1 none", message)
    return f"invalid {family.what} arguments: {message}"
