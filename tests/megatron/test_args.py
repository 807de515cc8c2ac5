"""Tests for the ``--ckpt-strategy`` args provider (MoEvement and the gemini / moc baselines)."""

import argparse
import dataclasses
import typing

import pytest

from megatron_moevement.baselines import BASELINE_STRATEGIES, BaselineConfig
from megatron_moevement.config import MoEvementConfig, MoEvementConfigError
from megatron_moevement.constants import MEGATRON_CKPT_STRATEGIES
from megatron_moevement.megatron import args as margs
from megatron_moevement.megatron.args import (
    MoEvementArgsError,
    add_moevement_args,
    baseline_config_from_args,
    baseline_field_flags,
    baseline_flag_for_field,
    config_field_flags,
    flag_for_field,
    moevement_config_from_args,
    moevement_enabled,
    parse_byte_size,
    spare_hosts_from_args,
)

# One non-default command-line value per MoEvementConfig field, and the config value it means.
# test_nondefault_table_covers_every_field makes a new config field fail here until it is added.
NON_DEFAULT = {
    "window_size": (["7"], 7),
    "ordering": (["ema"], "ema"),
    "ema_decay": (["0.5"], 0.5),
    "reorder_threshold": (["0.2"], 0.2),
    "reorder_fraction": (["0.5"], 0.5),
    "replication_factor": (["2"], 2),
    "ranks_per_node": (["8"], 8),
    "host_memory_budget_bytes": (["64GiB"], 64 * 2**30),
    "d2h_bandwidth_bytes_per_s": (["25GB/s"], 25e9),
    "iteration_time_s": (["1.5"], 1.5),
    "snapshot_budget_fraction": (["0.5"], 0.5),
    "recovery_scope": (["global"], "global"),
    "heartbeat_interval_s": (["0.5"], 0.5),
    "heartbeat_timeout_s": (["30"], 30.0),
    "durable_dir": (["/ckpt/moe"], "/ckpt/moe"),
    "durable_interval": (["100"], 100),
    "upstream_logging": ([], False),  # --no-moevement-upstream-logging
    "checksum": (["sha256"], "sha256"),
    "snapshot_async": ([], False),  # --no-moevement-snapshot-async
}


def parser() -> argparse.ArgumentParser:
    return add_moevement_args(argparse.ArgumentParser(prog="pretrain_gpt.py", allow_abbrev=False))


def parse(*argv: str) -> argparse.Namespace:
    return parser().parse_args(list(argv))


def test_every_config_field_has_a_flag():
    options = parser()._option_string_actions
    for field in dataclasses.fields(MoEvementConfig):
        flag = flag_for_field(field.name)
        assert flag in options, f"MoEvementConfig.{field.name} has no {flag}"
        assert options[flag].help, f"{flag} has no help text"
    assert set(config_field_flags()) == {f.name for f in dataclasses.fields(MoEvementConfig)}


def test_bool_fields_have_negative_flags():
    options = parser()._option_string_actions
    hints = typing.get_type_hints(MoEvementConfig)
    for field in dataclasses.fields(MoEvementConfig):
        if hints[field.name] is bool:
            assert "--no-" + flag_for_field(field.name)[2:] in options


def test_default_strategy_gives_no_config():
    args = parse()
    assert args.ckpt_strategy == "default"
    assert not moevement_enabled(args)
    assert moevement_config_from_args(args) is None


def test_moevement_without_flags_gives_default_config():
    assert moevement_config_from_args(parse("--ckpt-strategy", "moevement")) == MoEvementConfig()


def test_nondefault_table_covers_every_field():
    assert set(NON_DEFAULT) == {f.name for f in dataclasses.fields(MoEvementConfig)}
    defaults = MoEvementConfig()
    for name, (_, value) in NON_DEFAULT.items():
        assert getattr(defaults, name) != value, f"{name}: pick a value other than the default"


def test_every_flag_is_mapped():
    argv = ["--ckpt-strategy", "moevement"]
    for name, (values, _) in NON_DEFAULT.items():
        flag = flag_for_field(name)
        argv += [flag, *values] if values else ["--no-" + flag[2:]]
    cfg = moevement_config_from_args(parse(*argv))
    expected = MoEvementConfig(**{name: value for name, (_, value) in NON_DEFAULT.items()})
    assert cfg == expected


