"""MoEvement in a custom Megatron-Core training loop (no harness, no Megatron-LM).

Builds an MoE ``GPTModel`` with Megatron-Core directly, wraps it in DDP, creates the Megatron
optimizer and trains with the pipeline schedule's ``forward_backward_func``. The loop talks to one
object, ``MoEvementStrategy``:

* ``MoEvementStrategy(gpt_model, optimizer, config)`` once, after the model is built;
* ``strategy.schedule_kwargs(iteration)`` handed to ``forward_backward_func`` (the upstream-logging
  p2p communicator when the job is pipeline-parallel, nothing otherwise);
* ``strategy.after_optimizer_step(iteration)`` once per iteration;
* ``strategy.recover()`` (or ``rollback_and_replay(target, train_step)``) to rebuild the dense
  state of the last (or ``target``) iteration from the persisted sparse checkpoint;
  ``train_step(iteration)``, given at construction, is the data accessor: it must train on the
  same microbatches as the original iteration.

At the end the example does exactly that for the last iteration and checks every parameter bit for
bit against the live state it replaced.

Run with one process, or several with torchrun-style variables (``--pp`` x ``--ep`` must divide
the world size; the rest is data parallelism)::

    RANK=0 WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 \\
        python examples/custom_training_loop.py --iterations 8
    torchrun --nproc-per-node 4 examples/custom_training_loop.py --pp 2 --ep 2
"""

import argparse
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_moevement.config import MoEvementConfig
from megatron_moevement.runtime import ensure_runtime
from megatron_moevement.strategy import MoEvementStrategy

VOCAB = 128


def build(args):
    """Megatron-Core parallel state, GPT MoE stage, DDP and optimizer for this rank."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.transformer_config import TransformerConfig

    parallel_state.initialize_model_parallel(
        pipeline_model_parallel_size=args.pp, expert_model_parallel_size=args.ep
    )
    # Same seed on every rank: data-parallel replicas must start identical (Megatron's DDP does
    # not broadcast parameters), and MoEvement shards a replicated operator's snapshot across them
    # (the strategy checks this and names the fix if they differ).
    torch.manual_seed(1234)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    config = TransformerConfig(
        num_layers=2 * args.pp,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        num_moe_experts=4,
        moe_router_topk=2,
        moe_token_dispatcher_type="alltoall",
        moe_aux_loss_coeff=1e-2,
        pipeline_model_parallel_size=args.pp,
        expert_model_parallel_size=args.ep,
        pipeline_dtype=torch.float32,
        use_cpu_initialization=not torch.cuda.is_available(),
        add_bias_linear=False,
        gradient_accumulation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        deterministic_mode=True,  # bit-exact replay needs deterministic kernels
    )
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(num_experts=4),
        vocab_size=VOCAB,
        max_sequence_length=args.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        position_embedding_type="rope",
    )
    if torch.cuda.is_available():
        gpt = gpt.cuda()
    model = DistributedDataParallel(config, DistributedDataParallelConfig(), gpt)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=1.0, weight_decay=0.01), [model]
    )
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = model.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    return gpt, model, optimizer


def batches(iteration: int, args):
    """Data addressed by (iteration, microbatch, data-parallel rank), so replay sees the same
    microbatches (every pipeline stage of a replica reads the same ones)."""
    from megatron.core import parallel_state

    dp_rank = parallel_state.get_data_parallel_rank()
    for mb in range(args.num_microbatches):
        g = torch.Generator().manual_seed(iteration * 1000 + mb * 10 + dp_rank)
        seq = torch.randint(0, VOCAB, (args.micro_batch_size, args.seq_length + 1), generator=g)
        yield seq[:, :-1], seq[:, 1:]


def forward_step(data_iterator, model):
    tokens, labels = next(data_iterator)
    device = next(model.parameters()).device
    tokens, labels = tokens.to(device), labels.to(device)
    positions = torch.arange(tokens.shape[1], device=device).expand_as(tokens)
    output = model(tokens, positions, None, labels=labels)

    def loss_func(output_tensor):
        loss = output_tensor.float().mean()
        return loss, {"lm loss": loss.detach().clone()}

    return output, loss_func


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    parser.add_argument(
        "--ep",
        type=int,
        default=None,
        help="expert-parallel size (default: all " "ranks of a pipeline stage)",
    )
    parser.add_argument("--window-size", type=int, default=3)
    parser.add_argument("--num-microbatches", type=int, default=4)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--seq-length", type=int, default=16)
    args = parser.parse_args()

    dist.init_process_group(
        "nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(seconds=120)
    )
    if torch.cuda.is_available():
        torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())
    ensure_runtime()  # CPU only: redirects Megatron-Core's CUDA-only paths (no-op with CUDA)
    args.ep = args.ep or dist.get_world_size() // args.pp
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    gpt, model, optimizer = build(args)
    config = MoEvementConfig(
        window_size=args.window_size, replication_factor=min(1, dist.get_world_size() - 1)
    )
    # train_step (below) is the data accessor the strategy replays with.
    strategy = MoEvementStrategy(gpt, optimizer, config, train_iteration=lambda it: train_step(it))
    forward_backward = get_forward_backward_func()
    last_stage = parallel_state.is_pipeline_last_stage()

    def train_step(iteration: int) -> float | None:
        model.zero_grad_buffer()
        optimizer.zero_grad()
        losses = forward_backward(
            forward_step_func=forward_step,
            data_iterator=batches(iteration, args),
            model=[model],
            num_microbatches=args.num_microbatches,
            seq_length=args.seq_length,
            micro_batch_size=args.micro_batch_size,
            forward_only=False,
            **strategy.schedule_kwargs(iteration),
        )
        optimizer.step()
        return float(torch.stack([d["lm loss"] for d in losses]).mean()) if last_stage else None

    for iteration in range(args.iterations):
        loss = train_step(iteration)
        strategy.after_optimizer_step(iteration)
        if last_stage and parallel_state.get_data_parallel_rank() == 0:
            print(f"iteration {iteration} loss {loss:.4f}", flush=True)
    strategy.flush()

    # Rebuild the dense state of the last iteration from the persisted sparse checkpoint.
    live = {name: p.detach().clone() for name, p in gpt.named_parameters()}
    report = strategy.recover()  # = rollback_and_replay(last iteration, train_step)
    differing = [
        name for name, p in gpt.named_parameters() if not torch.equal(live[name], p.detach())
    ]
    print(
        f"rank {dist.get_rank()}: replayed iterations {report.iterations_replayed} from window "
        f"starting at {report.window_start}; parameters bitwise equal: {not differing}",
        flush=True,
    )
    rank = dist.get_rank()
    strategy.shutdown()
    dist.destroy_process_group()
    if differing:
        raise SystemExit(f"rank {rank}: replay differs in {differing}")


if __name__ == "__main__":
    main()
