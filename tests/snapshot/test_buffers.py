"""HostBufferPool: one buffer per (window parity, slot), grown with headroom, oversize given back."""

import pytest
import torch

from megatron_moevement.snapshot.buffers import GROWTH_HEADROOM, HostBufferPool


def test_buffers_are_reused_across_windows_of_the_same_parity():
    pool = HostBufferPool()
    first = pool.get(0, 0, 1000)
    assert pool.get(2, 0, 900) is first and pool.allocations == 1
    assert pool.get(1, 0, 1000) is not first and pool.allocations == 2


def test_a_slot_that_grows_gets_headroom_so_small_drifts_do_not_reallocate():
    pool = HostBufferPool()
    pool.get(0, 0, 1000)
    grown = pool.get(2, 0, 1100)
    assert grown.numel() == int(1100 * (1 + GROWTH_HEADROOM))
    assert pool.get(4, 0, 1300) is grown and pool.allocations == 2


def test_a_buffer_far_larger_than_its_slot_is_given_back():
    pool = HostBufferPool()
    pool.get(0, 0, 10_000)  # e.g. the dense first window
    small = pool.get(2, 0, 1000)  # W grew: the slot is a tenth of it
    assert small.numel() == 1000 and pool.nbytes == 1000


def test_typed_views_are_cached_per_layout_and_rebuilt_when_it_changes():
    pool = HostBufferPool()
    buf = pool.get(0, 0, 256)
    layout = [(0, 16, torch.float32, (2, 2)), (64, 4, torch.bfloat16, (2,))]
    views = pool.typed_views(0, 0, layout)
    assert [(v.dtype, tuple(v.shape)) for v in views] == [
        (torch.float32, (2, 2)),
        (torch.bfloat16, (2,)),
    ]
    views[1].copy_(torch.tensor([1.5, -0.0], dtype=torch.bfloat16))
    assert torch.equal(
        buf[64:68], torch.tensor([1.5, -0.0], dtype=torch.bfloat16).view(torch.uint8)
    )
    assert pool.typed_views(2, 0, list(layout)) is views  # same parity, same layout: reused
    moved = pool.typed_views(0, 0, [(0, 16, torch.int32, (4,))])
    assert moved is not views and moved[0].dtype == torch.int32


def test_typed_views_follow_a_buffer_that_was_replaced():
    pool = HostBufferPool()
    pool.get(0, 0, 64)
    layout = [(0, 8, torch.float64, (1,))]
    old = pool.typed_views(0, 0, layout)
    grown = pool.get(2, 0, 1000)  # reallocated: the cached views point at the old buffer
    new = pool.typed_views(2, 0, layout)
    assert new is not old and new[0].data_ptr() == grown.data_ptr()
    pool.release_slots_from(0)
    with pytest.raises(KeyError):
        pool.typed_views(0, 0, layout)
