"""Megatron-Core training on the local harness: parallel state, model, DDP, optimizer, 1F1B.

:class:`HarnessTrainer` is what the tests, benchmarks and the demo run inside each worker process.
It uses Megatron-Core's own building blocks end to end: ``parallel_state``, ``GPTModel`` with MoE
layers (``SequentialMLP`` experts, top-k router, all-to-all dispatcher), ``Float16Module`` for
bf16/fp16, ``DistributedDataParallel``, ``get_megatron_optimizer`` (Adam, optionally distributed,
grad clipping on) and ``get_forward_backward_func()``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from megatron_moevement.harness.data import SyntheticTokenData
from megatron_moevement.harness.layout import ParallelLayout
from megatron_moevement.harness.model import (
    TinyMoEConfig,
    build_gpt_model,
    build_transformer_config,
)
from megatron_moevement.logging_utils import get_logger
from megatron_moevement.state.optim_view import OptimizerView
from megatron_moevement.state.rng import rng_state

logger = get_logger(__name__)


@dataclass
class IterationResult:
    """What one training iteration reports."""

    iteration: int
    loss: float | None
    """Mean LM loss over the microbatches (last pipeline stage only, else ``None``)."""
    grad_norm: float | None
    """Global gradient norm before clipping, as the optimizer computed it."""
    update_successful: bool
    """False when the optimizer skipped the step (fp16 overflow)."""


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.reshape(-1)
    loss = torch.sum(losses * mask) / mask.sum()
    # Clone: the schedule divides the returned loss in place by the number of microbatches.
    return loss, {"lm loss": loss.detach().clone()}


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(
        batch["tokens"],
        batch["position_ids"],
        None,
        labels=batch["labels"],
    )
    return output, partial(_loss_func, batch["loss_mask"])


class HarnessTrainer:
    """One rank's view of a Megatron-Core MoE training job (call after the process group exists).

    Implements the recovery driver's :class:`~megatron_moevement.recovery.driver.Trainer`
    protocol.

    Args:
        model_config: The model and training hyper-parameters.
        layout: The parallel layout; its world size must equal the process group's.
    """

    def __init__(self, model_config: TinyMoEConfig, layout: ParallelLayout) -> None:
        import torch.distributed as dist

        from megatron_moevement.runtime import ensure_runtime

        if not dist.is_initialized():
            raise RuntimeError(
                "HarnessTrainer needs torch.distributed initialized; start workers through "
                "megatron_moevement.harness.launcher or call init_process_group first"
            )
        if dist.get_world_size() != layout.world_size:
            raise ValueError(
                f"layout {layout} needs {layout.world_size} ranks but the process group has "
                f"{dist.get_world_size()}; launch with nprocs={layout.world_size}"
            )
        ensure_runtime()
        self.model_config = model_config
        self.layout = layout
        self.p2p_communicator = None
        """Optional custom ``P2PCommunicator`` (e.g. MoEvement's logging one) for the schedule."""
        self.pg_collection = None
        """The ``ProcessGroupCollection`` that goes with a custom communicator."""
        self.fault_point_hook: Callable[[int, str], None] | None = None
        """Optional ``f(iteration, point)`` for fault injection in tests and demos, called at
        ``microbatch<k>`` (before microbatch k's forward), ``backward<k>`` (when microbatch k's
        backward reaches this stage's output) and ``optimizer_step`` (gradients reduced, step not
        yet taken)."""
        self.setup_times: dict[str, float] = {}
        """Seconds of each setup step (process groups, model, DDP + optimizer): what a
        recovery's rebuild spends on this trainer."""
        self.data = SyntheticTokenData(
            model_config.vocab_size,
            model_config.seq_length,
            model_config.micro_batch_size,
            seed=model_config.seed,
        )
        self._setup()

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        from megatron.core import parallel_state, tensor_parallel
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from megatron.core.transformer.module import Float16Module

        cfg, layout = self.model_config, self.layout
        clock = time.perf_counter()
        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=layout.tp,
            pipeline_model_parallel_size=layout.pp,
            expert_model_parallel_size=layout.ep,
            expert_tensor_parallel_size=layout.expert_tp,
        )
        self.setup_times["process_groups"] = time.perf_counter() - clock
        clock = time.perf_counter()
        torch.manual_seed(cfg.seed)
        tensor_parallel.model_parallel_cuda_manual_seed(cfg.seed)

        self.transformer_config = build_transformer_config(cfg, layout)
        gpt = build_gpt_model(cfg, layout, self.transformer_config)
        self.gpt_model = gpt
        module: torch.nn.Module = gpt
        if cfg.precision in ("bf16", "fp16"):
            module = Float16Module(self.transformer_config, gpt)

        self.setup_times["model"] = time.perf_counter() - clock
        clock = time.perf_counter()
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=cfg.use_distributed_optimizer,
        )
        self.model = DistributedDataParallel(self.transformer_config, ddp_config, module)
        self.model_chunks = [self.model]

        opt_config = OptimizerConfig(
            optimizer="adam",
            lr=cfg.lr,
            weight_decay=0.0,
            clip_grad=cfg.clip_grad,
            bf16=cfg.precision == "bf16",
            fp16=cfg.precision == "fp16",
            params_dtype=cfg.params_dtype,
            use_distributed_optimizer=cfg.use_distributed_optimizer,
            loss_scale=(
                None if cfg.precision == "fp16" else 1.0 if cfg.precision == "bf16" else None
            ),
            initial_loss_scale=2.0**16,
        )
        self.optimizer = get_megatron_optimizer(opt_config, self.model_chunks)
        self.optimizer_view = OptimizerView(self.optimizer)
        self.setup_times["ddp_and_optimizer"] = time.perf_counter() - clock

        config = self.transformer_config
        config.grad_scale_func = self.optimizer.scale_loss
        config.no_sync_func = self.model.no_sync
        config.finalize_model_grads_func = finalize_model_grads
        self.forward_backward_func = get_forward_backward_func()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        self.ep_rank = parallel_state.get_expert_model_parallel_rank()
        self.is_last_stage = parallel_state.is_pipeline_last_stage()
        logger.debug(
            "harness ready: layout=%s dp=%d pp=%d ep=%d; setup %s",
            layout,
            self.dp_rank,
            self.pp_rank,
            self.ep_rank,
            " ".join(f"{k} {v:.3f}s" for k, v in self.setup_times.items()),
        )

    @property
    def num_microbatches(self) -> int:
        """Microbatches per iteration and data-parallel rank."""
        return self.model_config.num_microbatches

    # --------------------------------------------------------------- training
    def train_iteration(
        self,
        iteration: int,
        forward_step_func: Callable | None = None,
    ) -> IterationResult:
        """Runs one full iteration (all microbatches, grad sync, optimizer step) of ``iteration``.

        The data of the iteration is addressed by ``iteration``, so the same call can replay it.
        """
        cfg = self.model_config
        hook = self.fault_point_hook
        if forward_step_func is None and hook is not None:
            counter = iter(range(cfg.num_microbatches))

            def forward_step_func(data_iterator, model):
                mb = next(counter)
                hook(iteration, f"microbatch{mb}")
                output, loss_func = _forward_step(data_iterator, model)
                if output.requires_grad:
                    output.register_hook(lambda grad: hook(iteration, f"backward{mb}"))
                return output, loss_func

        for chunk in self.model_chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        data_iter = self.data.iterator(iteration, cfg.num_microbatches, self.dp_rank)
        extra = {}
        if self.p2p_communicator is not None and self.layout.pp > 1:
            if hasattr(self.p2p_communicator, "begin_iteration"):
                self.p2p_communicator.begin_iteration(iteration)
            extra = dict(p2p_communicator=self.p2p_communicator, pg_collection=self.pg_collection)
        losses = self.forward_backward_func(
            forward_step_func=forward_step_func or _forward_step,
            data_iterator=data_iter,
            model=self.model_chunks,
            num_microbatches=cfg.num_microbatches,
            seq_length=cfg.seq_length,
            micro_batch_size=cfg.micro_batch_size,
            forward_only=False,
            **extra,
        )
        if hook is not None:
            hook(iteration, "optimizer_step")
        update_successful, grad_norm, _ = self.optimizer.step()
        loss = None
        if self.is_last_stage and losses:
            loss = float(torch.stack([d["lm loss"] for d in losses]).mean())
        return IterationResult(
            iteration=iteration,
            loss=loss,
            grad_norm=None if grad_norm is None else float(grad_norm),
            update_successful=bool(update_successful),
        )

    # ------------------------------------------------------------------ state
    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """This stage's parameters, named as in the unwrapped ``GPTModel``."""
        return list(self.gpt_model.named_parameters())

    def capture_state(self) -> dict[str, torch.Tensor]:
        """A detached copy of every tensor of this rank's training state, by stable name.

        Keys: ``param/<name>`` (compute weights), ``main/<name>`` (FP32 main param or its shard),
        ``optim/<name>/<key>`` (optimizer state such as ``exp_avg``, ``exp_avg_sq``, ``step``),
        ``buffer/<name>`` (module buffers, e.g. the router's expert bias) and ``rng/<name>``
        (this rank's generator states): the same set the operator registry snapshots.
        """
        state: dict[str, torch.Tensor] = {}
        for name, param in self.named_parameters():
            state[f"param/{name}"] = param.detach().clone()
            pstate = self.optimizer_view.get(param)
            if pstate is None or pstate.main_param is None:
                continue
            state[f"main/{name}"] = pstate.main_param.detach().clone()
            for key, value in pstate.optimizer_state.items():
                if torch.is_tensor(value):
                    state[f"optim/{name}/{key}"] = value.detach().clone()
                else:
                    state[f"optim/{name}/{key}"] = torch.tensor(value)
        for name, buffer in self.gpt_model.named_buffers():
            state[f"buffer/{name}"] = buffer.detach().clone()
        for name, value in rng_state().items():
            state[f"rng/{name}"] = value
        return state


def build_replay_job(spec: dict) -> HarnessTrainer:
    """The durable converter's builder for checkpoints the harness wrote (``spec``: the
    ``model`` and ``layout`` fields, see :func:`replay_job_metadata`); call after the process
    group exists."""
    return HarnessTrainer(TinyMoEConfig.from_dict(spec["model"]), ParallelLayout(**spec["layout"]))


def replay_job_metadata(model: TinyMoEConfig, layout: ParallelLayout) -> dict:
    """What the harness records in ``strategy.durable.metadata["job"]`` so that
    ``moevement-convert`` can rebuild its job (:func:`build_replay_job`)."""
    return {
        "builder": f"{__name__}:build_replay_job",
        "spec": {"model": model.to_dict(), "layout": layout.to_dict()},
    }
