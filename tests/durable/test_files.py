"""Durable file sets without any process group: write, read back, and every way reading fails.

A synthetic two-operator sparse checkpoint is captured with the real snapshot engine, written with
the real writer and read back with the real reader; then it is corrupted, truncated, partially
deleted or left incomplete, and each case must raise the documented error naming the problem and
the fix.
"""

from __future__ import annotations

import json
import threading

import pytest
import torch

from megatron_moevement.convert import ConversionError, convert
from megatron_moevement.durable import files
from megatron_moevement.durable.errors import (
    DurableChecksumError,
    IncompleteCheckpointError,
    LayoutMismatchError,
    MissingRankFileError,
)
from megatron_moevement.durable.layout import RankLayout, check_layout, check_world_size
from megatron_moevement.durable.payload import RankPayload
from megatron_moevement.durable.periodic import DurableSaver
from megatron_moevement.durable.reader import read_index, read_rank
from megatron_moevement.durable.writer import wait_for_markers, write_index, write_rank_files
from megatron_moevement.snapshot.engine import SnapshotEngine
from megatron_moevement.snapshot.sharding import ShardPlan
from megatron_moevement.state.operators import Operator, OperatorParam
from megatron_moevement.state.optim_view import ParamState
from tests.fakes import FakeRegistry, FakeSchedule

WORLD = 2


def _registry(seed: int):
    gen = torch.Generator().manual_seed(seed)
    ops = []
    for name in ("a", "b"):
        param = torch.nn.Parameter(torch.randn((4, 3), generator=gen).to(torch.bfloat16))
        main = torch.randn((4, 3), generator=gen)
        state = ParamState(
            param, main, {"exp_avg": torch.randn((4, 3), generator=gen), "step": torch.tensor(3.0)}
        )
        ops.append(
            Operator(name, "dense", layer=0, params=[OperatorParam(f"{name}.w", param, state)])
        )
    return FakeRegistry(ops)


def _layout(rank: int, **changes) -> RankLayout:
    values = dict(
        world_size=WORLD,
        rank=rank,
        tp=1,
        pp=1,
        dp=2,
        ep=1,
        pp_rank=0,
        dp_rank=rank,
        ep_rank=0,
        expert_dp_size=2,
        expert_dp_rank=rank,
        distributed_optimizer=False,
        operators=("a", "b"),
        param_signature="sig",
    )
    values.update(changes)
    return RankLayout(**values)


def _payload(rank: int) -> RankPayload:
    registry = _registry(rank)
    plan = ShardPlan(full_state={"a", "b"}, compute={"a", "b"}, owner_of={"a": 0, "b": 0})
    engine = SnapshotEngine(registry, plan, rank=rank)
    ckpt = engine.begin_window(FakeSchedule([["a"], ["b"]]), start_iteration=10, window=4)
    engine.capture(ckpt, 0, 10)
    engine.capture(ckpt, 1, 11)
    engine.drain()
    scalars = {
        str(i): dict(
            iteration=i,
            grad_norm=1.0,
            update_successful=True,
            learning_rates=[[1e-3]],
            scaler_state=None,
        )
        for i in (10, 11, 12)
    }
    return RankPayload(
        rank=rank,
        world_size=WORLD,
        iteration=12,
        checkpoint=ckpt,
        scalars=scalars,
        layout=_layout(rank).to_dict(),
        popularity=None,
        config={"checksum": "crc32"},
        metadata={"run_id": "r1"},
    )


def _write_checkpoint(path, with_index: bool = True) -> list[RankPayload]:
    payloads = [_payload(r) for r in range(WORLD)]
    markers = [write_rank_files(path, p) for p in payloads]
    if with_index:
        write_index(path, payloads[0], WORLD, markers)
    return payloads


