"""The store layout: creation, checks, clip table, frames chunks, stage groups, sparse matrices."""

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import scipy.sparse as sp
import zarr

from sae import store
from sae.audio import frames_per_clip
from sae.config import CQTConfig
from sae.report import errors_markdown

CQT = CQTConfig(clip_samples=22050)
CLIPS = [(f"{lab}/c{i}", f"/nowhere/{lab}/c{i}.wav", lab) for i, lab in enumerate("abcabcab")]


@pytest.fixture
def group(tmp_path):
    return store.create_store(tmp_path / "s.zarr", CQT, CLIPS, chunk_clips=3)


def test_create_layout(group, tmp_path):
    n_frames = frames_per_clip(CQT)
    frames = store.frames_array(group)
    assert frames.shape == (len(CLIPS) * n_frames, CQT.n_bins)
    assert frames.chunks == (3 * n_frames, CQT.n_bins)
    assert frames.dtype == np.float32
    table = store.clip_table(group)
    assert set(table) == set(store.CLIP_COLUMNS)
    assert table["clip_id"].tolist() == [c[0] for c in CLIPS]
    labels = store.store_labels(group)
    assert labels == sorted({c[2] for c in CLIPS})
    assert [labels[i] for i in table["label_index"]] == [c[2] for c in CLIPS]
    np.testing.assert_array_equal(table["first_frame"], np.arange(len(CLIPS)) * n_frames)
    assert set(table["status"]) == {"pending"}
    assert store.store_cqt(group) == CQT
    assert store.n_chunks(group) == 3
    assert list(store.chunk_clips_range(group, 2)) == [6, 7]
    assert store.store_path(group) == str(tmp_path / "s.zarr")


def test_clip_groups_are_stored_updated_and_numbered_by_first_appearance(tmp_path):
    clips = [("a/1", "1.wav", "a", "zeta"), ("a/2", "2.wav", "a", "zeta"), ("b/3", "3.wav", "b", ""),
             ("b/4", "4.wav", "b", "alpha")]
    group = store.create_store(tmp_path / "g.zarr", CQT, clips, chunk_clips=2)
    assert store.clip_table(group)["group"].tolist() == ["zeta", "zeta", "b/3", "alpha"]
    assert store.clip_group_index(group).tolist() == [0, 0, 1, 2]
    digest = store.groups_digest(group)
    # Renaming groups keeps the partition, hence the digest; regrouping changes it.
    assert not store.update_groups(group, ["zeta", "zeta", "b/3", "alpha"])
    assert store.update_groups(group, ["x", "x", "b/3", "a"]) and store.groups_digest(group) == digest
    assert store.update_groups(group, ["x", "y", "b/3", "a"])
    assert store.clip_group_index(group).tolist() == [0, 1, 2, 3] and store.groups_digest(group) != digest
    with pytest.raises(ValueError, match="one entry per clip"):
        store.update_groups(group, ["x"])
    # A store made before the column: every clip is its own group.
    del group["clips"]["group"]
    assert store.clip_table(group)["group"].tolist() == ["a/1", "a/2", "b/3", "b/4"]


def test_readable_by_plain_zarr_without_pickles(group, tmp_path):
    meta = json.loads((tmp_path / "s.zarr" / "clips" / "clip_id" / "zarr.json").read_text())
    assert meta["data_type"] == "string"
    plain = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert plain["clips"]["label"][:].tolist() == [c[2] for c in CLIPS]
    assert plain.attrs["frames_per_clip"] == frames_per_clip(CQT)


def test_create_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="chunk_clips"):
        store.create_store(tmp_path / "a.zarr", CQT, CLIPS, chunk_clips=0)
    with pytest.raises(ValueError, match="unique"):
        store.create_store(tmp_path / "b.zarr", CQT, CLIPS + CLIPS[:1], chunk_clips=2)
    with pytest.raises(ValueError, match="at least one"):
        store.create_store(tmp_path / "c.zarr", CQT, [], chunk_clips=2)
    store.create_store(tmp_path / "d.zarr", CQT, CLIPS, chunk_clips=2)
    with pytest.raises(FileExistsError, match="overwrite"):
        store.create_store(tmp_path / "d.zarr", CQT, CLIPS, chunk_clips=2)
    again = store.create_store(tmp_path / "d.zarr", CQT, CLIPS[:2], chunk_clips=2, overwrite=True)
    assert again.attrs["n_clips"] == 2


