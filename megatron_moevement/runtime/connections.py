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


def sever_connections(keep_ports: Iterable[int], job_hosts: Iterable[str] = ()) -> int:
    """Shuts down this process's connected TCP sockets to job hosts, except those to
    ``keep_ports`` (the store). Returns how many were shut down. Linux only (uses /proc)."""
    keep = set(keep_ports)
    hosts = set(job_hosts)
    severed = 0
    try:
        fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
    except FileNotFoundError:  # pragma: no cover - not Linux
        logger.warning("cannot list file descriptors; peers will notice through timeouts")
        return 0
    for fd in fds:
        try:
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
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
            if peer[1] in keep or not _is_job_peer(peer[0], hosts):
                continue
            try:
                sock.shutdown(socket.SHUT_RDWR)
                severed += 1
            except OSError:
                pass
        finally:
            sock.close()  # closes only our duplicate descriptor
    return severed
