"""A trained model on new music: the model folder, `sae predict`, `sae encode`, against the in-store path.

One pipeline run (2 built-in genres x 10 clips of 4 s, 64 atoms, lambda_e > 0, the inductive protocol with
both methods and voting) is shared by the module; its model is exported by the pipeline itself.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import soundfile
from typer.testing import CliRunner

from flows.cli import USAGE_ERROR, app
from flows.pipeline import pipeline_flow, resolve_paths
from sae import load_model
from sae import store as sae_store
from sae.artifact import MANIFEST, ModelFolderError, classifier_types, export_model
from sae.classify import choose_C, make_classifier
from sae.config import BuiltinDatasetConfig, PipelineConfig
from sae.datasets import make_builtin_dataset
from sae.distributed import open_model
from sae.model import encode_direct, solve_codes
from sae.pooling import aggregate_clips, aggregate_options
from sae.preprocess import open_preprocessed
from sae.store.keys import stage_keys

N_GENRES, CLIPS, SECONDS = 2, 10, 4.0
NEW_CLIPS = 20  # per genre, of music the model never saw
SAMPLE_RATE = 22050


def config_of(store: Path) -> PipelineConfig:
    return PipelineConfig(**{
        "ingest": {"store": str(store), "chunk_clips": 8, "cqt": {"clip_samples": int(SECONDS * SAMPLE_RATE)},
                   "dataset": {"n_genres": N_GENRES, "clips_per_genre": CLIPS, "duration": SECONDS}},
        "preprocess": {"frames_per_clip": None},
        "graph": {"n_neighbors": 5, "block_size": 1024},
        "train": {"model": {"n_atoms": 64, "lambda_g": 0.0, "lambda_e": 10.0, "max_outer": 4, "max_inner": 50,
                            "rtol": 1e-4}, "block_size": 1024},
        "classify": {"n_windows": 2, "n_splits": 3, "n_repeats": 3, "classifier": "svc", "voting": True,
                     "protocol": "inductive", "encode_methods": ["exact", "encoder"]},
        "cluster": "local",
    })


@pytest.fixture(scope="module")
def trained(prefect_harness, tmp_path_factory):
    folder = tmp_path_factory.mktemp("predict")
    config = resolve_paths(config_of(folder / "train.zarr"))
    out = pipeline_flow(config)
    return {"config": config, "store": out["store"], "model": out["model"], "keys": stage_keys(config),
            "data": folder / "train-data", "folder": folder}


@pytest.fixture
def runner():
    return CliRunner()


def training_clips(store: str) -> tuple[np.ndarray, list[str]]:
    """Row -> clip mapping of the preprocessed frames and the audio file of every clip in row order."""
    root = sae_store.open_store(store)
    row_clips = open_preprocessed(store, stage_keys(config_of(Path(store)))["preprocess"])["clip_index"][:]
    paths = sae_store.clip_table(root)["path"]
    return row_clips, [str(paths[c]) for c in dict.fromkeys(row_clips.tolist())]


def test_the_model_folder_records_what_the_store_trained(trained):
    folder, config, keys = Path(trained["model"]), trained["config"], trained["keys"]
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["layout"] == 2 and set(manifest["files"]) == {p.name for p in folder.iterdir()} - {MANIFEST}
    assert {"classifier-encoder.skops", "classifier-exact.skops", "components.npy", "encoder.npy", "offset.npy",
            "scale.npy"} <= set(manifest["files"])
    assert "train_codes.npy" not in manifest["files"]  # lambda_g = 0: no training graph to carry
    model = load_model(folder)
    assert model.cqt == config.ingest.cqt and model.preprocess == config.preprocess
    assert model.classify == config.classify and model.model == config.train.model
    assert model.methods == ("encoder", "exact") and model.classes_.tolist() == ["blues", "classical"]
    state = open_model(trained["store"], keys["model"])
    np.testing.assert_array_equal(model.components_, state["components"])
    np.testing.assert_array_equal(model.encoder_, state["encoder"])
    summaries = sae_store.stage_group(trained["store"], "results", keys["results"], mode="r").attrs["summaries"]
    assert model.info["accuracy"]["sae_inductive_exact"]["accuracy_mean"] == summaries["sae_inductive_exact"][
        "accuracy_mean"]
    for method in model.methods:
        assert classifier_types(folder / f"classifier-{method}.skops") >= {"sklearn.svm._classes.SVC"}
    # Each method has its own classifier, fitted on the training clips coded by that method.
    svc = {method: classifier[-1] if hasattr(classifier, "steps") else classifier
           for method, classifier in model.classifiers_.items()}
    assert set(svc) == {"encoder", "exact"} and model.classifier_ is model.classifiers_["exact"]
    assert not np.array_equal(svc["exact"].support_vectors_, svc["encoder"].support_vectors_)


@pytest.mark.slow
def test_round_trip_in_a_fresh_process_gives_the_in_store_codes_and_predictions(trained, tmp_path):
    store, keys, config = trained["store"], trained["keys"], trained["config"]
    row_clips, paths = training_clips(store)
    script = textwrap.dedent("""
        import sys, numpy as np, sae
        model = sae.load_model(sys.argv[1])
        out = {}
        for method in model.methods:
            out["codes_" + method] = model.transform(sys.argv[3:], method=method)
            out["predicted_" + method] = model.predict(sys.argv[3:], method=method)
        np.savez(sys.argv[2], **out)
    """)
    result = subprocess.run([sys.executable, "-c", script, trained["model"], str(tmp_path / "out.npz"), *paths],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    fresh = np.load(tmp_path / "out.npz", allow_pickle=False)

    # The in-store path: the stored model input, the stored model, the library's Z step and direct encoder.
    X = open_preprocessed(store, keys["preprocess"])["X"][:]
    state, model = open_model(store, keys["model"]), config.train.model
    # lambda_g = 0: "exact" is every frame's lasso by its homotopy path (sae.lars), the minimiser that the
    # training's coordinate descent certifies to the same tolerance
    Z0 = np.zeros((X.shape[0], model.n_atoms), np.float32)
    step = dict(lambda_d=model.lambda_d, lambda_z=model.lambda_z, lambda_e=model.lambda_e,
                rtol=model.inner_tolerance, max_iter=model.max_inner)
    path = solve_codes(X, state["components"], state["encoder"], None, Z0, method="lars", **step)
    descent = solve_codes(X, state["components"], state["encoder"], None, Z0, method="cd", **step)
    assert path.objective[-1] <= descent.objective[-1] * (1 + 1e-6)
    assert descent.objective[-1] <= path.objective[-1] * (1 + model.inner_tolerance)
    in_store = {"encoder": encode_direct(X, state["encoder"], model.lambda_z, model.lambda_e),
                "exact": path.solution}
    # ... and per method a classifier fitted on every clip coded by that method (the frames' codes do not depend
    # on the batch, so all clips at once give the codes of each clip alone), voting per clip.
    classify = config.classify
    options = aggregate_options(classify)
    clip_labels = sae_store.clip_table(sae_store.open_store(store))["label_index"]
    labels = sae_store.store_labels(sae_store.open_store(store))
    for method, codes in in_store.items():
        train = aggregate_clips(codes, row_clips, clip_labels=clip_labels, **options)
        # C from the configured grid by folds grouped as the store groups its clips.
        C = choose_C(train.vectors, train.labels,
                     sae_store.clip_group_index(sae_store.open_store(store))[train.groups], classify)
        classifier = make_classifier(classify.classifier, C=C, scaling=classify.scaling,
                                     random_state=classify.random_state).fit(train.vectors, train.labels)
        np.testing.assert_allclose(fresh[f"codes_{method}"], codes, rtol=1e-5, atol=1e-6)
        vectors = aggregate_clips(codes, row_clips, **options)
        votes = classifier.predict(vectors.vectors).reshape(len(paths), -1)
        expected = [labels[np.bincount(row, minlength=len(labels)).argmax()] for row in votes]
        assert fresh[f"predicted_{method}"].tolist() == expected


def test_an_export_on_a_cluster_equals_the_export_in_process(trained, tmp_path, monkeypatch):
    """The training clips encoded by tasks of 3 clips on 2 workers give the classifiers of the pipeline's own
    export (in process), to the bit; with a client that is not the default one, as `sae run` and `sae export`
    make theirs."""
    from distributed import Client, LocalCluster

    import sae.artifact
    from flows._dask import LOOPBACK

    monkeypatch.setattr(sae.artifact, "PART_CLIPS", 3)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, **LOOPBACK) as cluster, \
            Client(cluster, set_as_default=False) as client:
        export_model(trained["store"], tmp_path / "model", client=client)
    serial, distributed = load_model(trained["model"]), load_model(tmp_path / "model")
    _, paths = training_clips(trained["store"])
    for method in serial.methods:
        vectors = serial.features(paths[:4], method=method)
        np.testing.assert_array_equal(distributed.classifiers_[method].decision_function(vectors),
                                      serial.classifiers_[method].decision_function(vectors))


def accuracy_bound(summary: dict, n_clips: int, accuracy: float, n_new: int) -> tuple[float, float]:
    """The inductive clip accuracy and 3 standard errors of its difference with ``accuracy`` on n_new new clips.

    The two proportions are compared as by the two-proportion z-test: the binomial variance at their pooled
    proportion (not at the inductive estimate alone, whose variance vanishes near 100 %), for the n_clips clips
    of the store (each tested once per repetition) and the n_new new clips; the variance of the inductive mean
    over its folds (fold std / sqrt(folds), ddof 0) is added, for what the folds' models differ by.
    """
    voting = summary["voting"]
    p, n_folds = voting["accuracy_mean"], summary["n_scores"]
    pooled = (p * n_clips + accuracy * n_new) / (n_clips + n_new)
    variance = pooled * (1 - pooled) * (1 / n_clips + 1 / n_new) + voting["accuracy_std"] ** 2 / n_folds
    return p, 3 * math.sqrt(variance)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["exact", "encoder"])
def test_held_out_clips_are_classified_within_noise_of_the_inductive_protocol(trained, runner, method):
    new = trained["folder"] / "new-music"
    if not new.exists():
        make_builtin_dataset(new, BuiltinDatasetConfig(n_genres=N_GENRES, clips_per_genre=NEW_CLIPS, duration=SECONDS,
                                                       seed=1))
    result = runner.invoke(app, ["predict", "--model", trained["model"], "--method", method, "--json", str(new)])
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)["results"]
    assert len(records) == N_GENRES * NEW_CLIPS and {r["status"] for r in records} == {"ok"}
    accuracy = np.mean([r["label"] == Path(r["path"]).parent.name for r in records])
    summaries = sae_store.stage_group(trained["store"], "results", trained["keys"]["results"], mode="r").attrs[
        "summaries"]
    expected, bound = accuracy_bound(summaries[f"sae_inductive_{method}"], N_GENRES * CLIPS, accuracy, len(records))
    assert abs(accuracy - expected) <= bound, (method, accuracy, expected, bound)
    # With 20 clips in the store that bound is wide (about 0.3): the new clips must also be far above chance
    # (one-sided binomial test), which a classifier fitted on codes of another kind would not be.
    right = sum(r["label"] == Path(r["path"]).parent.name for r in records)
    assert scipy.stats.binomtest(right, len(records), 1 / N_GENRES, alternative="greater").pvalue < 0.01, right


def bad_and_good_files(folder: Path, data: Path) -> dict[str, str | None]:
    """Two good clips and one bad file of each kind; name -> expected error kind (None: classified)."""
    folder.mkdir()
    good = sorted(data.glob("*/*.wav"))[::CLIPS][:2]
    for path in good:
        shutil.copy(path, folder / path.name)
    t = np.arange(int(SECONDS * SAMPLE_RATE)) / SAMPLE_RATE
    (folder / "junk.wav").write_text("this is not audio\n")
    (folder / "empty.wav").write_bytes(b"")
    soundfile.write(folder / "short.wav", np.sin(2 * np.pi * 440 * t[:SAMPLE_RATE // 2]), SAMPLE_RATE)
    soundfile.write(folder / "silent.wav", np.zeros_like(t), SAMPLE_RATE)
    soundfile.write(folder / "loud.wav", 100 * np.sin(2 * np.pi * 440 * t), SAMPLE_RATE, subtype="FLOAT")
    return {**{path.name: None for path in good}, "junk.wav": "corrupt", "empty.wav": "empty",
            "short.wav": "too_short", "silent.wav": "silent", "loud.wav": "out_of_range"}


@pytest.mark.slow
def test_bad_files_among_good_ones_are_reported_and_the_others_classified(trained, runner, tmp_path):
    expected = bad_and_good_files(tmp_path / "mixed", trained["data"])
    result = runner.invoke(app, ["predict", "--model", trained["model"], "--json", str(tmp_path / "mixed")])
    assert result.exit_code == 1, result.output
    records = {Path(r["path"]).name: r for r in json.loads(result.stdout)["results"]}
    assert {name: r.get("error_kind") for name, r in records.items()} == expected
    for name, kind in expected.items():
        if kind is None:
            assert records[name]["label"] == name.split(".")[0]  # training clips: their own genre
    text = runner.invoke(app, ["predict", "--model", trained["model"], str(tmp_path / "mixed" / "junk.wav"),
                               str(tmp_path / "mixed" / sorted(n for n, k in expected.items() if k is None)[0])])
    assert text.exit_code == 1 and "junk.wav\terror corrupt:" in text.stdout and "1 of 2 files" in text.stderr

    # The same folder as a collection: the store's clip table has the same kinds, a rerun has nothing to do.
    from flows.predict import predict_flow
    from sae.collection import pending_chunks

    out = tmp_path / "mixed.zarr"
    first = predict_flow(model=trained["model"], data=str(tmp_path / "mixed"), out=str(out), chunk_clips=3)
    assert first["complete"] and first["counts"] == {"pending": 0, "ok": 2, "error": 5}
    rows = {Path(r["path"]).name: r for r in first["rows"]}
    assert {name: r.get("error_kind") for name, r in rows.items()} == expected
    assert all(rows[name]["predicted"] == records[name]["label"] for name, kind in expected.items() if kind is None)
    assert [chunk for chunk, clips in pending_chunks(str(out), first["key"]) if not clips] == []  # errors retried
    again = predict_flow(model=trained["model"], data=str(tmp_path / "mixed"), out=str(out), chunk_clips=3)
    assert again["rows"] == first["rows"] and Path(again["csv"]).is_file()
    model, name = load_model(trained["model"]), next(n for n, k in expected.items() if k is None)
    index = [Path(r["path"]).name for r in first["rows"]].index(name)
    encoded = sae_store.stage_group(str(out), "encode", first["key"], mode="r")
    n_rows = model.n_rows
    np.testing.assert_allclose(encoded["codes"][index * n_rows : (index + 1) * n_rows],
                               model.transform(tmp_path / "mixed" / name), rtol=1e-6, atol=1e-7)
    assert first["agreement"] is None  # files directly in the folder: no labels to compare with

    # With labels (a manifest; one label the model does not know): the clips whose label it knows are counted.
    good = sorted(n for n, k in expected.items() if k is None)
    manifest = tmp_path / "labelled.csv"
    manifest.write_text("path,label\n" + "".join(f"{tmp_path / 'mixed' / n},{n.split('.')[0]}\n" for n in good)
                        + f"{tmp_path / 'mixed' / good[0]},polka\n")
    labelled = predict_flow(model=trained["model"], data=str(manifest), out=str(tmp_path / "labelled.zarr"))
    assert labelled["agreement"] == {"clips": 2, "correct": 2, "accuracy": 1.0}
    assert "Given label predicted for 2 of the 2" in Path(labelled["markdown"]).read_text()


def tampered_copy(trained, tmp_path: Path, name: str) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(trained["model"], copy)
    data = bytearray((copy / name).read_bytes())
    data[-1] ^= 0x01
    (copy / name).write_bytes(bytes(data))
    return copy


def test_a_file_modified_after_export_is_refused(trained, tmp_path, runner):
    copy = tampered_copy(trained, tmp_path, "components.npy")
    with pytest.raises(ModelFolderError, match=r"components\.npy: modified after export"):
        load_model(copy)
    result = runner.invoke(app, ["predict", "--model", str(copy), str(trained["data"])])
    assert result.exit_code == USAGE_ERROR and "components.npy: modified after export" in result.output


def test_another_layout_and_untrusted_classifier_types_are_refused(trained, tmp_path):
    import skops.io
    from sklearn.tree import DecisionTreeClassifier

    copy = tmp_path / "model"
    shutil.copytree(trained["model"], copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    (copy / MANIFEST).write_text(json.dumps({**manifest, "layout": 1}))
    with pytest.raises(ModelFolderError, match="has layout version 1; .* reads layout version 2 only"):
        load_model(copy)
    # A classifier of a type outside the trusted list, with a manifest that matches it: refused all the same.
    skops.io.dump(DecisionTreeClassifier().fit([[0.0], [1.0]], [0, 1]), copy / "classifier-encoder.skops")
    import hashlib

    data = (copy / "classifier-encoder.skops").read_bytes()
    manifest["files"]["classifier-encoder.skops"] = {"sha256": hashlib.sha256(data).hexdigest(),
                                                     "bytes": len(data)}
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ModelFolderError, match="DecisionTreeClassifier"):
        load_model(copy)


def test_a_model_json_without_a_methods_classifier_is_refused(trained, tmp_path):
    import hashlib

    copy = tmp_path / "model"
    shutil.copytree(trained["model"], copy)
    meta = json.loads((copy / "model.json").read_text())
    assert {"encoder", "exact"} <= set(meta["classifiers"])
    del meta["classifiers"]["encoder"]
    data = json.dumps(meta).encode()
    (copy / "model.json").write_bytes(data)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["files"]["model.json"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ModelFolderError, match=r"no classifier for the methods \['encoder'\]"):
        load_model(copy)


def test_inputs_that_cannot_be_used_stop_the_commands_before_any_work(trained, tmp_path, runner):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not audio")
    cases = [
        (["predict", "--model", str(tmp_path / "absent"), str(trained["data"])], "no sae model at"),
        (["predict", "--model", trained["model"], str(tmp_path / "notes.txt")], "is not an audio file"),
        (["predict", "--model", trained["model"], str(tmp_path / "empty")], "holds no audio file"),
        (["predict", "--model", trained["model"], str(tmp_path / "absent.wav")], "no such file or folder"),
        (["predict", "--model", trained["model"], "--method", "exact_graph", str(trained["data"])],
         "method must be one of this model's methods"),
        (["encode", "--model", trained["model"], "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o.zarr")],
         "holds no audio file"),
        (["encode", "--model", trained["model"], "--data", str(trained["data"]), "--out", str(tmp_path / "notes.txt")],
         "is a file"),
        (["export", "--store", str(tmp_path / "absent.zarr")], "no sae store"),
        (["export", "--store", trained["store"], "--out", trained["model"]], "already exists"),
        (["export", "--store", trained["store"], "--model", "nokey", "--out", str(tmp_path / "m")], "no complete model"),
    ]
    for args, needle in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == USAGE_ERROR and needle in result.output, (args, result.output)
    assert not (tmp_path / "o.zarr").exists() and not (tmp_path / "m").exists()