def test_window_size_auto_and_none_for_optional_fields():
    cfg = moevement_config_from_args(
        parse(
            "--ckpt-strategy=moevement",
            "--moevement-window-size=AUTO",
            "--moevement-ranks-per-node=none",
            "--moevement-host-memory-budget-bytes=None",
        )
    )
    assert cfg.window_size == "auto" and cfg.ranks_per_node is None
    assert cfg.host_memory_budget_bytes is None


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--moevement-window-size", "fixed"], "--moevement-window-size"),
        (["--moevement-host-memory-budget-bytes", "lots"], "--moevement-host-memory-budget-bytes"),
        (["--moevement-host-memory-budget-bytes", "1.5"], "--moevement-host-memory-budget-bytes"),
        (["--moevement-checksum", "md5"], "--moevement-checksum"),
        (["--moevement-ema-decay", "high"], "--moevement-ema-decay"),
        (["--moevement-replication-factor", "none"], "--moevement-replication-factor"),
        (["--ckpt-strategy", "fast"], "--ckpt-strategy"),
    ],
)
def test_unparsable_values_are_argparse_errors_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(*argv)
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, flags",
    [
        (["--moevement-ema-decay", "1.5"], ["--moevement-ema-decay"]),
        (["--moevement-window-size", "0"], ["--moevement-window-size"]),
        (["--moevement-replication-factor", "-1"], ["--moevement-replication-factor"]),
        (["--moevement-ordering", "random"], ["--moevement-ordering"]),
        (
            ["--moevement-durable-dir", "/ckpt"],
            ["--moevement-durable-dir", "--moevement-durable-interval"],
        ),
        (["--moevement-durable-interval", "10"], ["--moevement-durable-dir"]),
    ],
)
def test_invalid_values_name_the_flag_not_the_field(argv, flags):
    args = parse("--ckpt-strategy", "moevement", *argv)
    with pytest.raises(MoEvementArgsError) as exc:
        moevement_config_from_args(args)
    message = str(exc.value)
    assert isinstance(exc.value, MoEvementConfigError)
    for flag in flags:
        assert flag in message
    assert "MoEvementConfig." not in message and "Fix:" in message


def test_invalid_values_ignored_when_disabled():
    assert moevement_config_from_args(parse("--moevement-ema-decay", "1.5")) is None


def test_args_without_the_provider_are_rejected_clearly():
    with pytest.raises(MoEvementArgsError, match="extra_args_provider"):
        moevement_config_from_args(argparse.Namespace(num_layers=2))
    partial = parse("--ckpt-strategy", "moevement")
    del partial.moevement_checksum
    with pytest.raises(MoEvementArgsError, match="--moevement-checksum"):
        moevement_config_from_args(partial)


def test_registering_twice_is_an_error():
    with pytest.raises(argparse.ArgumentError):
        add_moevement_args(parser())


def test_help_renders():
    text = parser().format_help()
    assert "--ckpt-strategy" in text and "--no-moevement-upstream-logging" in text


def test_unmappable_field_type_fails_loudly():
    @dataclasses.dataclass
    class Future:
        weights: typing.Dict[str, int] = dataclasses.field(default_factory=dict)

    field = dataclasses.fields(Future)[0]
    with pytest.raises(TypeError, match="_OVERRIDES"):
        margs._spec_for(field, typing.Dict[str, int], "")


@pytest.mark.parametrize(
    "text, value",
    [
        ("1024", 1024),
        ("64GiB", 64 * 2**30),
        ("64g", 64 * 2**30),
        ("500MB", 500e6),
        ("25GB/s", 25e9),
        ("2.5e10", 2.5e10),
        ("1.5 KiB", 1536),
    ],
)
def test_parse_byte_size(text, value):
    assert parse_byte_size(text) == value


@pytest.mark.parametrize("text", ["", "lots", "64XB", "-1G", "1e"])
def test_parse_byte_size_rejects(text):
    with pytest.raises(ValueError, match="byte size"):
        parse_byte_size(text)


