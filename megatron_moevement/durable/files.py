"""The on-disk layout of a durable MoEvement checkpoint and atomic file helpers.

A checkpoint directory is a regular Megatron-Core ``dist_checkpointing`` checkpoint::

    <checkpoint>/
      metadata.json                 dist_checkpointing: backend "moevement", version 1
      common.pt                     dist_checkpointing: the non-sharded part of the state dict
      moevement/
        index.json                  written last by rank 0: world size, iteration, window
        rank00000/                  one file set per rank, renamed into place when complete
          manifest.json             window, slot manifests (tensor records and checksums),
                                    optimizer-scalar log, layout, popularity, job metadata
          slot000.bin ...           the slot buffers, byte for byte
        rank00000.done              the rank's completion marker (checksum of its manifest)
        ...

A periodic saver writes checkpoints ``<durable_dir>/iter_<iteration:07d>`` and the tracker file
``<durable_dir>/latest_moevement_iteration.txt``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path

FORMAT_NAME = "moevement-durable"
FORMAT_VERSION = 1
SUBDIR = "moevement"
INDEX_FILE = "index.json"
MANIFEST_FILE = "manifest.json"
TRACKER_FILE = "latest_moevement_iteration.txt"
METADATA_FILE = "metadata.json"
_ITER_RE = re.compile(r"^iter_(\d{7,})$")


def moevement_dir(checkpoint: str | os.PathLike) -> Path:
    return Path(checkpoint) / SUBDIR


def rank_dir(checkpoint: str | os.PathLike, rank: int) -> Path:
    return moevement_dir(checkpoint) / f"rank{rank:05d}"


def done_marker(checkpoint: str | os.PathLike, rank: int) -> Path:
    return moevement_dir(checkpoint) / f"rank{rank:05d}.done"


def index_path(checkpoint: str | os.PathLike) -> Path:
    return moevement_dir(checkpoint) / INDEX_FILE


def slot_file_name(slot: int) -> str:
    return f"slot{slot:03d}.bin"


def iteration_dir(durable_dir: str | os.PathLike, iteration: int) -> Path:
    """``<durable_dir>/iter_<iteration:07d>`` (``iteration``: the last iteration it covers)."""
    return Path(durable_dir) / f"iter_{iteration:07d}"


def is_complete(checkpoint: str | os.PathLike) -> bool:
    """True when both completion markers (``metadata.json`` and ``moevement/index.json``)
    exist."""
    return (Path(checkpoint) / METADATA_FILE).is_file() and index_path(checkpoint).is_file()


def list_iteration_dirs(durable_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(iteration, path)`` of every ``iter_*`` directory of ``durable_dir``, oldest first."""
    root = Path(durable_dir)
    if not root.is_dir():
        return []
    out = []
    for child in root.iterdir():
        match = _ITER_RE.match(child.name)
        if match and child.is_dir():
            out.append((int(match.group(1)), child))
    return sorted(out)


def latest_checkpoint(durable_dir: str | os.PathLike) -> Path | None:
    """The newest *complete* checkpoint under ``durable_dir`` (``None`` if there is none).

    The tracker file is a hint; the directories themselves decide, so a tracker left behind by a
    save that never completed cannot point at an incomplete checkpoint.
    """
    for _, path in reversed(list_iteration_dirs(durable_dir)):
        if is_complete(path):
            return path
    return None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` itself if it is a checkpoint, else the newest complete one under it."""
    path = Path(path)
    if (path / METADATA_FILE).exists() or moevement_dir(path).exists():
        return path
    latest = latest_checkpoint(path)
    return latest if latest is not None else path


def fsync_dir(path: Path) -> None:
    """Flushes a directory entry (a rename) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json_atomic(path: Path, data: dict) -> bytes:
    """Writes ``data`` as JSON atomically; returns the bytes written."""
    raw = json.dumps(data, indent=1, sort_keys=True).encode()
    write_bytes_atomic(path, raw)
    return raw


def staging_dir(final: Path) -> Path:
    """A fresh hidden sibling of ``final`` to write into before renaming it into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    return tmp


def replace_dir(tmp: Path, final: Path) -> None:
    """Moves the finished ``tmp`` to ``final`` (removing an older ``final`` first)."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def remove_quietly(path: Path) -> None:
    try:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass
