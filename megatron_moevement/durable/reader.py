"""Reading and verifying one rank's file set of a durable MoEvement checkpoint.

Nothing here communicates: :func:`read_rank` is what each rank runs locally (the
``dist_checkpointing`` load strategy exchanges the outcome so that every rank reports the same
error). Verification: the completion markers exist, the manifest matches the checksum in the
rank's marker, every slot file has its recorded size, and every tensor matches the checksum
recorded when the slot was captured (so a bit flipped anywhere between capture and load is
caught and named).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from megatron_moevement.durable.errors import (
    DurableCheckpointError,
    DurableChecksumError,
    IncompleteCheckpointError,
    MissingRankFileError,
)
from megatron_moevement.durable.files import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_FILE,
    METADATA_FILE,
    index_path,
    rank_dir,
)
from megatron_moevement.durable.layout import RankLayout, check_world_size
from megatron_moevement.durable.state import DurableSparseState
from megatron_moevement.durable.writer import read_done_marker
from megatron_moevement.snapshot.checksum import SnapshotChecksumError, checksum
from megatron_moevement.snapshot.slots import SlotSnapshot, SparseCheckpoint

_OLDER = (
    "Fix: load an older complete durable checkpoint (see `latest_checkpoint()` / the iter_* "
    "directories), or recover from the peers' in-memory replicas if the job is still up."
)


def read_index(checkpoint_dir: str | os.PathLike) -> dict:
    """The checkpoint-wide ``moevement/index.json``.

    Raises:
        IncompleteCheckpointError: The checkpoint never completed (or is not a MoEvement one).
    """
    checkpoint_dir = Path(checkpoint_dir)
    path = index_path(checkpoint_dir)
    if not path.is_file():
        if not path.parent.is_dir():
            backend = _backend(checkpoint_dir)
            what = f"its backend is {backend!r}" if backend else f"it has no {METADATA_FILE}"
            raise IncompleteCheckpointError(
                f"{checkpoint_dir} is not a durable MoEvement checkpoint ({what} and no "
                "moevement/ directory). Fix: pass a directory written by the moevement "
                "dist_checkpointing backend (or a durable_dir holding iter_* checkpoints)."
            )
        ranks = sorted(int(p.name[4:9]) for p in path.parent.glob("rank*.done"))
        raise IncompleteCheckpointError(
            f"durable MoEvement checkpoint {checkpoint_dir} is incomplete: its completion marker "
            f"{path.name} is missing (ranks with finished file sets: {ranks}); the save was "
            f"interrupted. {_OLDER}"
        )
    try:
        index = json.loads(path.read_text())
    except ValueError as exc:
        raise DurableCheckpointError(f"{path} is not valid JSON ({exc}). {_OLDER}") from exc
    _check_format(index, path)
    return index


def _backend(checkpoint_dir: Path) -> str | None:
    try:
        return json.loads((checkpoint_dir / METADATA_FILE).read_text()).get("sharded_backend")
    except (OSError, ValueError, AttributeError):
        return None


def _check_format(data: dict, path: Path) -> None:
    if data.get("format") != FORMAT_NAME:
        raise DurableCheckpointError(f"{path} is not a {FORMAT_NAME} file")
    if int(data.get("version", 0)) > FORMAT_VERSION:
        raise DurableCheckpointError(
            f"{path} has format version {data.get('version')}, newer than this megatron-moevement "
            f"reads ({FORMAT_VERSION}). Fix: upgrade megatron-moevement."
        )


def read_rank_schedule(checkpoint_dir: str | os.PathLike, rank: int) -> dict:
    """The window schedule ``rank`` saved (its operator manifest), without reading any slot."""
    path = rank_dir(Path(checkpoint_dir), rank) / MANIFEST_FILE
    try:
        return json.loads(path.read_text())["window"]["schedule"]
    except (OSError, ValueError, KeyError) as exc:
        raise MissingRankFileError(
            f"durable MoEvement checkpoint {checkpoint_dir}: cannot read rank {rank}'s manifest "
            f"{path} ({exc}). {_OLDER}"
        ) from exc


def read_rank(
    checkpoint_dir: str | os.PathLike, rank: int, world_size: int | None = None, verify: bool = True
) -> DurableSparseState:
    """Reads and verifies the file set of ``rank``.

    Args:
        checkpoint_dir: The checkpoint directory.
        rank: Global rank whose files to read.
        world_size: The loading job's world size; a different one raises
            :class:`~megatron_moevement.durable.errors.LayoutMismatchError`.
        verify: Check every tensor's checksum (the markers and sizes are always checked).
    """
    checkpoint_dir = Path(checkpoint_dir)
    index = read_index(checkpoint_dir)
    if world_size is not None:
        check_world_size(
            index["world_size"], index.get("sizes", {}), world_size, str(checkpoint_dir)
        )
    if not 0 <= rank < index["world_size"]:
        raise DurableCheckpointError(
            f"rank {rank} is outside the checkpoint's world size {index['world_size']}"
        )
    where = rank_dir(checkpoint_dir, rank)
    marker = read_done_marker(checkpoint_dir, rank)
    manifest_path = where / MANIFEST_FILE
    if marker is None or not manifest_path.is_file():
        missing = manifest_path if marker is not None else f"{where.name}.done / {where.name}/"
        raise MissingRankFileError(
            f"durable MoEvement checkpoint {checkpoint_dir}: the file set of rank {rank} is "
            f"missing ({missing} not found); it was deleted or never copied. Fix: copy the "
            f"whole checkpoint directory (all {index['world_size']} ranks' files), or load an "
            f"older complete checkpoint."
        )
    raw = manifest_path.read_bytes()
    expected = index.get("ranks", {}).get(str(rank), marker.get("manifest_checksum"))
    got = checksum(raw, marker.get("algorithm", "crc32"))
    if got != expected or got != marker.get("manifest_checksum"):
        raise DurableChecksumError(
            f"durable MoEvement checkpoint {checkpoint_dir}: the manifest of rank {rank} "
            f"({manifest_path}) fails its checksum (expected {expected}, got {got}): the file is "
            f"corrupted or was replaced. {_OLDER}"
        )
    manifest = json.loads(raw)
    _check_format(manifest, manifest_path)
    window = manifest["window"]
    slots = []
    for meta in manifest["slots"]:
        path = where / meta["file"]
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise MissingRankFileError(
                f"durable MoEvement checkpoint {checkpoint_dir}: {path} (rank {rank}, slot "
                f"{meta['manifest']['slot']}) is missing. Fix: copy the whole checkpoint "
                "directory, or load an older complete checkpoint."
            ) from None
        if size != meta["nbytes"]:
            raise MissingRankFileError(
                f"durable MoEvement checkpoint {checkpoint_dir}: {path} has {size} bytes, the "
                f"manifest records {meta['nbytes']} (truncated or partially copied). Fix: copy "
                "the file again from the original, or load an older complete checkpoint."
            )
        buffer = _read_file(path, size)
        slot_manifest = dict(meta["manifest"], schedule=window["schedule"])
        slot = SlotSnapshot.from_manifest(slot_manifest, buffer)
        if verify:
            try:
                slot.verify()
            except SnapshotChecksumError as exc:
                raise DurableChecksumError(
                    f"durable MoEvement checkpoint {checkpoint_dir}: {path} (rank {rank}, window "
                    f"{window.get('index', window.get('generation'))}, slot {slot.slot}, iteration {slot.iteration}) fails "
                    f"its checksum for tensor {exc.name!r} ({exc.algorithm}: expected "
                    f"{exc.expected}, got {exc.got}); the file is corrupted on disk. {_OLDER}"
                ) from exc
        slots.append(slot)
    ckpt = SparseCheckpoint.from_slots(slots)
    ckpt.schedule = window["schedule"]
    return DurableSparseState(
        path=str(checkpoint_dir),
        checkpoint=ckpt,
        iteration=int(manifest["iteration"]),
        scalars=manifest.get("scalars", {}),
        layout=RankLayout.from_dict(manifest["layout"]),
        popularity=manifest.get("popularity"),
        config=manifest.get("config", {}),
        metadata=manifest.get("metadata", {}),
    )


def _read_file(path: Path, size: int) -> torch.Tensor:
    buffer = torch.empty(max(size, 1), dtype=torch.uint8)
    if size:
        with open(path, "rb") as f:
            view = memoryview(buffer.numpy())[:size]
            got = f.readinto(view)
        if got != size:
            raise MissingRankFileError(f"{path}: read {got} of {size} bytes (truncated)")
    return buffer