def test_spare_hosts(monkeypatch):
    monkeypatch.setenv("MOEVEMENT_SPARES", "n9, n10")
    assert spare_hosts_from_args(parse()) == ["n9", "n10"]
    assert spare_hosts_from_args(parse("--moevement-spares", "a,,b")) == ["a", "b"]
    assert spare_hosts_from_args(parse("--moevement-spares", "")) == []


# ----------------------------------------------------------------------------- baselines

# One non-default command-line value per BaselineConfig policy field, and what it means.
BASELINE_NON_DEFAULT = {
    "interval": ("gemini", ["4"], 4),
    "expert_fraction": ("moc", ["0.5"], 0.5),
}


def test_strategies():
    assert MEGATRON_CKPT_STRATEGIES == ("default", "moevement", *BASELINE_STRATEGIES)
    assert MEGATRON_CKPT_STRATEGIES == ("default", "moevement", "gemini", "moc")
    for strategy in MEGATRON_CKPT_STRATEGIES:
        args = parse("--ckpt-strategy", strategy)
        assert args.ckpt_strategy == strategy
        assert moevement_enabled(args) is (strategy != "default")
    with pytest.raises(MoEvementArgsError, match="--ckpt-strategy"):
        moevement_enabled(argparse.Namespace(ckpt_strategy="checkfreq"))


def test_every_baseline_field_has_a_flag():
    options = parser()._option_string_actions
    fields = {f.name for f in dataclasses.fields(BaselineConfig)} - {"strategy"}
    assert set(baseline_field_flags()) == fields == set(BASELINE_NON_DEFAULT)
    assert baseline_flag_for_field("expert_fraction") == "--baseline-expert-fraction"
    defaults = BaselineConfig()
    for name in fields:
        flag = baseline_flag_for_field(name)
        assert flag in options and options[flag].help, flag
        assert getattr(defaults, name) != BASELINE_NON_DEFAULT[name][2], name
    assert "--baseline-strategy" not in options  # that is --ckpt-strategy
    assert "--baseline-interval" in parser().format_help()


def test_generated_flags_default_to_not_given():
    """None means "not given" (the config default applies), so a flag that was set can be told
    from one that was not."""
    args = vars(parse())
    generated = [d for d in args if d.startswith(("moevement_", "baseline_"))]
    assert len(generated) == len(config_field_flags()) + len(baseline_field_flags()) + 1
    assert all(args[d] is None for d in generated)


@pytest.mark.parametrize("strategy", ["default", "moevement"])
def test_no_baseline_config_without_a_baseline(strategy):
    assert baseline_config_from_args(parse("--ckpt-strategy", strategy)) is None


@pytest.mark.parametrize("strategy", BASELINE_STRATEGIES)
def test_baseline_config_defaults(strategy):
    args = parse("--ckpt-strategy", strategy)
    assert baseline_config_from_args(args) == BaselineConfig(strategy=strategy)
    assert moevement_config_from_args(args) == MoEvementConfig()


@pytest.mark.parametrize("name", sorted(BASELINE_NON_DEFAULT))
def test_baseline_config_values(name):
    strategy, values, value = BASELINE_NON_DEFAULT[name]
    args = parse("--ckpt-strategy", strategy, baseline_flag_for_field(name), *values)
    assert baseline_config_from_args(args) == BaselineConfig(strategy=strategy, **{name: value})


@pytest.mark.parametrize("strategy", BASELINE_STRATEGIES)
def test_baselines_get_the_shared_storage_settings(strategy):
    args = parse(
        "--ckpt-strategy",
        strategy,
        "--moevement-replication-factor",
        "2",
        "--moevement-checksum",
        "sha256",
        "--moevement-ranks-per-node",
        "8",
        # The values a baseline runs with anyway are accepted.
        "--moevement-window-size",
        "1",
        "--no-moevement-upstream-logging",
        "--moevement-recovery-scope",
        "global",
    )
    shared = moevement_config_from_args(args)
    assert (shared.replication_factor, shared.checksum, shared.ranks_per_node) == (2, "sha256", 8)
    effective = baseline_config_from_args(args).moevement_config(shared)
    assert (effective.window_size, effective.upstream_logging, effective.recovery_scope) == (
        1,
        False,
        "global",
    )


