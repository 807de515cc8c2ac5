"""Tests for the functions the Megatron-LM patch calls (with fakes for the distributed parts)."""

import argparse
import logging

import pytest
import torch

from megatron_moevement.config import MoEvementConfig
from megatron_moevement.megatron import glue
from megatron_moevement.megatron.args import MoEvementArgsError
from megatron_moevement.megatron.glue import MoEvementIntegrationError


class FakeGPT(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 2)


class FakeDDP(torch.nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module


class FakeFloat16Module(torch.nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module


class FakeStrategy:
    def __init__(self, gpt_model, optimizer, config):
        self.gpt_model, self.optimizer, self.config = gpt_model, optimizer, config
        self.iterations = []
        self.shut_down = False

    def after_optimizer_step(self, iteration):
        self.iterations.append(iteration)

    def shutdown(self):
        self.shut_down = True


class FakeCommunicator:
    def __init__(self):
        self.iterations = []

    def begin_iteration(self, iteration):
        self.iterations.append(iteration)


class FakeStrategyWithP2P(FakeStrategy):
    """A strategy of a pipeline-parallel job: it has a logging communicator."""

    def __init__(self, *a):
        super().__init__(*a)
        self.p2p_communicator = FakeCommunicator()
        self.pg_collection = "the-pg-collection"


class FakeRegistry:
    refreshed = 0

    def refresh(self):
        self.refreshed += 1


class FakeStrategyWithState(FakeStrategy):
    def __init__(self, *a):
        super().__init__(*a)
        self.registry = FakeRegistry()
        self.persisted_checkpoint = type("Ckpt", (), dict(window=4, start_iteration=12))()


@pytest.fixture(autouse=True)
def fresh_glue_state():
    glue._reset_state_for_tests()
    yield
    glue._reset_state_for_tests()


def megatron_args(*argv):
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--load", default=None)
    parser.add_argument("--use-torch-fsdp2", action="store_true")
    parser.add_argument("--iterations-to-skip", nargs="+", type=int, default=[])
    return glue.extra_args_provider()(parser).parse_args(list(argv))


def wrapped_model(gpt=None):
    return [FakeDDP(FakeFloat16Module(gpt or FakeGPT()))]


def build(args, model=None, optimizer="opt", factory=FakeStrategy):
    model = model if model is not None else wrapped_model()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(glue, "_default_gpt_model_types", lambda: (FakeGPT,))
        return glue.maybe_build_strategy(args, model, optimizer, strategy_factory=factory)


# ----------------------------------------------------------------------------- args provider


def test_extra_args_provider_chains_other_providers():
    def modelopt(parser):
        parser.add_argument("--export-te-mcore-model", action="store_true")
        return parser

    def returns_none(parser):
        parser.add_argument("--other")

    provider = glue.extra_args_provider(modelopt, None, returns_none)
    args = provider(argparse.ArgumentParser()).parse_args(
        ["--export-te-mcore-model", "--other", "x", "--ckpt-strategy", "moevement"]
    )
    assert args.export_te_mcore_model and args.other == "x" and glue.moevement_requested(args)


def test_extra_args_provider_rejects_non_callables():
    with pytest.raises(TypeError, match="not callable"):
        glue.extra_args_provider("add_modelopt_args")


def test_args_without_provider_count_as_default():
    assert not glue.moevement_requested(argparse.Namespace(num_layers=4))
    assert not glue.moevement_requested(megatron_args())
    assert glue.moevement_requested(megatron_args("--ckpt-strategy", "moevement"))


# ----------------------------------------------------------------------------- unwrapping


def test_unwrap_model_list_ddp_float16():
    gpt = FakeGPT()
    assert glue.unwrap_gpt_model(wrapped_model(gpt), (FakeGPT,)) is gpt
    assert glue.unwrap_gpt_model(FakeDDP(gpt), (FakeGPT,)) is gpt
    assert glue.unwrap_gpt_model((gpt,), (FakeGPT,)) is gpt
    assert glue.unwrap_gpt_model(gpt, (FakeGPT,)) is gpt


def test_unwrap_rejects_virtual_pipeline_and_empty_lists():
    with pytest.raises(MoEvementIntegrationError, match="virtual pipeline"):
        glue.unwrap_gpt_model([FakeDDP(FakeGPT()), FakeDDP(FakeGPT())], (FakeGPT,))
    with pytest.raises(MoEvementIntegrationError, match="empty"):
        glue.unwrap_gpt_model([], (FakeGPT,))


def test_unwrap_without_gpt_names_the_wrappers():
    with pytest.raises(MoEvementIntegrationError) as exc:
        glue.unwrap_gpt_model([FakeDDP(torch.nn.Linear(2, 2))], (FakeGPT,))
    assert "FakeDDP -> Linear" in str(exc.value) and "Fix:" in str(exc.value)


@pytest.mark.filterwarnings("ignore::UserWarning")  # TE/apex absent on this machine
def test_unwrap_with_megatron_core_classes():
    """The default target is Megatron-Core's GPTModel, inside its real wrapper classes (built
    without their constructors, which need a distributed job)."""
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.module import Float16Module

    def bare(cls, inner=None):
        obj = cls.__new__(cls)
        torch.nn.Module.__init__(obj)
        if inner is not None:
            obj.module = inner
        return obj

    gpt = bare(GPTModel)
    assert glue.unwrap_gpt_model([bare(DistributedDataParallel, bare(Float16Module, gpt))]) is gpt
    with pytest.raises(MoEvementIntegrationError, match="GPTModel"):
        glue.unwrap_gpt_model([bare(DistributedDataParallel, FakeGPT())])


# ----------------------------------------------------------------------------- building


def test_disabled_strategy_returns_none_without_building():
    def explode(*_):
        raise AssertionError("must not build")

    assert build(megatron_args(), factory=explode) is None
    assert build(argparse.Namespace(), factory=explode) is None
    assert glue.active_strategy() is None


def test_enabled_strategy_is_built_on_the_unwrapped_model():
    gpt = FakeGPT()
    args = megatron_args("--ckpt-strategy", "moevement", "--moevement-window-size", "3")
    strategy = build(args, model=wrapped_model(gpt), optimizer="the-optimizer")
    assert isinstance(strategy, FakeStrategy)
    assert strategy.gpt_model is gpt and strategy.optimizer == "the-optimizer"
    assert strategy.config == MoEvementConfig(window_size=3)
    assert glue.active_strategy() is strategy


def test_no_optimizer_means_no_strategy(caplog):
    args = megatron_args("--ckpt-strategy", "moevement")
    with caplog.at_level(logging.WARNING):
        assert build(args, optimizer=None) is None
    assert "--skip-train" in caplog.text


def test_invalid_flags_fail_at_build_naming_the_flag():
    args = megatron_args("--ckpt-strategy", "moevement", "--moevement-ema-decay", "2")
    with pytest.raises(MoEvementArgsError, match="--moevement-ema-decay"):
        build(args)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--use-torch-fsdp2"], "--use-torch-fsdp2"),
        (["--iterations-to-skip", "5"], "--iterations-to-skip"),
    ],
)
def test_unsupported_megatron_options_are_rejected(argv, match):
    with pytest.raises(MoEvementIntegrationError, match=match):
        build(megatron_args("--ckpt-strategy", "moevement", *argv))


