"""Severing a gloo process group's TCP connections after a failure.

Measured on torch 2.13 (CPU/gloo): neither ``ProcessGroup.abort()`` nor
``destroy_process_group()`` closes gloo's TCP pairs while anything still references the group
objects (Megatron keeps them in modules, optimizers and caches), so a peer blocked in a receive
from this rank waits for the collective timeout. Shutting down the connected sockets makes every
such peer fail at once, which is how the failure propagates through the job in milliseconds.

Only *connected* TCP sockets whose remote end is a host of this job are shut down: never a
listening socket (gloo's listener thread must not see its socket vanish), never the rendezvous
store's connection, never a connection to anything outside the job (loggers, data services). With
NCCL, ``abort()`` (``ncclCommAbort``) does this job and this module is not used.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from typing import Iterable

from megatron_moevement.logging_utils import get_logger

logger = get_logger(__name__)


def local_addresses() -> set[str]:
    """Addresses this host is reachable at (published in the store for peers' teardown)."""
    addrs = {"127.0.0.1", "::1"}
    try:
        addrs.update(info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None))
    except OSError:
        pass
    return addrs


def _is_job_peer(address: str, job_hosts: set[str]) -> bool:
    try:
        if ipaddress.ip_address(address.split("%")[0]).is_loopback:
            return True
    except ValueError:
        return False
    return address in job_hosts


def _connected_tcp_sockets():
    """Yields ``(fd, peer, sock)`` for each connected TCP socket of this process, ``sock`` being a
    duplicate of ``fd`` (closed when the caller moves on). Linux only (uses /proc)."""
    try:
        fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
    except FileNotFoundError:  # pragma: no cover - not Linux
        logger.warning("cannot list file descriptors; peers will notice through timeouts")
        return
    for fd in fds:
        try:
            dup = os.dup(fd)
        except OSError:
            continue  # closed since it was listed (or the listing's own descriptor)
        try:
            sock = socket.socket(fileno=dup)
        except OSError:  # not a socket: the duplicate must not leak (listing would double)
            os.close(dup)
            continue
        try:
            if sock.type != socket.SOCK_STREAM or sock.family not in (
                socket.AF_INET,
                socket.AF_INET6,
            ):
                continue
            try:
                peer = sock.getpeername()
            except OSError:
                continue  # listening or unconnected
            yield fd, peer, sock
        finally:
            sock.close()  # closes only our duplicate descriptor


def _shutdown(sock: socket.socket) -> bool:
    try:
        sock.shutdown(socket.SHUT_RDWR)
        return True
    except OSError:
        return False


def sever_connections(keep_ports: Iterable[int], job_hosts: Iterable[str] = ()) -> int:
    """Shuts down this process's connected TCP sockets to job hosts, except those to
    ``keep_ports`` (the store). Returns how many were shut down. Linux only (uses /proc)."""
    keep = set(keep_ports)
    hosts = set(job_hosts)
    severed = 0
    for _, peer, sock in _connected_tcp_sockets():
        if peer[1] not in keep and _is_job_peer(peer[0], hosts):
            severed += _shutdown(sock)
    return severed


def connections_to_port(port: int) -> set[int]:
    """The file descriptors of this process's TCP connections to ``port`` on any host (taken
    before and after opening a store client, they name that client's connection)."""
    return {fd for fd, peer, _ in _connected_tcp_sockets() if peer[1] == port}


def sever_fds(fds: Iterable[int], port: int) -> int:
    """Shuts down the connections ``fds`` that are still TCP connections to ``port`` (a closed
    descriptor whose number was reused by another socket is left alone). Returns how many."""
    wanted = set(fds)
    return sum(
        _shutdown(sock)
        for fd, peer, sock in _connected_tcp_sockets()
        if fd in wanted and peer[1] == port
    )
