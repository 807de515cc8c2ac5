"""Writing one rank's file set atomically, and the checkpoint-wide completion markers.

Per rank: the slot buffers and the manifest go to a hidden staging directory, are flushed to disk,
and the directory is renamed into place; only then is the rank's ``.done`` marker written (it
holds the checksum of the manifest). Checkpoint-wide: once every rank's marker is there, rank 0
writes ``moevement/index.json``. A reader accepts a checkpoint only with all of them, so a crash
at any point leaves either the previous complete state or an incomplete checkpoint that is
reported as such, never a torn one.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from megatron_moevement.durable.errors import IncompleteCheckpointError
from megatron_moevement.durable.files import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_FILE,
    done_marker,
    index_path,
    rank_dir,
    remove_quietly,
    replace_dir,
    staging_dir,
    write_json_atomic,
)
from megatron_moevement.durable.payload import RankPayload
from megatron_moevement.logging_utils import get_logger
from megatron_moevement.snapshot.checksum import checksum

logger = get_logger(__name__)


def write_rank_files(checkpoint_dir: str | os.PathLike, payload: RankPayload) -> dict:
    """Writes ``payload`` (this rank's file set) under ``checkpoint_dir`` atomically.

    Returns:
        The content of the rank's completion marker.
    """
    t0 = time.perf_counter()
    payload.prepare()
    checkpoint_dir = Path(checkpoint_dir)
    marker = done_marker(checkpoint_dir, payload.rank)
    remove_quietly(marker)  # a stale marker must never vouch for the new files
    final = rank_dir(checkpoint_dir, payload.rank)
    tmp = staging_dir(final)
    try:
        for meta, buf in zip(payload.manifest["slots"], payload.buffers):
            with open(tmp / meta["file"], "wb") as f:
                if buf.numel():
                    f.write(memoryview(buf.numpy()))
                f.flush()
                os.fsync(f.fileno())
        raw = write_json_atomic(tmp / MANIFEST_FILE, payload.manifest)
        replace_dir(tmp, final)
    except BaseException:
        remove_quietly(tmp)
        raise
    algorithm = payload.checkpoint.slots[0].algorithm if payload.checkpoint.slots else "crc32"
    done = dict(
        format=FORMAT_NAME,
        version=FORMAT_VERSION,
        rank=payload.rank,
        iteration=payload.iteration,
        window=payload.checkpoint.window,
        window_start=payload.checkpoint.start_iteration,
        manifest_checksum=checksum(raw, algorithm),
        algorithm=algorithm,
        nbytes=payload.nbytes,
        run_id=payload.metadata.get("run_id"),
    )
    write_json_atomic(marker, done)
    logger.info(
        "durable: rank %d wrote %.1f MB (window %d, iterations %d..%d) to %s in %.2fs",
        payload.rank,
        payload.nbytes / 1e6,
        payload.checkpoint.window,
        payload.checkpoint.start_iteration,
        payload.iteration,
        final,
        time.perf_counter() - t0,
    )
    return done


def read_done_marker(checkpoint_dir: str | os.PathLike, rank: int) -> dict | None:
    """The rank's completion marker, or ``None`` when it does not exist (or is unreadable)."""
    try:
        return json.loads(done_marker(checkpoint_dir, rank).read_text())
    except (OSError, ValueError):
        return None


def write_index(
    checkpoint_dir: str | os.PathLike, payload: RankPayload, world_size: int, markers: list[dict]
) -> None:
    """Rank 0: writes ``moevement/index.json`` once all ``world_size`` markers are there."""
    layout = payload.layout
    index = dict(
        format=FORMAT_NAME,
        version=FORMAT_VERSION,
        world_size=world_size,
        iteration=payload.iteration,
        window=payload.checkpoint.window,
        window_start=payload.checkpoint.start_iteration,
        window_size=payload.checkpoint.window_size,
        window_end=payload.window_end,
        sizes={k: layout[k] for k in ("tp", "pp", "dp", "ep")},
        ranks={str(m["rank"]): m["manifest_checksum"] for m in markers},
        nbytes=sum(m.get("nbytes", 0) for m in markers),
        config=payload.config,
        metadata=payload.metadata,
        written_at=time.time(),
    )
    write_json_atomic(index_path(checkpoint_dir), index)


def wait_for_markers(
    checkpoint_dir: str | os.PathLike,
    world_size: int,
    expect: dict,
    timeout: float,
    poll_s: float = 0.2,
    stop=None,
) -> list[dict]:
    """Polls until every rank's marker matches ``expect`` (e.g. iteration, window, run id).

    Used by the periodic saver, whose ranks do not communicate: it needs a filesystem that all
    ranks share (as ``dist_checkpointing`` itself does).

    Raises:
        IncompleteCheckpointError: Some markers did not appear within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    found: dict[int, dict] = {}
    while True:
        for rank in range(world_size):
            if rank in found:
                continue
            marker = read_done_marker(checkpoint_dir, rank)
            if marker is not None and all(marker.get(k) == v for k, v in expect.items()):
                found[rank] = marker
        if len(found) == world_size:
            return [found[r] for r in range(world_size)]
        if time.monotonic() > deadline or (stop is not None and stop.is_set()):
            missing = sorted(set(range(world_size)) - set(found))
            raise IncompleteCheckpointError(
                f"durable checkpoint {checkpoint_dir}: ranks {missing} did not finish writing "
                f"within {timeout:.0f}s (rank failed, or the directory is not on a filesystem "
                "shared by all ranks); the checkpoint stays incomplete and is never loaded. Fix: "
                "use a shared durable_dir; the previous complete checkpoint remains usable"
            )
        time.sleep(poll_s)