def test_virtual_pipeline_is_rejected_at_build():
    with pytest.raises(MoEvementIntegrationError, match="virtual pipeline"):
        build(megatron_args("--ckpt-strategy", "moevement"), model=wrapped_model() * 2)


def test_rebuilding_replaces_the_active_strategy(caplog):
    args = megatron_args("--ckpt-strategy", "moevement")
    first = build(args)
    with caplog.at_level(logging.WARNING):
        second = build(args)
    assert glue.active_strategy() is second is not first
    assert "in-process restart" in caplog.text


# ----------------------------------------------------------------------------- per-step calls


def test_after_optimizer_step():
    glue.after_optimizer_step(None, 3)  # disabled: no-op
    strategy = build(megatron_args("--ckpt-strategy", "moevement"))
    glue.after_optimizer_step(strategy, 0)
    glue.after_optimizer_step(strategy, 1)
    assert strategy.iterations == [0, 1]
    for bad in (-1, 1.0, True, "2"):
        with pytest.raises(ValueError, match="iteration"):
            glue.after_optimizer_step(strategy, bad)


def test_strategy_from_context():
    assert glue.strategy_from(None) is None
    assert glue.strategy_from({}) is None
    assert glue.strategy_from({glue.CONTEXT_KEY: "s"}) == "s"


