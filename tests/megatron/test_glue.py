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
        self.persisted_checkpoint = type("Ckpt", (), dict(generation=4, start_iteration=12))()


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
