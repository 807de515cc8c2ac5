"""Every number a command line takes is validated when it is parsed: 0, negatives, NaN and
words are refused with argparse's error naming the option, for every CLI of the package."""

import argparse

import pytest

from megatron_moevement import argtypes, cli, convert
from megatron_moevement.megatron import elastic, launch_local
from megatron_moevement.profiler import __main__ as profiler
from megatron_moevement.sim import cli as sim_cli


def _parser_of(main, argv_prefix):
    """The parser ``main`` builds, captured when it parses (nothing runs)."""
    seen = {}
    original = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        seen.setdefault("parser", self)
        raise SystemExit(0)

    argparse.ArgumentParser.parse_args = capture
    try:
        with pytest.raises(SystemExit):
            main(list(argv_prefix))
    finally:
        argparse.ArgumentParser.parse_args = original
    return seen["parser"]


# (command, main, argv before the option, option, bad values, argv after)
TABLE = [
    ("moevement-train train", cli.main, ["train"], "--iterations", ["0", "-1", "x"], []),
    ("moevement-train demo", cli.main, ["demo"], "--timeout", ["0", "-5", "nan"], []),
    ("moevement-sim run", sim_cli.main, ["run"], "--trials", ["0", "-3"], []),
    ("moevement-sim run", sim_cli.main, ["run"], "--seed", ["-1", "abc"], []),
    ("profiler", profiler.main, [], "--iterations", ["0", "-8"], []),
    ("profiler", profiler.main, [], "--warmup", ["-1"], []),
    ("moevement-convert", convert.main, [], "--iteration", ["-1"], ["src", "out"]),
    ("moevement-convert", convert.main, [], "--timeout", ["0", "-1"], ["src", "out"]),
    ("launch_local", launch_local.main, [], "--nprocs", ["0", "-2"], ["script.py"]),
    ("launch_local", launch_local.main, ["--nprocs", "2"], "--spares", ["-1"], ["script.py"]),
    ("launch_local", launch_local.main, ["--nprocs", "2"], "--timeout", ["0"], ["script.py"]),
    (
        "launch_local",
        launch_local.main,
        ["--nprocs", "2"],
        "--replication-factor",
        ["-1"],
        ["script.py"],
    ),
    ("elastic agent", elastic.main, [], "--timeout", ["0", "-1"], ["--", "worker"]),
]


@pytest.mark.parametrize(
    "command, main, before, option, value, after",
    [(c, m, b, o, v, a) for c, m, b, o, values, a in TABLE for v in values],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_bad_numbers_are_refused_naming_the_option(
    command, main, before, option, value, after, capsys
):
    with pytest.raises(SystemExit) as info:
        main([*before, option, value, *after])
    assert info.value.code == 2, command
    err = capsys.readouterr().err
    assert f"argument {option}:" in err and "invalid" in err, err


@pytest.mark.parametrize(
    "main, prefix",
    [
        (sim_cli.main, ["run"]),
        (profiler.main, []),
        (convert.main, ["a", "b"]),
        (launch_local.main, ["--nprocs", "1", "s.py"]),
        (elastic.main, ["--", "w"]),
    ],
)
def test_no_command_line_takes_an_unchecked_number(main, prefix):
    parser = _parser_of(main, prefix)
    actions = list(parser._actions)
    for sub in getattr(parser, "_subparsers", None) and parser._subparsers._group_actions or []:
        for p in getattr(sub, "choices", {}).values():
            actions += p._actions
    assert not [a.option_strings for a in actions if a.type in (int, float)]
    checked = (argtypes.POSITIVE_INT, argtypes.NON_NEGATIVE_INT, argtypes.POSITIVE_FLOAT)
    typed = {a.option_strings[0] for a in actions if a.type in checked}
    assert typed == {o for _, m, _, o, _, _ in TABLE if m is main}  # the table covers them all
