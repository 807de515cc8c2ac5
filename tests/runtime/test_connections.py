"""Severing connections: only the ones named, and without leaking descriptors."""

import os
import socket

import pytest

from megatron_moevement.runtime.connections import connections_to_port, sever_fds


@pytest.fixture
def server():
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    yield listener
    listener.close()


def _connect(server):
    client = socket.create_connection(server.getsockname())
    peer, _ = server.accept()
    return client, peer


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_listing_connections_leaks_no_descriptor(server, tmp_path):
    # Each descriptor is duplicated to be inspected; a duplicate of a file (not a socket) must be
    # closed again, or every teardown would double the process's open descriptors (it did).
    files = [open(tmp_path / f"f{i}", "w") for i in range(8)]
    client, peer = _connect(server)
    before = _open_fds()
    for _ in range(5):
        assert connections_to_port(server.getsockname()[1]) == {client.fileno()}
        assert sever_fds({client.fileno()}, port=1) == 0  # not connected to port 1: left alone
    assert _open_fds() == before
    client.send(b"x")
    assert peer.recv(1) == b"x"
    for f in (*files, client, peer):
        f.close()


def test_only_the_named_connection_to_the_port_is_shut_down(server):
    port = server.getsockname()[1]
    (a, a_peer), (b, b_peer) = _connect(server), _connect(server)
    assert connections_to_port(port) == {a.fileno(), b.fileno()}
    assert sever_fds({a.fileno()}, port) == 1
    assert a_peer.recv(1) == b""  # the peer of the severed connection sees it closed
    with pytest.raises(OSError):
        a.send(b"x")
    b.send(b"y")
    assert b_peer.recv(1) == b"y"
    for s in (a, a_peer, b, b_peer):
        s.close()