@pytest.mark.parametrize(
    "argv, flag",
    [
        # --baseline-* without a baseline
        (["--baseline-interval", "4"], "--baseline-interval"),
        (["--ckpt-strategy", "moevement", "--baseline-interval", "4"], "--baseline-interval"),
        (
            ["--ckpt-strategy", "default", "--baseline-expert-fraction", "0.5"],
            "--baseline-expert-fraction",
        ),
        (
            ["--ckpt-strategy", "moevement", "--baseline-expert-fraction", "0.5"],
            "--baseline-expert-fraction",
        ),
        # the other baseline's policy
        (
            ["--ckpt-strategy", "gemini", "--baseline-expert-fraction", "0.5"],
            "--baseline-expert-fraction",
        ),
        (["--ckpt-strategy", "moc", "--baseline-interval", "4"], "--baseline-interval"),
        # invalid values
        (["--ckpt-strategy", "gemini", "--baseline-interval", "0"], "--baseline-interval"),
        (["--ckpt-strategy", "gemini", "--baseline-interval", "-3"], "--baseline-interval"),
        (
            ["--ckpt-strategy", "moc", "--baseline-expert-fraction", "1.5"],
            "--baseline-expert-fraction",
        ),
        (
            ["--ckpt-strategy", "moc", "--baseline-expert-fraction", "0"],
            "--baseline-expert-fraction",
        ),
    ],
)
def test_baseline_flag_errors_name_the_flag(argv, flag):
    with pytest.raises(MoEvementArgsError, match=flag) as exc:
        baseline_config_from_args(parse(*argv))
    message = str(exc.value)
    assert "Fix:" in message and "BaselineConfig." not in message


@pytest.mark.parametrize(
    "strategy, argv, flag",
    [
        ("gemini", ["--moevement-window-size", "4"], "--moevement-window-size"),
        ("moc", ["--moevement-window-size", "auto"], "--moevement-window-size"),
        ("gemini", ["--moevement-upstream-logging"], "--moevement-upstream-logging"),
        ("moc", ["--moevement-recovery-scope", "auto"], "--moevement-recovery-scope"),
        (
            "gemini",
            ["--moevement-durable-dir", "/ckpt", "--moevement-durable-interval", "10"],
            "--moevement-durable-dir",
        ),
        ("moc", ["--moevement-durable-dir", "/ckpt"], "--moevement-durable-dir"),
        ("moc", ["--moevement-durable-interval", "10"], "--moevement-durable-interval"),
        # shared settings are validated as for MoEvement
        ("gemini", ["--moevement-replication-factor", "-1"], "--moevement-replication-factor"),
    ],
)
def test_moevement_flags_a_baseline_ignores_are_rejected(strategy, argv, flag):
    with pytest.raises(MoEvementArgsError, match=flag) as exc:
        moevement_config_from_args(parse("--ckpt-strategy", strategy, *argv))
    assert "Fix:" in str(exc.value)


def test_moevement_only_flags_are_fine_with_moevement():
    args = parse(
        "--ckpt-strategy",
        "moevement",
        "--moevement-window-size",
        "4",
        "--moevement-durable-dir",
        "/ckpt",
        "--moevement-durable-interval",
        "10",
    )
    cfg = moevement_config_from_args(args)
    assert cfg.window_size == 4 and cfg.durable_dir == "/ckpt"


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--baseline-interval", "two"], "--baseline-interval"),
        (["--baseline-interval", "1.5"], "--baseline-interval"),
        (["--baseline-expert-fraction", "most"], "--baseline-expert-fraction"),
        (["--ckpt-strategy", "checkfreq"], "--ckpt-strategy"),
    ],
)
def test_unparsable_baseline_values_are_argparse_errors(argv, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(*argv)
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err


def test_baseline_args_without_the_provider_are_rejected_clearly():
    with pytest.raises(MoEvementArgsError, match="extra_args_provider"):
        baseline_config_from_args(argparse.Namespace(num_layers=2))
    partial = parse("--ckpt-strategy", "gemini")
    del partial.baseline_interval
    with pytest.raises(MoEvementArgsError, match="--baseline-interval"):
        baseline_config_from_args(partial)
