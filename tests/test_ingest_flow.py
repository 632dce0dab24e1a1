"""The ingestion flow: store contents equal in-memory CQTs, for several runners and chunk sizes;
bad input classified; strict mode; an interrupted run resumes and recomputes only what is missing."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile
from prefect.task_runners import ThreadPoolTaskRunner
from prefect_dask import DaskTaskRunner

from flows._dask import LOOPBACK
from flows.ingest import run_ingest
from flows.pipeline import run_ingest_stage
from sae import store
from sae.audio import clip_frames, frames_per_clip, warm_up
from sae.config import BuiltinDatasetConfig, CQTConfig, IngestConfig, PipelineConfig
from sae.datasets import synthesize_clip

SR = 22050
CQT = CQTConfig(clip_samples=SR * 2)
N_CLIPS = 7


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A small GTZAN-style folder and the in-memory frames of its clips."""
    warm_up(CQT)
    root = tmp_path_factory.mktemp("data")
    paths = []
    for i in range(N_CLIPS):
        genre = ("jazz", "rock")[i % 2]
        (root / genre).mkdir(exist_ok=True)
        y = synthesize_clip(genre, np.random.default_rng([7, i]), duration=2.2, sample_rate=SR)
        path = root / genre / f"{genre}.{i:05d}.wav"
        soundfile.write(path, y, SR, subtype="PCM_16")
        paths.append(path)
    from sae.datasets import scan_folder

    clips = scan_folder(root)
    reference = np.concatenate([clip_frames(clip.path, CQT) for clip in clips])
    return root, clips, reference


def local_dask(n_workers, processes=False):
    kwargs = {"n_workers": n_workers, "threads_per_worker": 1, "processes": processes, **LOOPBACK}
    if processes:  # threads talk in-process; processes over TCP, on 127.0.0.1 only
        kwargs["host"] = "127.0.0.1"
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=kwargs)


def check_store(path, clips, reference):
    group = store.open_store(path)
    table = store.clip_table(group)
    assert table["clip_id"].tolist() == [c[0] for c in clips]
    assert set(table["status"]) == {"ok"}
    np.testing.assert_array_equal(store.frames_array(group)[:], reference)


@pytest.mark.parametrize(
    "runner, chunk_clips",
    [("threads", 1), ("threads", 3), ("threads", N_CLIPS), ("dask1", 3), ("dask2", 1)],
)
def test_store_equals_in_memory_frames(prefect_harness, dataset, tmp_path, runner, chunk_clips):
    root, clips, reference = dataset
    task_runner = {
        "threads": lambda: ThreadPoolTaskRunner(max_workers=2),
        "dask1": lambda: local_dask(1),
        "dask2": lambda: local_dask(2),
    }[runner]()
    config = IngestConfig(data=str(root), store=str(tmp_path / "s.zarr"), cqt=CQT, chunk_clips=chunk_clips)
    summary = run_ingest(config, task_runner)
    assert summary["counts"] == {"pending": 0, "ok": N_CLIPS, "error": 0}
    assert summary["computed"] == list(range(N_CLIPS))
    check_store(tmp_path / "s.zarr", clips, reference)
    again = run_ingest(config)  # resume of a complete store: nothing to do
    assert again["computed"] == [] and again["counts"]["ok"] == N_CLIPS


@pytest.mark.slow
@pytest.mark.integration
def test_real_worker_processes(prefect_harness, dataset, tmp_path):
    root, clips, reference = dataset
    config = IngestConfig(data=str(root), store=str(tmp_path / "s.zarr"), cqt=CQT, chunk_clips=2)
    summary = run_ingest(config, local_dask(2, processes=True))
    assert summary["counts"]["ok"] == N_CLIPS
    check_store(tmp_path / "s.zarr", clips, reference)


def test_interrupted_run_resumes(prefect_harness, dataset, tmp_path):
    root, clips, reference = dataset
    path = tmp_path / "s.zarr"
    config = IngestConfig(data=str(root), store=str(path), cqt=CQT, chunk_clips=3, retries=0)
    group = store.create_store(path, CQT, clips, chunk_clips=3)
    # A real I/O failure: a directory where batch 1 must write its chunk of frames.
    obstacle = path / "frames" / "c" / "1" / "0"
    obstacle.mkdir(parents=True)
    with pytest.raises(RuntimeError, match="re-run to resume"):
        run_ingest(config)
    table = store.clip_table(group)
    interrupted = list(store.chunk_clips_range(group, 1))
    assert [i for i in range(N_CLIPS) if table["status"][i] == "pending"] == interrupted
    assert all(table["status"][i] == "ok" for i in range(N_CLIPS) if i not in interrupted)
    shutil.rmtree(obstacle)
    summary = run_ingest(config)
    assert summary["computed"] == interrupted
    check_store(path, clips, reference)


def test_bad_inputs_are_recorded_and_strict_fails_at_the_end(prefect_harness, dataset, tmp_path):
    from tests.test_audio import make_bad_inputs

    root, clips, reference = dataset
    data = tmp_path / "data"
    shutil.copytree(root, data)
    bad = make_bad_inputs(data / "zbad")
    bad_kinds = {path.name: kind for kind, path in bad.items() if kind not in ("missing", "unreadable")}
    config = IngestConfig(data=str(data), store=str(tmp_path / "s.zarr"), cqt=CQT, chunk_clips=4, strict=True)
    with pytest.raises(RuntimeError, match="strict ingestion: 7 clip"):
        run_ingest_stage(PipelineConfig(ingest=config))
    with pytest.raises(RuntimeError, match="strict ingestion: 7 clip"):  # judged again when ingestion is skipped
        run_ingest_stage(PipelineConfig(ingest=config))
    group = store.open_store(tmp_path / "s.zarr")
    table = store.clip_table(group)
    n_frames = frames_per_clip(CQT)
    for index, path in enumerate(table["path"]):
        name = Path(path).name
        if name in bad_kinds:
            assert table["status"][index] == "error" and table["error_kind"][index] == bad_kinds[name]
            assert name in table["error"][index]
            assert table["n_frames"][index] == 0
        else:
            assert table["status"][index] == "ok" and table["n_frames"][index] == n_frames
    good = np.flatnonzero(table["status"] == "ok")
    np.testing.assert_array_equal(store.frames_array(group).get_orthogonal_selection(
        (store.frame_rows(group), slice(None))), reference)
    assert len(good) == N_CLIPS
    lenient = run_ingest(config.model_copy(update={"strict": False}))
    assert {e["kind"] for e in lenient["errors"]} == set(bad_kinds.values())
    assert sorted(lenient["computed"]) == sorted(np.flatnonzero(table["status"] == "error").tolist())


def test_builtin_dataset_beside_the_store(prefect_harness, tmp_path):
    dataset = BuiltinDatasetConfig(n_genres=2, clips_per_genre=2, duration=2.0)
    config = IngestConfig(store=str(tmp_path / "demo.zarr"), cqt=CQT, dataset=dataset, chunk_clips=2)
    summary = run_ingest(config)
    assert summary["counts"]["ok"] == 4
    assert (tmp_path / "demo-data" / "blues" / "blues.00000.wav").exists()
    group = store.open_store(tmp_path / "demo.zarr")
    assert store.store_labels(group) == ["blues", "classical"]