def test_install_p2p_logging_reports_whether_sends_are_logged(caplog):
    assert glue.install_p2p_logging(None) is False
    off = build(
        megatron_args("--ckpt-strategy", "moevement", "--no-moevement-upstream-logging"),
        factory=FakeStrategyWithP2P,
    )
    assert glue.install_p2p_logging(off) is False
    no_pipeline = build(megatron_args("--ckpt-strategy", "moevement"))  # PP=1: no communicator
    with caplog.at_level(logging.INFO):
        assert glue.install_p2p_logging(no_pipeline) is False
    assert "no pipeline parallelism" in caplog.text
    strategy = build(megatron_args("--ckpt-strategy", "moevement"), factory=FakeStrategyWithP2P)
    assert glue.install_p2p_logging(strategy) is True


def fake_forward_backward_func(**kwargs):
    fake_forward_backward_func.calls.append(kwargs)
    return ["losses"]


def test_wrap_forward_backward_func_hands_the_logging_communicator_to_train_step():
    fake_forward_backward_func.calls = []
    args = argparse.Namespace(curr_iteration=None)
    assert glue.wrap_forward_backward_func(fake_forward_backward_func, None, args) is (
        fake_forward_backward_func
    )
    plain = build(megatron_args("--ckpt-strategy", "moevement"))
    assert glue.wrap_forward_backward_func(fake_forward_backward_func, plain, args) is (
        fake_forward_backward_func
    )
    strategy = build(megatron_args("--ckpt-strategy", "moevement"), factory=FakeStrategyWithP2P)
    wrapped = glue.wrap_forward_backward_func(fake_forward_backward_func, strategy, args)
    assert wrapped.__wrapped__ is fake_forward_backward_func
    # As Megatron-LM's train() and train_step() call it:
    for iteration in (7, 8, 8):  # the rerun state machine may run an iteration twice
        args.curr_iteration = iteration
        assert wrapped(
            forward_step_func="f",
            data_iterator="d",
            model=["m"],
            num_microbatches=4,
            seq_length=16,
            micro_batch_size=1,
            decoder_seq_length=None,
            forward_only=False,
            adjust_tensor_shapes_fn=None,
            force_all_reduce=False,
        ) == ["losses"]
    assert strategy.p2p_communicator.iterations == [7, 8, 8]
    last = fake_forward_backward_func.calls[-1]
    assert last["p2p_communicator"] is strategy.p2p_communicator
    assert last["pg_collection"] == "the-pg-collection" and last["num_microbatches"] == 4
    # Evaluation (forward only) is passed through untouched.
    wrapped(model=["m"], forward_only=True)
    assert "p2p_communicator" not in fake_forward_backward_func.calls[-1]
    assert strategy.p2p_communicator.iterations == [7, 8, 8]


def test_wrap_forward_backward_func_errors():
    strategy = build(megatron_args("--ckpt-strategy", "moevement"), factory=FakeStrategyWithP2P)
    wrapped = glue.wrap_forward_backward_func(
        fake_forward_backward_func, strategy, argparse.Namespace(curr_iteration=None)
    )
    with pytest.raises(MoEvementIntegrationError, match="curr_iteration"):
        wrapped(forward_only=False)
    wrapped = glue.wrap_forward_backward_func(
        fake_forward_backward_func, strategy, argparse.Namespace(curr_iteration=3)
    )
    with pytest.raises(MoEvementIntegrationError, match="own p2p_communicator"):
        wrapped(forward_only=False, p2p_communicator="other")


def test_wrap_forward_backward_func_with_megatron_schedule_signature():
    """The keywords the wrapper adds are parameters of Megatron-Core 0.16.1's 1F1B schedule."""
    import inspect

    from megatron.core.pipeline_parallel.schedules import (
        forward_backward_pipelining_without_interleaving as one_f_one_b,
    )

    params = inspect.signature(one_f_one_b).parameters
    assert "p2p_communicator" in params and "pg_collection" in params