def test_round_trip_is_exact(tmp_path):
    payloads = _write_checkpoint(tmp_path)
    assert files.is_complete(tmp_path) is False  # metadata.json is dist_checkpointing's marker
    index = read_index(tmp_path)
    assert (index["world_size"], index["iteration"], index["window_end"]) == (WORLD, 12, 11)
    for rank, payload in enumerate(payloads):
        state = read_rank(tmp_path, rank, WORLD)
        assert state.iteration == 12 and state.window_start == 10 and state.window_end == 11
        assert state.layout == _layout(rank)
        assert state.scalars == payload.scalars
        assert state.checkpoint.persisted and state.checkpoint.schedule == {
            "slices": [["a"], ["b"]]
        }
        for original, loaded in zip(payload.checkpoint.slots, state.checkpoint.slots):
            assert loaded.iteration == original.iteration
            assert loaded.records == original.records
            for key in original.records:
                assert torch.equal(
                    loaded.tensor(key).reshape(-1).view(torch.uint8),
                    original.tensor(key).reshape(-1).view(torch.uint8),
                )
    # No staging leftovers: only the renamed file sets, their markers and the index.
    names = sorted(p.name for p in files.moevement_dir(tmp_path).iterdir())
    assert names == ["index.json", "rank00000", "rank00000.done", "rank00001", "rank00001.done"]


def test_flipped_bit_is_a_checksum_error_naming_file_and_tensor(tmp_path):
    _write_checkpoint(tmp_path)
    slot_file = files.rank_dir(tmp_path, 1) / "slot001.bin"
    raw = bytearray(slot_file.read_bytes())
    raw[3] ^= 0x01
    slot_file.write_bytes(bytes(raw))
    read_rank(tmp_path, 0, WORLD)  # other ranks are unaffected
    with pytest.raises(DurableChecksumError) as err:
        read_rank(tmp_path, 1, WORLD)
    msg = str(err.value)
    assert "slot001.bin" in msg and "rank 1" in msg and "corrupted" in msg and "Fix:" in msg


def test_corrupted_manifest_is_detected(tmp_path):
    _write_checkpoint(tmp_path)
    manifest = files.rank_dir(tmp_path, 0) / files.MANIFEST_FILE
    data = json.loads(manifest.read_text())
    data["iteration"] = 99
    manifest.write_text(json.dumps(data))
    with pytest.raises(DurableChecksumError, match="manifest of rank 0 .* fails its checksum"):
        read_rank(tmp_path, 0, WORLD)


def test_missing_rank_file_set_names_the_rank_and_the_fix(tmp_path):
    _write_checkpoint(tmp_path)
    files.remove_quietly(files.rank_dir(tmp_path, 1))
    files.remove_quietly(files.done_marker(tmp_path, 1))
    with pytest.raises(MissingRankFileError) as err:
        read_rank(tmp_path, 1, WORLD)
    assert "rank 1 is missing" in str(err.value) and "copy the whole checkpoint" in str(err.value)


def test_truncated_and_missing_slot_files(tmp_path):
    _write_checkpoint(tmp_path)
    slot_file = files.rank_dir(tmp_path, 0) / "slot000.bin"
    slot_file.write_bytes(slot_file.read_bytes()[:-7])
    with pytest.raises(MissingRankFileError, match="truncated or partially copied"):
        read_rank(tmp_path, 0, WORLD)
    slot_file.unlink()
    with pytest.raises(MissingRankFileError, match="slot000.bin .* is missing"):
        read_rank(tmp_path, 0, WORLD)


def test_interrupted_save_is_incomplete_not_loadable(tmp_path):
    _write_checkpoint(tmp_path, with_index=False)
    with pytest.raises(
        IncompleteCheckpointError, match=r"incomplete.*finished file sets: \[0, 1\]"
    ):
        read_rank(tmp_path, 0, WORLD)
    with pytest.raises(IncompleteCheckpointError, match="not a durable MoEvement checkpoint"):
        read_index(tmp_path / "nothing")
    dense = tmp_path / "dense"
    dense.mkdir()
    (dense / files.METADATA_FILE).write_text('{"sharded_backend": "torch_dist"}')
    with pytest.raises(IncompleteCheckpointError, match="its backend is 'torch_dist'"):
        read_index(dense)


def test_stale_marker_is_removed_before_rewriting(tmp_path):
    payload = _payload(0)
    write_rank_files(tmp_path, payload)
    marker = files.done_marker(tmp_path, 0)
    seen = []
    original = files.replace_dir

    def spy(tmp, final):  # at the rename, the old marker must already be gone
        seen.append(marker.exists())
        original(tmp, final)

    import megatron_moevement.durable.writer as writer

    writer.replace_dir = spy
    try:
        write_rank_files(tmp_path, payload)
    finally:
        writer.replace_dir = original
    assert seen == [False] and marker.exists()


