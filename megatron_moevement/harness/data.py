"""Synthetic language-model data addressable by (iteration, microbatch, data-parallel rank).

Replay must see exactly the microbatches the original run saw, so the data source is a pure
function of its address rather than a consumed iterator: any iteration can be produced again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass(frozen=True)
class MicrobatchAddress:
    """The coordinates of one microbatch in the training run."""

    iteration: int
    microbatch: int
    dp_rank: int


class SyntheticTokenData:
    """Deterministic token batches: a seeded generator per (iteration, microbatch, dp rank).

    The tokens follow a simple learnable pattern (each sequence is an arithmetic progression
    modulo the vocabulary with random start and stride) so that the loss visibly falls.
    """

    def __init__(self, vocab_size: int, seq_length: int, micro_batch_size: int, seed: int = 1234):
        self.vocab_size = vocab_size
        self.seq_length = seq_length
        self.micro_batch_size = micro_batch_size
        self.seed = seed

    def _generator(self, address: MicrobatchAddress) -> torch.Generator:
        gen = torch.Generator()
        key = (
            self.seed * 1_000_003
            + address.iteration * 10_007
            + address.microbatch * 101
            + address.dp_rank
        )
        gen.manual_seed(key & 0x7FFF_FFFF_FFFF_FFFF)
        return gen

    def batch(self, address: MicrobatchAddress) -> dict[str, torch.Tensor]:
        """Returns tokens, labels, loss mask and position ids of one microbatch."""
        gen = self._generator(address)
        b, s, v = self.micro_batch_size, self.seq_length, self.vocab_size
        start = torch.randint(0, v, (b, 1), generator=gen)
        stride = torch.randint(1, 4, (b, 1), generator=gen)
        seq = (start + stride * torch.arange(s + 1).unsqueeze(0)) % v
        return {
            "tokens": seq[:, :-1].contiguous(),
            "labels": seq[:, 1:].contiguous(),
            "loss_mask": torch.ones(b, s, dtype=torch.float32),
            "position_ids": torch.arange(s).unsqueeze(0).expand(b, s).contiguous(),
        }

    def iterator(self, iteration: int, num_microbatches: int, dp_rank: int) -> Iterator[dict]:
        """The microbatches of one iteration, in schedule order."""
        for mb in range(num_microbatches):
            yield self.batch(MicrobatchAddress(iteration, mb, dp_rank))