def test_shutdown():
    glue.shutdown(None)
    strategy = build(megatron_args("--ckpt-strategy", "moevement"))
    glue.shutdown(strategy)
    assert strategy.shut_down and glue.active_strategy() is None


# ----------------------------------------------------------------------------- restore routing


def fake_load(model, optimizer, scheduler, checkpointing_context=None):
    fake_load.calls.append((model, optimizer, scheduler, checkpointing_context))
    return 120, 3.5e15


def test_recover_or_load_passes_through_when_disabled():
    fake_load.calls = []
    result = glue.recover_or_load(
        megatron_args(), fake_load, "m", "o", "s", checkpointing_context={}
    )
    assert result == (120, 3.5e15) and fake_load.calls == [("m", "o", "s", {})]
    assert glue.last_restore() is None


def test_recover_or_load_builds_the_strategy_first_and_loads_through_it(caplog):
    fake_load.calls = []
    order = []
    gpt = FakeGPT()
    model = wrapped_model(gpt)

    class Strategy(FakeStrategyWithState):
        def __init__(self, *a):
            order.append("strategy built")
            super().__init__(*a)

    def load(model_, optimizer, scheduler, checkpointing_context=None):
        order.append("load")
        assert glue.active_strategy() is not None  # the load goes through the strategy
        return 120, 3.5e15

    args = megatron_args("--ckpt-strategy", "moevement", "--load", "/ckpt")
    with pytest.MonkeyPatch.context() as mp, caplog.at_level(logging.INFO):
        mp.setattr(glue, "_default_gpt_model_types", lambda: (FakeGPT,))
        mp.setattr(glue, "_build_strategy", Strategy)
        result = glue.recover_or_load(args, load, model, "opt", "sched", checkpointing_context={})
        # pretrain() then gets the very same strategy, not a second one.
        strategy = glue.maybe_build_strategy(args, model, "opt")
    assert result == (120, 3.5e15) and order == ["strategy built", "load"]
    assert strategy is glue.active_strategy() and strategy.gpt_model is gpt
    assert strategy.registry.refreshed == 1  # the load may have replaced optimizer tensors
    report = glue.last_restore()
    assert report.source == "megatron_checkpoint" and report.iteration == 120
    assert "/ckpt" in report.detail and "through the MoEvement strategy" in report.detail
    assert [t for t, _ in report.tiers] == ["durable"]
    assert "does not run inside Megatron-LM's loop" in caplog.text


def test_recover_or_load_without_optimizer_loads_plainly():
    fake_load.calls = []
    args = megatron_args("--ckpt-strategy", "moevement")
    assert glue.recover_or_load(args, fake_load, wrapped_model(), None, None) == (120, 3.5e15)
    assert glue.active_strategy() is None and len(fake_load.calls) == 1


def test_recover_or_load_reports_a_strategy_left_by_an_in_process_restart(caplog):
    fake_load.calls = []
    args = megatron_args("--ckpt-strategy", "moevement")
    old = build(args, factory=FakeStrategyWithState)
    with pytest.MonkeyPatch.context() as mp, caplog.at_level(logging.WARNING):
        mp.setattr(glue, "_default_gpt_model_types", lambda: (FakeGPT,))
        mp.setattr(glue, "_build_strategy", FakeStrategy)
        glue.recover_or_load(args, fake_load, wrapped_model(), "opt2", "s")
    assert glue.active_strategy() is not old
    assert "in-process restart" in caplog.text and "window 4" in caplog.text
    tiers = dict(glue.last_restore().tiers)
    assert "discarded" in tiers["in-memory"] and "iteration 120" in tiers["durable"]


# ----------------------------------------------------------------------------- baselines


@pytest.mark.parametrize(
    "argv, name, requested",
    [
        ([], "default", False),
        (["--ckpt-strategy", "moevement"], "moevement", True),
        (["--ckpt-strategy", "gemini"], "gemini", True),
        (["--ckpt-strategy", "moc"], "moc", True),
    ],
)
def test_requested_strategy(argv, name, requested):
    args = megatron_args(*argv)
    assert glue.requested_strategy(args) == name
    assert glue.moevement_requested(args) is requested
    assert glue.requested_strategy(argparse.Namespace(num_layers=2)) == "default"