def test_world_size_mismatch_message():
    with pytest.raises(LayoutMismatchError) as err:
        check_world_size(4, {"tp": 1, "pp": 2, "dp": 2, "ep": 2}, 2, "/ckpt/iter_0000007")
    msg = str(err.value)
    assert "world size 4 (tp1 pp2 dp2 ep2)" in msg and "this job has world size 2" in msg
    assert "moevement-convert /ckpt/iter_0000007" in msg


@pytest.mark.parametrize(
    "change,expected",
    [
        (dict(pp=2, world_size=4), "world size 2 != 4; pp size 1 != 2"),
        (dict(ep=2), "ep size 1 != 2"),
        (dict(distributed_optimizer=True), "distributed optimizer off in the checkpoint, on"),
        (dict(operators=("a", "c")), "only in the checkpoint: b; only in this job: c"),
        (dict(param_signature="other"), "parameter shapes or dtypes differ"),
    ],
)
def test_layout_mismatch_names_each_difference(change, expected):
    saved = _layout(0)
    with pytest.raises(LayoutMismatchError) as err:
        check_layout(saved, _layout(0, **change), "/ckpt")
    assert expected in str(err.value) and "Fix: load it on the layout" in str(err.value)
    check_layout(saved, _layout(0), "/ckpt")  # identical: no error


def test_latest_checkpoint_skips_incomplete(tmp_path):
    for it, complete in ((3, True), (7, True), (11, False)):
        path = files.iteration_dir(tmp_path, it)
        files.moevement_dir(path).mkdir(parents=True)
        if complete:
            (path / files.METADATA_FILE).write_text("{}")
            files.index_path(path).write_text("{}")
    assert files.latest_checkpoint(tmp_path) == files.iteration_dir(tmp_path, 7)
    assert files.resolve_checkpoint(tmp_path) == files.iteration_dir(tmp_path, 7)
    assert files.latest_checkpoint(tmp_path / "none") is None


def test_garbage_collection_keeps_the_newest(tmp_path):
    for it in (3, 7, 11, 15):
        path = files.iteration_dir(tmp_path, it)
        files.moevement_dir(path).mkdir(parents=True)
        if it != 7:  # 7 never completed
            (path / files.METADATA_FILE).write_text("{}")
            files.index_path(path).write_text("{}")
    saver = DurableSaver.__new__(DurableSaver)
    saver.directory, saver.keep_last = tmp_path, 2
    saver._collect_garbage(15)
    assert [it for it, _ in files.list_iteration_dirs(tmp_path)] == [11, 15]


def test_waiting_for_markers_times_out_naming_the_missing_ranks(tmp_path):
    write_rank_files(tmp_path, _payload(0))
    with pytest.raises(IncompleteCheckpointError, match=r"ranks \[1\] did not finish"):
        wait_for_markers(
            tmp_path, WORLD, {"iteration": 12, "run_id": "r1"}, timeout=0.3, poll_s=0.05
        )
    stop = threading.Event()
    stop.set()
    with pytest.raises(IncompleteCheckpointError):
        wait_for_markers(tmp_path, WORLD, {"iteration": 12}, timeout=60, stop=stop)


def test_converter_needs_the_job_description(tmp_path):
    _write_checkpoint(tmp_path / "ckpt")
    with pytest.raises(ConversionError, match="does not describe the job"):
        convert(tmp_path / "ckpt", tmp_path / "out")


def test_recovery_loader_reads_the_newest_complete_checkpoint(tmp_path):
    from megatron_moevement.durable.recovery_loader import DurableTierLoader
    from megatron_moevement.harness.layout import ParallelLayout
    from megatron_moevement.replay.scalar_log import ScalarLog

    for it in (7, 12):
        path = files.iteration_dir(tmp_path, it)
        _write_checkpoint(path, with_index=it == 7)  # iteration 12 never completed
        (path / files.METADATA_FILE).write_text("{}")

    class _Strategy:
        scalar_log = ScalarLog()

    strategy = _Strategy()
    loader = DurableTierLoader(tmp_path, strategy_of=lambda: strategy)
    ckpt = loader(1, ParallelLayout(dp=2))
    assert ckpt.window == 4 and ckpt.start_iteration == 10 and ckpt.window_size == 2
    assert loader.last_state.path.endswith("iter_0000007")
    assert [e for e in (10, 11, 12) if e in strategy.scalar_log] == [10, 11, 12]
    with pytest.raises(LayoutMismatchError, match="pp 1 != 2"):
        loader(0, ParallelLayout(pp=2))
    assert DurableTierLoader(tmp_path / "empty")(0) is None
