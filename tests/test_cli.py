"""Tests for ``moevement-train demo --strategy`` (the baselines' demo runs are slow: ~25 s each)."""

import re

import pytest

from megatron_moevement import argtypes, cli


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--strategy", "gemini", "--window-size", "3"], "--window-size"),
        (["--strategy", "moc", "--window-size", "3"], "--window-size"),
        (["--baseline-interval", "2"], "--baseline-interval"),
        (["--strategy", "moevement", "--baseline-expert-fraction", "0.5"], "--baseline-expert"),
        (["--strategy", "moc", "--baseline-interval", "2"], "--baseline-interval"),
        (["--strategy", "gemini", "--baseline-expert-fraction", "0.5"], "--baseline-expert"),
        (["--strategy", "gemini", "--baseline-interval", "0"], "--baseline-interval"),
        (["--strategy", "moc", "--baseline-expert-fraction", "2"], "--baseline-expert-fraction"),
        (["--kill-iteration", "10"], "--kill-iteration"),  # the run has 10 iterations
        (["--layout", "tp2xdp1xep2"], "etp=2 does not divide"),  # ep x etp must divide tp x dp
        (["--layout", "pp3"], "num_layers=4 is not divisible by pp=3"),
        (["--layout", "pp2xzz2"], "pp2xzz2"),
        (["--layout", "single"], "at least 2 ranks"),
        (["--phase", "sideways"], "phase='sideways' is unknown; valid: before, model, build"),
        (["--phase", "microbatch4"], "phase='microbatch4' is unknown"),  # 4 microbatches: 0..3
        (["--kill-rank", "4"], "--kill-rank 4 is not a rank"),
    ],
)
def test_demo_rejects_bad_options_before_running(argv, match):
    with pytest.raises(SystemExit, match=match):
        cli.main(["demo", *argv])


def test_demo_policy_defaults():
    args = _demo_args("--strategy", "gemini")
    baseline, window = cli._demo_policy(args)
    assert (baseline.strategy, baseline.interval, window) == ("gemini", 4, 1)
    baseline, window = cli._demo_policy(_demo_args("--strategy", "moc"))
    assert (baseline.strategy, baseline.expert_fraction, window) == ("moc", 0.25, 1)
    assert cli._demo_policy(_demo_args()) == (None, cli.DEMO_WINDOW_SIZE)
    assert cli._demo_policy(_demo_args("--window-size", "2")) == (None, 2)


def _demo_args(*argv):
    """The demo's parsed arguments (main's parser, without running the demo)."""
    captured = {}

    def capture(args):
        captured["args"] = args
        return 0

    original = cli._demo
    cli._demo = capture
    try:
        cli.main(["demo", *argv])
    finally:
        cli._demo = original
    return captured["args"]


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.timeout(600)
def test_demo_gemini_is_bitwise_equal(tmp_path, capsys):
    assert cli.main(["demo", "--strategy", "gemini", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Gemini-like run (a dense snapshot every 4 iteration(s)" in out
    # The snapshot of iteration 4 is the newest before the kill in iteration 7.
    assert re.search(r"global\s+it 4\s+5,6", out)
    assert "bitwise equal: all 376 tensors" in out  # 360 + 16 RNG states (4 per rank)


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.timeout(600)
def test_demo_moc_reports_lost_tokens_and_is_not_bitwise_equal(tmp_path, capsys):
    assert cli.main(["demo", "--strategy", "moc", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "MoC-like run (non-expert state + 25% of the experts" in out
    match = re.search(r"lost tokens: (\d+) of (\d+) .* proportion of lost tokens ([\d.]+)%", out)
    assert match and int(match.group(1)) > 0 and 0 < float(match.group(3)) < 50
    assert "not bitwise equal, as expected for MoC" in out


# Every numeric option of ``moevement-train`` with values it must refuse: 0, negatives, NaN and
# words; the error names the option (no bad value is silently replaced by a default).
BAD_NUMBERS = {
    "--iterations": ["0", "-1", "ten"],
    "--num-layers": ["0", "-4"],
    "--num-experts": ["0", "-2"],
    "--hidden-size": ["0", "-64"],
    "--timeout": ["0", "-5", "nan", "soon"],
}
DEMO_BAD_NUMBERS = {
    "--window-size": ["0", "-1", "2.5"],
    "--kill-rank": ["-1", "one"],
    "--kill-iteration": ["-3"],
}


@pytest.mark.parametrize("command", ["train", "demo"])
@pytest.mark.parametrize(
    "option, value", [(o, v) for o, values in BAD_NUMBERS.items() for v in values]
)
def test_numeric_options_refuse_bad_values_naming_the_option(command, option, value, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([command, option, value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}:" in err and "invalid" in err


@pytest.mark.parametrize(
    "option, value", [(o, v) for o, values in DEMO_BAD_NUMBERS.items() for v in values]
)
def test_demo_options_refuse_bad_values_naming_the_option(option, value, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["demo", option, value])
    assert info.value.code == 2
    assert f"argument {option}:" in capsys.readouterr().err


MEGATRON_LM_BAD_NUMBERS = {"--timeout": ["0", "-1"], "--window-size": ["0"], "--kill-rank": ["-1"]}


@pytest.mark.parametrize(
    "option, value", [(o, v) for o, values in MEGATRON_LM_BAD_NUMBERS.items() for v in values]
)
def test_megatron_lm_options_refuse_bad_values_naming_the_option(option, value, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["megatron-lm", "/nowhere", option, value])
    assert info.value.code == 2
    assert f"argument {option}:" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--kill-rank", "4"], "ranks 0-3"),
        (["--kill-iteration", "8"], "not below --iterations 8"),
        (["--phase", "backward0x"], "phase"),
        ([], "is not a Megatron-LM tree"),
    ],
)
def test_megatron_lm_refuses_bad_input_before_running(tmp_path, argv, match):
    with pytest.raises(SystemExit, match=match):
        cli.main(["megatron-lm", str(tmp_path), *argv])


def test_every_numeric_option_is_in_the_table():
    commands = cli.build_parser()._subparsers._group_actions[0].choices
    typed = {
        action.option_strings[0]: action.type
        for sub in commands.values()
        for action in sub._actions
        if action.option_strings and action.type is not None
    }
    checked = (argtypes.POSITIVE_INT, argtypes.NON_NEGATIVE_INT, cli.POSITIVE_FLOAT)
    numeric = {option for option, kind in typed.items() if kind in checked}
    assert numeric == set(BAD_NUMBERS) | set(DEMO_BAD_NUMBERS) | set(MEGATRON_LM_BAD_NUMBERS)
    # No option takes a bare int/float (which would accept 0 and negatives); the --baseline-*
    # options are generated from the baseline config and validated by it
    # (tests/megatron/test_args.py walks every field).
    assert not [o for o, kind in typed.items() if kind in (int, float)]