def test_open_store_errors(tmp_path, group):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        store.open_store(tmp_path / "missing.zarr")
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w")
    with pytest.raises(ValueError, match="not a sae store"):
        store.open_store(tmp_path / "other.zarr")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="not a sae store"):
        store.open_store(tmp_path / "file.txt")
    group.attrs["sae_layout"] = store.LAYOUT_VERSION + 1
    with pytest.raises(ValueError, match="layout version"):
        store.open_store(tmp_path / "s.zarr")
    with pytest.raises(ValueError, match="mode must be"):
        store.open_store(tmp_path / "s.zarr", mode="w")


def test_update_clips_ok_clips_and_frame_rows(group):
    n_frames = store.store_frames_per_clip(group)
    store.update_clips(
        group,
        [
            {"index": 1, "status": "ok", "n_frames": n_frames},
            {"index": 4, "status": "error", "error_kind": "silent", "error": "quiet"},
            {"index": 6, "status": "ok", "n_frames": n_frames},
        ],
    )
    table = store.clip_table(group)
    assert table["status"].tolist() == ["pending", "ok", "pending", "pending", "error", "pending", "ok", "pending"]
    assert table["error_kind"][4] == "silent" and table["error"][4] == "quiet"
    np.testing.assert_array_equal(store.ok_clips(group), [1, 6])
    expected = np.concatenate([np.arange(i * n_frames, (i + 1) * n_frames) for i in (1, 6)])
    np.testing.assert_array_equal(store.frame_rows(group), expected)
    first = np.concatenate([np.arange(i * n_frames, i * n_frames + 5) for i in (6,)])
    np.testing.assert_array_equal(store.frame_rows(group, clips=[6, 4, 0], frames_per_clip=5), first)
    with pytest.raises(ValueError, match="frames_per_clip"):
        store.frame_rows(group, frames_per_clip=n_frames + 1)
    with pytest.raises(ValueError, match="status"):
        store.update_clips(group, [{"index": 0, "status": "done"}])
    assert [b[0] for b in store.pending_batches(group)] == [0, 1, 2]
    assert store.pending_batches(group)[2] == (2, [7])
    summary = store.ingest_summary(group)
    assert summary["counts"] == {"pending": 5, "ok": 2, "error": 1}
    assert summary["errors"][0]["kind"] == "silent"
    assert "| `b/c4` | silent | quiet |" in errors_markdown(summary)


def test_chunk_writes_are_aligned_and_concurrent_writes_match_serial(group, tmp_path, rng):
    n_frames = store.store_frames_per_clip(group)
    blocks = [rng.random((len(store.chunk_clips_range(group, c)) * n_frames, CQT.n_bins), dtype=np.float32)
              for c in range(store.n_chunks(group))]
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda c: store.write_chunk_frames(group, c, blocks[c]), range(3)))
    np.testing.assert_array_equal(store.frames_array(group)[:], np.concatenate(blocks))
    np.testing.assert_array_equal(store.read_chunk_frames(group, 1), blocks[1])
    with pytest.raises(ValueError, match="shape"):
        store.write_chunk_frames(group, 0, blocks[2])
    with pytest.raises(ValueError, match="chunk_index"):
        store.write_chunk_frames(group, 3, blocks[2])


def test_stage_groups(group, tmp_path):
    config = {"k": 10, "kernel": "exp"}
    stage = store.stage_group(tmp_path / "s.zarr", "graph", "abc123", config=config, mode="a")
    stage.create_array("x", data=np.arange(4))
    assert not store.is_complete(group, "graph", "abc123")
    store.mark_complete(stage)
    assert store.is_complete(tmp_path / "s.zarr", "graph", "abc123")
    assert not store.is_complete(group, "graph", "other")
    same = store.stage_group(group, "graph", "abc123", config=dict(config), mode="a")
    np.testing.assert_array_equal(same["x"][:], np.arange(4))
    with pytest.raises(ValueError, match="differs"):
        store.stage_group(group, "graph", "abc123", config={"k": 11}, mode="a")
    fresh = store.stage_group(group, "graph", "abc123", config={"k": 11}, mode="w")
    assert "x" not in fresh and fresh.attrs["complete"] is False and fresh.attrs["config"] == {"k": 11}
    assert store.stage_group(group, "graph", "abc123", mode="r").attrs["config"] == {"k": 11}
    with pytest.raises(KeyError, match="no group"):
        store.stage_group(group, "model", "zzz", mode="r")
    with pytest.raises(ValueError, match="stage"):
        store.stage_group(group, "a/b", "k", config={})
    with pytest.raises(ValueError, match="key"):
        store.stage_group(group, "graph", "clips/../x", config={})


