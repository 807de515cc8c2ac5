"""HostBufferPool: one buffer per (window parity, slot), grown with headroom, oversize given back."""

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
