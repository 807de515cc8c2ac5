"""The durable tier on real Megatron-Core jobs (gloo, several processes).

One fault-free MoEvement run (W=3, 10 iterations) saves durable checkpoints three ways: the
periodic background saver (every 4 iterations: iter_0000003, iter_0000007), Megatron's
asynchronous path (``async_sharded_save=True`` + ``AsyncCallsQueue``, after iteration 5) and a
synchronous ``dist_checkpointing.save(..., sharded_strategy=("moevement", 1))`` at the end; it
records its state at the iterations the checks need. Then, in fresh processes:

* each checkpoint is loaded with a plain ``dist_checkpointing.load`` (the backend comes from its
  metadata.json) and replayed: the state must equal the recorded one bit for bit, and training on
  from it must too;
* ``python -m megatron_moevement.convert`` turns the newest periodic checkpoint into a
  torch_dist checkpoint, which plain Megatron-Core loads into a fresh model and optimizer with
  tensors identical to the run's;
* a corrupted copy, a copy without one rank's files, a load on another layout of the same world
  size and one on another world size fail with the same clear error on every rank.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from megatron_moevement.durable import files
from megatron_moevement.harness.launcher import run_worker_job
from megatron_moevement.harness.layout import ParallelLayout
from megatron_moevement.harness.worker import WorkerSpec
from tests.conftest import JOB_TIMEOUT_S, LAYOUTS

ITERATIONS = 10  # windows 0-2, 3-5, 6-8, (9..)
MODEL = dict(precision="bf16", use_distributed_optimizer=True)
MOEVEMENT = dict(window_size=3, replication_factor=1, durable_interval=4)

LAYOUT_PARAMS = [
    pytest.param("ep2", id="ep2"),
    pytest.param("pp2xdp2xep2", id="pp2xdp2xep2", marks=pytest.mark.slow),
]
# Same world size, another parallel layout (the checkpoint must be refused there).
OTHER_LAYOUT = {"ep2": LAYOUTS["pp2"], "pp2xdp2xep2": dict(pp=1, dp=4, ep=2)}


def _run(spec: WorkerSpec, out):
    run_worker_job(spec, out, timeout=JOB_TIMEOUT_S)
    return out


def _results(out, prefix: str, world: int) -> list[dict]:
    return [json.loads((out / f"{prefix}_rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module", params=LAYOUT_PARAMS)
def durable_run(request, tmp_path_factory):
    """Saves, converts and verifies once per layout; the tests inspect the results."""
    layout = LAYOUTS[request.param]
    world = ParallelLayout(**layout).world_size
    root = tmp_path_factory.mktemp(f"durable-{request.param}")
    durable_dir, sync_dir, async_dir = root / "durable", root / "sync", root / "async"
    save = _run(
        WorkerSpec(
            job="durable_save_check",
            layout=layout,
            model=MODEL,
            iterations=ITERATIONS,
            moevement=dict(
                MOEVEMENT,
                durable_dir=str(durable_dir),
                sync_dir=str(sync_dir),
                async_dir=str(async_dir),
                async_after=5,
                reference_iterations=[3, 5, 7, 8, 9],
            ),
        ),
        root / "save",
    )

    # Damaged copies of the synchronous checkpoint.
    corrupt, missing = root / "corrupt", root / "missing"
    shutil.copytree(sync_dir, corrupt)
    slot_file = files.rank_dir(corrupt, 1) / "slot001.bin"
    raw = bytearray(slot_file.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    slot_file.write_bytes(bytes(raw))
    shutil.copytree(sync_dir, missing)
    shutil.rmtree(files.rank_dir(missing, 1))
    files.done_marker(missing, 1).unlink()

    dense = root / "dense"
    convert = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_moevement.convert",
            str(durable_dir),
            str(dense),
            "--timeout",
            str(JOB_TIMEOUT_S),
        ],
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_S + 60,
    )
    assert convert.returncode == 0, convert.stderr[-3000:]

    checks = [
        dict(name="periodic7", dir=str(durable_dir / "iter_0000007"), continue_to=9),
        dict(name="periodic3", dir=str(durable_dir / "iter_0000003")),
        dict(name="async", dir=str(async_dir)),
        dict(name="sync", dir=str(sync_dir)),
        dict(name="sync_window_end", dir=str(sync_dir), target=8),
        dict(name="corrupt", dir=str(corrupt)),
        dict(name="missing", dir=str(missing)),
    ]
    verify = _run(
        WorkerSpec(
            job="durable_verify_check",
            layout=layout,
            model=MODEL,
            iterations=0,
            moevement=dict(
                reference_dir=str(save), dense_dir=str(dense), dense_reference=7, checks=checks
            ),
        ),
        root / "verify",
    )
    other_layout = _run(
        WorkerSpec(
            job="durable_verify_check",
            layout=OTHER_LAYOUT[request.param],
            model=MODEL,
            iterations=0,
            moevement=dict(checks=[dict(name="layout", dir=str(sync_dir))]),
        ),
        root / "other_layout",
    )
    other_world = _run(
        WorkerSpec(
            job="durable_verify_check",
            layout=LAYOUTS["single"],
            model=MODEL,
            iterations=0,
            moevement=dict(no_model=True, checks=[dict(name="world", dir=str(sync_dir))]),
        ),
        root / "other_world",
    )
    return dict(
        root=root,
        world=world,
        durable_dir=durable_dir,
        save=_results(save, "save", world),
        convert=json.loads(convert.stdout),
        verify=_results(verify, "verify", world),
        other_layout=_results(other_layout, "verify", world),
        other_world=_results(other_world, "verify", 1)[0],
    )


@pytest.mark.multiproc
@pytest.mark.timeout(600)
def test_periodic_saver_completes_checkpoints_atomically(durable_run):
    durable_dir = durable_run["durable_dir"]
    for result in durable_run["save"]:
        assert result["errors"] == []
    assert durable_run["save"][0]["completed"] == [
        str(durable_dir / "iter_0000003"),
        str(durable_dir / "iter_0000007"),
    ]
    assert [it for it, _ in files.list_iteration_dirs(durable_dir)] == [3, 7]
    assert (durable_dir / files.TRACKER_FILE).read_text().strip() == "7"
    for _, path in files.list_iteration_dirs(durable_dir):
        assert files.is_complete(path)
        meta = json.loads((path / "metadata.json").read_text())
        assert meta["sharded_backend"] == "moevement" and meta["sharded_backend_version"] == 1
        leftovers = [p.name for p in files.moevement_dir(path).iterdir() if p.name.startswith(".")]
        assert leftovers == []


@pytest.mark.multiproc
@pytest.mark.timeout(600)
def test_plain_load_and_replay_is_bitwise_equal_to_the_fault_free_run(durable_run):
    expected = {  # check: (saved iteration, window start, replayed iterations)
        "periodic7": (7, 3, [4, 5, 6, 7]),
        "periodic3": (3, 0, [1, 2, 3]),
        "async": (5, 3, [4, 5]),
        "sync": (9, 6, [7, 8, 9]),
        "sync_window_end": (9, 6, [7, 8]),
    }
    for result in durable_run["verify"]:
        rank = result["rank"]
        for name, (iteration, start, replayed) in expected.items():
            check = result["checks"][name]
            assert "error" not in check, f"rank {rank} {name}: {check.get('message')}"
            assert (check["iteration"], check["window_start"]) == (iteration, start), name
            assert check["common_iteration"] == iteration, name  # the common part loads too
            assert check["replayed"] == replayed, name
            # Sparse-to-dense really ran: operators frozen in the first replayed iteration.
            assert check["frozen"][str(replayed[0])] > 0, name
            assert check["mismatches"] == [], f"rank {rank} {name}: {check['mismatches'][:5]}"
        # Training on from the restored state stays on the fault-free trajectory.
        assert result["checks"]["periodic7"]["continued_mismatches"] == []


@pytest.mark.multiproc
@pytest.mark.timeout(600)
def test_converted_checkpoint_loads_in_plain_megatron_with_identical_tensors(durable_run):
    report = durable_run["convert"]
    assert report["source"].endswith("iter_0000007") and report["target_iteration"] == 7
    assert report["iterations_replayed"] == [4, 5, 6, 7]
    meta = json.loads((durable_run["root"] / "dense" / "metadata.json").read_text())
    assert meta["sharded_backend"] == "torch_dist"
    for result in durable_run["verify"]:
        dense = result["dense"]
        assert dense["backend"] == "torch_dist" and dense["iteration"] == 8
        assert dense["durable_imported"] is False  # loaded before anything of this package's tier
        assert dense["tensors"] > 0
        assert dense["mismatches"] == [], f"rank {result['rank']}: {dense['mismatches'][:5]}"


@pytest.mark.multiproc
@pytest.mark.timeout(600)
def test_damaged_checkpoints_fail_with_the_same_clear_error_on_every_rank(durable_run):
    for result in durable_run["verify"]:
        corrupt = result["checks"]["corrupt"]
        assert corrupt["error"] == "DurableChecksumError"
        assert "failed on ranks [1]" in corrupt["message"]
        assert "slot001.bin" in corrupt["message"] and "Fix:" in corrupt["message"]
        missing = result["checks"]["missing"]
        assert missing["error"] == "MissingRankFileError"
        assert "failed on ranks [1]" in missing["message"]
        assert "the file set of rank 1 is missing" in missing["message"]
        assert "copy the whole checkpoint directory" in missing["message"]


@pytest.mark.multiproc
@pytest.mark.timeout(600)
def test_loading_on_another_world_size_names_the_layout_and_the_fix(durable_run):
    check = durable_run["other_world"]["checks"]["world"]
    assert check["error"] == "LayoutMismatchError"
    world = durable_run["world"]
    assert f"world size {world}" in check["message"]
    assert "this job has world size 1" in check["message"]
    assert "moevement-convert" in check["message"]


@pytest.mark.multiproc
@pytest.mark.timeout(600)
def test_loading_on_another_layout_of_the_same_size_names_the_differences(durable_run):
    for result in durable_run["other_layout"]:
        check = result["checks"]["layout"]
        assert check["error"] == "LayoutMismatchError", check
        assert "pp size" in check["message"] and "operator set differs" in check["message"]
        assert "Fix: load it on the layout" in check["message"]