@pytest.mark.parametrize(
    "argv, baseline",
    [
        (["--ckpt-strategy", "gemini", "--baseline-interval", "4"], dict(interval=4)),
        (
            ["--ckpt-strategy", "moc", "--baseline-expert-fraction", "0.5"],
            dict(expert_fraction=0.5),
        ),
        (["--ckpt-strategy", "moc"], dict()),
    ],
)
def test_baselines_are_built_through_build_strategy(argv, baseline, monkeypatch, caplog):
    """The default factory hands the --baseline-* policy and the shared --moevement-* settings
    to baselines.build_strategy; the factory hook keeps its f(gpt_model, optimizer, config)
    signature."""
    import megatron_moevement.baselines as baselines
    from megatron_moevement.baselines import BaselineConfig

    calls = []

    def fake_build_strategy(name, gpt_model, optimizer, config, baseline=None):
        calls.append((name, gpt_model, optimizer, config, baseline))
        return FakeStrategy(gpt_model, optimizer, baseline.moevement_config(config))

    monkeypatch.setattr(baselines, "build_strategy", fake_build_strategy)
    gpt = FakeGPT()
    args = megatron_args(*argv, "--moevement-replication-factor", "2")
    with caplog.at_level(logging.INFO):
        strategy = build(args, model=wrapped_model(gpt), optimizer="opt", factory=None)
    name = argv[1]
    assert len(calls) == 1
    called_name, called_gpt, optimizer, config, policy = calls[0]
    assert (called_name, called_gpt, optimizer) == (name, gpt, "opt")
    assert config == MoEvementConfig(replication_factor=2)  # the shared settings
    assert policy == BaselineConfig(strategy=name, **baseline)
    assert glue.active_strategy() is strategy
    assert strategy.config.window_size == 1 and not strategy.config.upstream_logging
    assert f"--ckpt-strategy {name}" in caplog.text
    # A fake factory sees the same shared config (the policy is closed over by the default).
    glue._reset_state_for_tests()
    fake = build(args, factory=FakeStrategy)
    assert fake.config == MoEvementConfig(replication_factor=2)


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--baseline-interval", "4"], "--baseline-interval"),
        (["--ckpt-strategy", "moevement", "--baseline-expert-fraction", "0.5"], "--baseline-"),
        (["--ckpt-strategy", "gemini", "--baseline-expert-fraction", "0.5"], "--baseline-"),
        (["--ckpt-strategy", "moc", "--baseline-interval", "2"], "--baseline-interval"),
        (["--ckpt-strategy", "gemini", "--baseline-interval", "0"], "--baseline-interval"),
        (["--ckpt-strategy", "gemini", "--moevement-window-size", "4"], "--moevement-window-size"),
        (
            ["--ckpt-strategy", "moc", "--moevement-durable-dir", "/d"],
            "--moevement-durable-dir",
        ),
    ],
)
def test_baseline_flag_errors_fail_at_build_and_before_the_load(argv, flag):
    def explode(*_):
        raise AssertionError("must not build")

    with pytest.raises(MoEvementArgsError, match=flag):
        build(megatron_args(*argv), factory=explode)
    fake_load.calls = []
    with pytest.raises(MoEvementArgsError, match=flag):
        glue.recover_or_load(megatron_args(*argv), fake_load, wrapped_model(), "opt", None)
    assert fake_load.calls == []  # the error comes before a long load


def test_unsupported_options_name_the_strategy():
    with pytest.raises(MoEvementIntegrationError, match="--ckpt-strategy moc does not support"):
        build(megatron_args("--ckpt-strategy", "moc", "--use-torch-fsdp2"))


def test_recover_or_load_through_a_baseline(monkeypatch):
    import megatron_moevement.baselines as baselines

    monkeypatch.setattr(
        baselines,
        "build_strategy",
        lambda name, g, o, c, b=None: FakeStrategyWithState(g, o, b.moevement_config(c)),
    )
    args = megatron_args("--ckpt-strategy", "gemini", "--load", "/ckpt")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(glue, "_default_gpt_model_types", lambda: (FakeGPT,))
        fake_load.calls = []
        assert glue.recover_or_load(args, fake_load, wrapped_model(), "opt", "s") == (120, 3.5e15)
    assert glue.active_strategy().registry.refreshed == 1
    assert "through the Gemini-like strategy" in glue.last_restore().detail