def test_stage_groups_of_one_stage_created_at_once_by_several_threads(tmp_path):
    """Two tasks of a run (the baseline's and the codes' classification) create the first groups of a stage at
    the same moment: the stage's parent group must not be created twice (zarr's require_group is not atomic)."""
    import threading

    for attempt in range(20):
        root = store.create_store(tmp_path / f"race{attempt}.zarr", CQT, CLIPS, chunk_clips=3)
        barrier = threading.Barrier(4)

        def create(key: str, root=root, barrier=barrier) -> str:
            barrier.wait()
            return store.stage_group(root, "results", key, config={"key": key}).attrs["config"]["key"]

        with ThreadPoolExecutor(4) as pool:
            assert sorted(pool.map(create, ["a1", "b2", "c3", "d4"])) == ["a1", "b2", "c3", "d4"]


@pytest.mark.parametrize("shape, density", [((50, 40), 0.1), ((7, 3), 0.0), ((200, 200), 0.05)])
def test_sparse_round_trip_and_row_ranges(group, rng, shape, density):
    matrix = sp.random_array(shape, density=density, format="csr", dtype=np.float32, rng=rng)
    stage = store.stage_group(group, "graph", "k1", config={})
    store.write_sparse(stage, "laplacian", matrix, chunk_entries=16, chunk_rows=8)
    back = store.read_sparse(stage, "laplacian")
    assert isinstance(back, sp.csr_array) and back.dtype == np.float32 and back.shape == shape
    np.testing.assert_array_equal(back.toarray(), matrix.toarray())
    rows = store.read_sparse(stage, "laplacian", rows=slice(2, 6))
    np.testing.assert_array_equal(rows.toarray(), matrix.toarray()[2:6])
    assert stage["laplacian"]["indptr"].dtype == np.int64
    assert stage["laplacian"]["indices"].dtype == np.int32
    with pytest.raises(KeyError, match="no sparse matrix"):
        store.read_sparse(stage, "nothing")


# --------------------------------------------------------------------------- integrity


def _ingested(group, rng):
    """Every clip ok, with random frames and their checksums, as an ingestion leaves them."""
    n_frames = frames_per_clip(CQT)
    frames = rng.random((len(CLIPS) * n_frames, CQT.n_bins)).astype(np.float32)
    for chunk in range(store.n_chunks(group)):
        clips = store.chunk_clips_range(group, chunk)
        store.write_chunk_frames(group, chunk, frames[clips.start * n_frames : clips.stop * n_frames])
    store.update_clips(group, [
        {"index": i, "status": "ok", "n_frames": n_frames,
         "checksum": store.frames_checksum(frames[i * n_frames : (i + 1) * n_frames])} for i in range(len(CLIPS))
    ])
    return frames


def _chunk_file(path, array, *index):
    return path / array / "c" / "/".join(str(i) for i in index)


def test_every_array_is_checksummed_with_nan_fill(group, tmp_path):
    meta = json.loads((tmp_path / "s.zarr" / "frames" / "zarr.json").read_text())
    assert [codec["name"] for codec in meta["codecs"]][-1] == "crc32c"
    assert np.isnan(store.frames_array(group)[0]).all()  # never written: NaN, not zeros
    ints = store.create_array(group, "zeros", shape=(4,), dtype="int32", data=np.zeros(4, np.int32))
    assert ints.nchunks_initialized == 1  # an all-fill chunk is on disk too: a missing chunk is always damage


