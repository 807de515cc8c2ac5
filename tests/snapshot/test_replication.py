import pytest

from megatron_moevement.snapshot.replication import ReplicationError, choose_peers, sources_of


def test_peers_prefer_other_nodes():
    # 4 nodes x 8 ranks: rank 3's first peers are rank 3 of the next nodes.
    assert choose_peers(3, 32, 2, 8) == [11, 19]
    assert all(p // 8 != 3 // 8 for p in choose_peers(3, 32, 3, 8))


def test_single_node_falls_back_to_ring_neighbours():
    assert choose_peers(0, 4, 1, 4) == [1]
    assert choose_peers(3, 4, 2, 4) == [0, 1]


def test_sources_are_the_inverse_of_peers():
    world, r, per_node = 16, 2, 4
    for rank in range(world):
        for source in sources_of(rank, world, r, per_node):
            assert rank in choose_peers(source, world, r, per_node)
    # Every rank's shard has exactly r replicas.
    holders = [
        sum(rank in choose_peers(s, world, r, per_node) for s in range(world))
        for rank in range(world)
    ]
    assert holders == [r] * world


def test_replication_disabled_or_alone():
    assert choose_peers(0, 8, 0, 8) == []
    assert choose_peers(0, 1, 1, 1) == []


def test_too_many_replicas_is_a_clear_error():
    with pytest.raises(ReplicationError, match="replication_factor"):
        choose_peers(0, 3, 3, 3)