def _real_strategies_job(out: str) -> None:
    """One rank of a PP2 job (2 processes): builds MoEvement and both baselines through the glue
    on the harness's real Megatron-Core model, optimizer and 1F1B schedule, trains 3 iterations
    with each through the wrapped schedule, and writes what it saw."""
    import json
    from pathlib import Path

    import torch.distributed as dist

    from megatron_moevement.harness.layout import ParallelLayout
    from megatron_moevement.harness.model import TinyMoEConfig
    from megatron_moevement.harness.trainer import HarnessTrainer

    dist.init_process_group("gloo")
    trainer = HarnessTrainer(TinyMoEConfig(), ParallelLayout(pp=2))
    schedule = trainer.forward_backward_func
    seen = {}
    for argv in (
        ["--ckpt-strategy", "moevement", "--moevement-window-size", "2"],
        ["--ckpt-strategy", "gemini", "--baseline-interval", "2"],
        ["--ckpt-strategy", "moc", "--baseline-expert-fraction", "0.5"],
    ):
        args = megatron_args(*argv, "--moevement-replication-factor", "1")
        args.curr_iteration = None
        strategy = glue.maybe_build_strategy(args, trainer.model_chunks, trainer.optimizer)
        wrapped = glue.wrap_forward_backward_func(schedule, strategy, args)
        trainer.forward_backward_func = wrapped
        for iteration in range(3):
            args.curr_iteration = iteration
            trainer.train_iteration(iteration)
            glue.after_optimizer_step(strategy, iteration)
        baseline = getattr(strategy, "baseline", None)
        seen[argv[1]] = dict(
            type=type(strategy).__name__,
            is_active=glue.active_strategy() is strategy,
            wrapped=wrapped is not schedule,
            p2p_logging=glue.install_p2p_logging(strategy),
            has_communicator=strategy.p2p_communicator is not None,
            window_size=strategy.config.window_size,
            upstream_logging=strategy.config.upstream_logging,
            recovery_scope=strategy.config.recovery_scope,
            replication_factor=strategy.config.replication_factor,
            baseline=None if baseline is None else baseline.to_dict(),
            snapshots_taken=strategy.snapshots_taken,
        )
        trainer.forward_backward_func = schedule
        glue.shutdown(strategy)
    Path(out, f"rank{dist.get_rank()}.json").write_text(json.dumps(seen))
    dist.destroy_process_group()


@pytest.mark.multiproc
def test_real_baseline_strategies_through_the_glue(tmp_path):
    """On a real PP2 Megatron-Core job: --ckpt-strategy gemini / moc build the baseline classes
    with their policy, run without upstream logging (the schedule is not wrapped, unlike
    MoEvement's) and snapshot as their policy says."""
    import json
    from pathlib import Path

    from megatron_moevement.launch.local import LocalJob

    repo = Path(__file__).resolve().parents[2]
    with LocalJob(
        2,
        "tests.megatron.test_glue",
        [str(tmp_path)],
        log_dir=tmp_path,
        env={"PYTHONPATH": str(repo)},
    ) as job:
        job.check(timeout=240)
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        moevement, gemini, moc = seen["moevement"], seen["gemini"], seen["moc"]
        assert moevement["type"] == "MoEvementStrategy"
        assert moevement["wrapped"] and moevement["has_communicator"] and moevement["p2p_logging"]
        assert gemini["type"] == "DenseSnapshotStrategy"
        assert gemini["baseline"] == dict(strategy="gemini", interval=2, expert_fraction=0.25)
        assert gemini["snapshots_taken"] == 2  # after iterations 0 and 2
        assert moc["type"] == "PartialExpertStrategy"
        assert moc["baseline"]["expert_fraction"] == 0.5 and moc["snapshots_taken"] == 3
        for baseline in (gemini, moc):
            assert baseline["is_active"]
            assert not baseline["wrapped"] and not baseline["has_communicator"]
            assert not baseline["p2p_logging"]
            assert (baseline["window_size"], baseline["upstream_logging"]) == (1, False)
            assert baseline["recovery_scope"] == "global"
            assert baseline["replication_factor"] == 1


if __name__ == "__main__":
    import sys

    _real_strategies_job(sys.argv[1])