def test_frames_problems_name_missing_damaged_and_changed_clips(group, tmp_path, rng):
    frames = _ingested(group, rng)
    assert store.frames_problems(group) == {}
    _chunk_file(tmp_path / "s.zarr", "frames", 1, 0).unlink()  # clips 3, 4, 5
    chunk2 = _chunk_file(tmp_path / "s.zarr", "frames", 2, 0)
    data = bytearray(chunk2.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: the chunk's CRC-32C no longer matches
    chunk2.write_bytes(bytes(data))
    n_frames = frames_per_clip(CQT)
    changed = frames[:3 * n_frames].copy()
    changed[5, 3] += 1.0  # clip 0 rewritten with other values behind the clip table's back
    store.write_chunk_frames(group, 0, changed)
    problems = store.frames_problems(group)
    assert sorted(problems) == [0, 3, 4, 5, 6, 7]
    assert "CRC-32 mismatch" in problems[0]
    assert all("chunk 1 of frames is missing" in problems[i] for i in (3, 4, 5))
    assert all("chunk 2 of frames cannot be read" in problems[i] for i in (6, 7))
    store.mark_damaged(group, problems)
    table = store.clip_table(group)
    assert [s for s in table["status"]] == ["pending", "ok", "ok", "pending", "pending", "pending", "pending",
                                            "pending"]
    assert table["error"][3].startswith("damaged: chunk 1 of frames is missing")
    assert [b[0] for b in store.pending_batches(group)] == [0, 1, 2]


def test_stage_problems_check_the_manifest_and_the_inputs(group, tmp_path, rng):
    source = store.stage_group(group, "preprocess", "p", config={"a": 1}, mode="w")
    store.create_array(source, "X", shape=(10, 3), chunks=(4, 3), dtype="float32", data=rng.random((10, 3)))
    store.mark_complete(source, version="v1")
    derived = store.stage_group(group, "graph", "g", config={}, mode="w")
    store.write_sparse(derived, "laplacian", sp.random(10, 10, density=0.3, random_state=0))
    store.mark_complete(derived, inputs=[source])
    assert derived.attrs["arrays"] == {"laplacian/data": [derived["laplacian/data"].shape[0]],
                                       "laplacian/indices": [derived["laplacian/indices"].shape[0]],
                                       "laplacian/indptr": [11]}
    assert store.is_complete(group, "preprocess", "p") and store.is_complete(group, "graph", "g")
    assert store.stage_problems(group, "graph", "nope") == ["graph/nope does not exist"]

    _chunk_file(tmp_path / "s.zarr", "preprocess/p/X", 1, 0).unlink()
    assert store.stage_problems(group, "preprocess", "p") == ["preprocess/p: array 'X' has 1 of its 3 chunks missing"]
    source = store.stage_group(group, "preprocess", "p", config={"a": 1}, mode="w")  # computed again ...
    store.create_array(source, "X", shape=(10, 3), chunks=(4, 3), dtype="float32", data=rng.random((10, 3)))
    store.mark_complete(source, version="v1")  # ... from the same data: what depends on it stays current
    assert store.is_complete(group, "graph", "g")
    store.mark_complete(source, version="v2")  # from other data: it does not
    assert store.stage_problems(group, "graph", "g") == ["graph/g: its input preprocess/p changed since it was computed"]
    store.mark_complete(source, version="v1")
    del group["graph/g/laplacian/indices"]
    assert store.stage_problems(group, "graph", "g") == ["graph/g: array 'laplacian/indices' is missing"]
    unfinished = store.stage_group(group, "model", "m", config={}, mode="w")
    with pytest.raises(store.StoreError, match="input 'model/m' is not complete"):
        store.mark_complete(derived, inputs=[unfinished])
    assert "not complete" in store.stage_problems(group, "model", "m")[0]


def test_check_location(tmp_path, group):
    assert store.check_location(tmp_path / "new.zarr") == tmp_path / "new.zarr"
    (tmp_path / "file.zarr").write_text("x")
    with pytest.raises(store.StoreError, match="is a file"):
        store.check_location(tmp_path / "file.zarr")
    with pytest.raises(store.StoreError, match="no store at"):
        store.check_location(tmp_path / "missing.zarr", exists=True)
    with pytest.raises(store.StoreError, match="folder .* does not exist"):
        store.check_location(tmp_path / "nowhere" / "new.zarr")
    import os
    if os.geteuid() != 0:  # root writes anything: the permission check cannot fail for it
        (tmp_path / "s.zarr" / "zarr.json").chmod(0o444)
        with pytest.raises(store.StoreError, match="read-only"):
            store.check_location(tmp_path / "s.zarr")


def _hold_lock(path, ready, release):  # runs in another process
    with store.store_lock(path):
        ready.set()
        release.wait(30)


def test_store_lock_excludes_other_processes_and_says_who_holds_it(tmp_path):
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    ready, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_lock, args=(str(tmp_path / "s.zarr"), ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(store.StoreLocked, match=f"in use by another sae run \\(pid {holder.pid}, host"):
            with store.store_lock(tmp_path / "s.zarr", wait=0):
                pass
        with pytest.raises(store.StoreLocked, match="waited 1 s"):
            with store.store_lock(tmp_path / "s.zarr", wait=1.0, log_every=0.2):
                pass
    finally:
        release.set()
        holder.join(30)
    with store.store_lock(tmp_path / "s.zarr", wait=5):  # free again, and re-entrant in one process
        with store.store_lock(tmp_path / "s.zarr", wait=0):
            pass


def test_store_lock_is_released_when_its_process_is_killed(tmp_path):
    import multiprocessing
    import os
    import signal

    context = multiprocessing.get_context("spawn")
    ready, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_lock, args=(str(tmp_path / "s.zarr"), ready, release))
    holder.start()
    assert ready.wait(60)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(30)
    with store.store_lock(tmp_path / "s.zarr", wait=5):
        pass


def test_the_init_option_names_a_new_model_and_leaves_the_earlier_keys_as_they_were():
    """The default init ('uniform') is left out of a model's identity, so the stores trained before the option
    keep their models; 'frames' is another model."""
    from sae.config import ModelConfig, TrainConfig
    from sae.store.keys import model_identity, model_key

    default = TrainConfig(model=ModelConfig(n_atoms=16))
    assert "init" not in model_identity(default, "p", None)["train"]["model"]
    assert set(ModelConfig.model_fields) - set(model_identity(default, "p", None)["train"]["model"]) == {
        "init", "max_outer", "fit_method", "batch_size", "dictionary_rtol"}
    frames = TrainConfig(model=ModelConfig(n_atoms=16, init="frames"))
    assert model_identity(frames, "p", None)["train"]["model"]["init"] == "frames"
    assert model_key(frames, "p") != model_key(default, "p")


def test_a_tolerance_of_the_dictionary_step_names_a_new_model_and_none_leaves_the_earlier_keys():
    from sae.config import ModelConfig, PipelineConfig, TrainConfig
    from sae.store.keys import model_identity, model_key

    default = ModelConfig(n_atoms=16)
    assert "dictionary_rtol" not in default.model_dump() and "dictionary_rtol" not in PipelineConfig().model_dump_json()
    assert default.dictionary_tolerance == default.inner_tolerance == default.rtol
    tight = ModelConfig(n_atoms=16, inner_rtol=1e-3, dictionary_rtol=1e-7)
    assert (tight.inner_tolerance, tight.dictionary_tolerance) == (1e-3, 1e-7)
    assert ModelConfig.model_validate(tight.model_dump()) == tight
    assert model_identity(TrainConfig(model=tight), "p", None)["train"]["model"]["dictionary_rtol"] == 1e-7
    assert model_key(TrainConfig(model=tight), "p") != model_key(
        TrainConfig(model=tight.model_copy(update={"dictionary_rtol": None})), "p")


def test_the_online_fit_names_new_models_and_leaves_every_earlier_key_as_it_was():
    """fit_method and batch_size are left out of every dump of an alternating fit's configuration, so the
    fingerprints of all configurations holding a model (model keys, inductive results, sweeps) stay."""
    from sae.config import ClassifyConfig, ModelConfig, PipelineConfig, TrainConfig
    from sae.store.keys import model_identity, model_key

    default = ModelConfig(n_atoms=16)
    dumped = default.model_dump()
    assert "fit_method" not in dumped and "batch_size" not in dumped
    assert ModelConfig.model_validate(dumped) == default
    assert "fit_method" not in PipelineConfig().model_dump_json() and "fit_method" not in ClassifyConfig(
        model=default).model_dump_json()
    online = ModelConfig(n_atoms=16, fit_method="online", batch_size=64)
    assert ModelConfig.model_validate(online.model_dump()) == online
    identity = model_identity(TrainConfig(model=online), "p", None)["train"]["model"]
    assert identity["fit_method"] == "online" and identity["batch_size"] == 64
    assert model_key(TrainConfig(model=online), "p") != model_key(TrainConfig(model=default), "p")
    assert model_key(TrainConfig(model=online), "p") != model_key(
        TrainConfig(model=online.model_copy(update={"batch_size": 32})), "p")
