"""The model folder: everything needed to go from audio to a genre, exported from a store, loaded safely.

Layout (version `MODEL_LAYOUT`; orientation samples by features, see :mod:`sae`)::

    <model>/
      manifest.json      format "sae-model", layout, sae_version, created, and files:
                         name -> {"sha256", "bytes"} for every other file of the folder
      model.json         labels; the configurations, each as its model_dump(mode="json"):
                         cqt (CQTConfig), preprocess (PreprocessConfig), model (ModelConfig, with the
                         weights trained with), train (TrainConfig), classify (ClassifyConfig),
                         graph (GraphConfig or null); frames_per_clip (F of the CQT), sigma (of the
                         training graph), method (default) and methods; classifiers (method -> file)
                         and classifier_codes (method -> the codes its classifier was fitted on);
                         accuracy (the cross-validated summaries of the store, per feature set);
                         source (store, keys, versions); arrays (name -> file)
      offset.npy, scale.npy        (n_bins,) float64: X = (F - offset) / scale
      components.npy               (n_atoms, n_bins): C
      encoder.npy                  (n_atoms, n_bins): E, when lambda_e > 0
      classifier-<method>.skops    per encoding method, the scikit-learn classifier fitted on the
                                   training clips coded as that method codes new music
                                   (`sae.inference.classifier_codes`), in skops' format (no pickle)
      train_frames.npy             (N, n_bins)   the training frames X_T,       } when lambda_g > 0:
      train_codes.npy              (N, n_atoms)  their learned codes Z_T,       } the method
      train_degrees.npy            (N,) float64  their degrees in the graph     } "exact_graph"

Arrays are ``.npy`` files read with ``allow_pickle=False`` (the training graph's
memory-mapped); JSON holds everything else.  Loading (`load_model`) checks,
before reading anything else, the manifest's format and layout version (another
version is refused: export the model again) and the SHA-256 of every file it
lists (a file modified after export is refused, by name); then every classifier's
types against `TRUSTED_TYPES` (`classifier_types` reads skops' JSON schema
without building anything), and only then lets skops build it.  The checksums
detect damage and edits, not a forger who rewrites the manifest too: the
trusted-types check is what keeps a model folder from running code.

>>> MODEL_LAYOUT, MANIFEST
(2, 'manifest.json')
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from sae import __version__
from sae.config import ClassifyConfig, CQTConfig, GraphConfig, ModelConfig, PreprocessConfig, TrainConfig
from sae.inference import (DEFAULT_METHOD, METHODS, ClipCodes, TrainedModel, TrainingGraph, available_methods,
                           classifier_codes)
from sae.outer import iterations_done

__all__ = [
    "MODEL_LAYOUT",
    "MANIFEST",
    "TRUSTED_TYPES",
    "ModelFolderError",
    "export_model",
    "load_model",
    "cached_model",
    "verify_folder",
    "classifier_types",
    "model_keys",
    "resolve_model_key",
    "exported_source",
]

logger = logging.getLogger(__name__)

MODEL_LAYOUT = 2
"""Version of the layout of a model folder (module docstring); another is refused at load.  Layout 1 had one
classifier, fitted on the training codes, for every method."""

MANIFEST = "manifest.json"
"""The file listing every other file of a model folder with its SHA-256."""

FORMAT = "sae-model"

TRUSTED_TYPES = (
    "sklearn.svm._classes.SVC",
    "sklearn.svm._classes.LinearSVC",
    "sklearn.linear_model._logistic.LogisticRegression",
    "sklearn.linear_model._ridge.RidgeClassifier",
    "sklearn.preprocessing._label.LabelBinarizer",
    "sklearn.preprocessing._data.MinMaxScaler",
    "sklearn.preprocessing._data.StandardScaler",
    "sklearn.pipeline.Pipeline",
    "builtins.dict",
    "builtins.list",
    "builtins.tuple",
    "builtins.str",
    "builtins.int",
    "builtins.float",
    "builtins.bool",
    "numpy.ndarray",
    "numpy.float64",
    "numpy.float32",
    "numpy.int64",
    "numpy.int32",
)
"""Every type a classifier file may hold (the classifiers of `sae.classify.make_classifier`, their scalers and
pipeline, and the containers and numbers they are made of); a file naming any other is refused at load, and at
export."""

_GRAPH_ARRAYS = ("train_frames", "train_codes", "train_degrees")

_CLASSIFIER_CODES = {
    "encoder": "every training clip encoded on its own by the encoder",
    "exact": "every training clip encoded on its own by the exact Z step (no graph term)",
    "exact_graph": "the training codes (learned with the graph term)",
}


class ModelFolderError(ValueError):
    """A model folder that cannot be exported or loaded; the message names the file and what to do."""


# --------------------------------------------------------------------------- files


COPY_BYTES = 64 * 2**20
"""Bytes of an array read and written at a time when a stored array is exported (`save_rows`)."""


def save_rows(path: str | os.PathLike, values: Any, *, block_bytes: int = COPY_BYTES) -> None:
    """Write an array, in memory or stored (Zarr or Dask: read by blocks of rows), as a ``.npy`` file.

    The file is the one `numpy.save` writes (C order, the array's dtype), but a stored array is copied
    ``block_bytes`` of rows at a time: the training graph's frames and codes are never whole in memory.
    """
    from sae.pooling import read_rows

    if isinstance(values, np.ndarray):
        np.save(path, np.ascontiguousarray(values), allow_pickle=False)
        return
    dtype, shape = np.dtype(values.dtype), tuple(int(n) for n in values.shape)
    row_bytes = dtype.itemsize * math.prod(shape[1:])
    step = max(1, block_bytes // max(1, row_bytes))
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(
            handle, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
        for first in range(0, shape[0] if shape else 0, step):
            rows = read_rows(values, first, min(first + step, shape[0]))
            handle.write(memoryview(np.ascontiguousarray(rows, dtype=dtype)).cast("B"))


def _degrees(group: Any, name: str, *, block_rows: int = 1 << 20) -> np.ndarray:
    """`sae.graph.degree_vector` of a stored sparse matrix, read by blocks of rows."""
    from sae.graph import degree_vector
    from sae.store import read_sparse

    n_rows = int(group[name].attrs["shape"][0])
    return np.concatenate([degree_vector(read_sparse(group, name, slice(first, min(first + block_rows, n_rows))))
                           for first in range(0, n_rows, block_rows)] or [np.zeros(0)])


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def classifier_types(path: str | os.PathLike) -> set[str]:
    """Every type (``module.Class``) a skops file names, read from its JSON schema (nothing is built).

    Raises
    ------
    ModelFolderError
        Not a skops file (no zip with a ``schema.json``).
    """
    try:
        with zipfile.ZipFile(path) as archive:
            schema = json.loads(archive.read("schema.json"))
    except (zipfile.BadZipFile, KeyError, ValueError) as error:
        raise ModelFolderError(f"{path}: not a skops classifier file ({error})") from None
    found: set[str] = set()
    pending = [schema]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            if "__class__" in node:
                found.add(f"{node.get('__module__')}.{node['__class__']}")
            pending += node.values()
        elif isinstance(node, list):
            pending += node
    return found


def _check_types(path: Path) -> list[str]:
    found = classifier_types(path)
    untrusted = sorted(found - set(TRUSTED_TYPES))
    if untrusted:
        raise ModelFolderError(
            f"{path}: the classifier file names types outside sae.artifact.TRUSTED_TYPES: {untrusted}; "
            "it is not loaded"
        )
    return sorted(found)


def verify_folder(path: str | os.PathLike) -> dict[str, Any]:
    """Check a model folder's manifest (format, layout) and the SHA-256 of every file it lists; returns it.

    Raises
    ------
    ModelFolderError
        No folder, no manifest, another format or layout version, or a file
        missing, renamed out of the folder or modified after export (named).
    """
    folder = Path(path)
    if not folder.is_dir():
        what = "no such folder" if not folder.exists() else "a file, not a model folder"
        raise ModelFolderError(f"no sae model at {str(folder)!r}: {what} (export one with `sae export`)")
    manifest_path = folder / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise ModelFolderError(f"{str(folder)!r} is not a sae model folder: it has no {MANIFEST}") from None
    except (OSError, ValueError) as error:
        raise ModelFolderError(f"{manifest_path}: unreadable manifest ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ModelFolderError(f"{manifest_path}: not a sae model manifest (format {FORMAT!r} expected)")
    layout = manifest.get("layout")
    if layout != MODEL_LAYOUT:
        raise ModelFolderError(
            f"model folder {str(folder)!r} has layout version {layout}; this sae ({__version__}) reads layout "
            f"version {MODEL_LAYOUT} only: export the model again (sae export) with this version"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or "model.json" not in files:
        raise ModelFolderError(f"{manifest_path}: the manifest lists no model.json")
    for name, entry in files.items():
        if not isinstance(name, str) or Path(name).name != name or name.startswith(".") or name == MANIFEST:
            raise ModelFolderError(f"{manifest_path}: invalid file name {name!r} in the manifest")
        file = folder / name
        if not file.is_file():
            raise ModelFolderError(f"{file}: listed in {MANIFEST} but missing: the model folder is incomplete")
        if file.stat().st_size != entry.get("bytes") or _sha256(file) != entry.get("sha256"):
            raise ModelFolderError(
                f"{file}: modified after export (its SHA-256 differs from {MANIFEST}): the model is refused; "
                "export it again from its store"
            )
    return manifest


# --------------------------------------------------------------------------- loading


def _config(cls: Any, values: Any, name: str, where: Path) -> Any:
    from pydantic import ValidationError

    try:
        return cls.model_validate(values)
    except ValidationError as error:
        raise ModelFolderError(f"{where}: {name} is not a valid {cls.__name__} for this sae: {error}") from None


def load_model(path: str | os.PathLike, *, method: str | None = None) -> TrainedModel:
    """Load a model folder (`export_model`) as a `sae.inference.TrainedModel`, after checking it.

    The configurations are rebuilt with ``model_validate`` from what the
    folder records; ``method`` overrides the folder's default encoding method.

    Raises
    ------
    ModelFolderError
        The folder is not a sae model of this layout, a file was modified
        after export, or a classifier names an untrusted type.
    """
    import skops.io

    folder = Path(path)
    manifest = verify_folder(folder)
    meta_path = folder / "model.json"
    meta = json.loads(meta_path.read_text())
    arrays, classifier_files = meta.get("arrays", {}), meta.get("classifiers", {})
    missing = [name for name in [*arrays.values(), *classifier_files.values()] if name not in manifest["files"]]
    if not classifier_files or missing:
        raise ModelFolderError(f"{folder}: files {missing or ['classifier-<method>.skops']} are not in {MANIFEST}")

    def array(name: str, mmap: bool = False) -> np.ndarray | None:
        if name not in arrays:
            return None
        return np.load(folder / arrays[name], allow_pickle=False, mmap_mode="r" if mmap else None)

    classifiers = {}
    for name, file in classifier_files.items():
        classifier_path = folder / file
        classifiers[name] = skops.io.load(classifier_path, trusted=_check_types(classifier_path))
    try:
        graph = None
        if meta.get("graph") is not None and "train_codes" in arrays:
            graph = TrainingGraph(array("train_frames", True), array("train_codes", True), array("train_degrees"),
                                  float(meta["sigma"]), _config(GraphConfig, meta["graph"], "graph", meta_path))
        return TrainedModel(
            cqt=_config(CQTConfig, meta["cqt"], "cqt", meta_path),
            preprocess=_config(PreprocessConfig, meta["preprocess"], "preprocess", meta_path),
            model=_config(ModelConfig, meta["model"], "model", meta_path),
            classify=_config(ClassifyConfig, meta["classify"], "classify", meta_path),
            offset=array("offset"), scale=array("scale"), components=array("components"), encoder=array("encoder"),
            classifiers=classifiers, labels=meta["labels"], graph=graph, method=method or meta.get("method"),
            info={key: meta.get(key) for key in ("accuracy", "source", "sae_version", "created", "n_train_clips",
                                                  "n_train_frames", "frames_per_clip")}
            | {"path": str(folder.resolve()), "digest": _sha256(folder / MANIFEST)},
        )
    except ModelFolderError:
        raise
    except KeyError as error:
        raise ModelFolderError(f"{meta_path}: {error} is missing: not a model of this sae") from None
    except ValueError as error:  # arrays or classifiers that do not make a model (TrainedModel's checks)
        raise ModelFolderError(f"{folder}: {error}") from None


@functools.lru_cache(maxsize=4)
def _cached(path: str, digest: str) -> TrainedModel:
    return load_model(path)


def cached_model(path: str | os.PathLike) -> TrainedModel:
    """`load_model`, once per process for a folder whose manifest did not change (for the tasks of a batch)."""
    folder = Path(path).resolve()
    try:
        digest = _sha256(folder / MANIFEST)
    except OSError:
        return load_model(folder)  # raises the folder's error
    return _cached(str(folder), digest)


# --------------------------------------------------------------------------- export


def model_keys(store: str | os.PathLike) -> list[str]:
    """Keys of the complete trained models of a store (``model/<key>``; `sae.distributed.open_model`'s
    ``complete``)."""
    from sae import store as sae_store
    from sae.distributed import open_model
    from sae.store.keys import MODEL

    root = sae_store.open_store(store)
    return [key for key in sae_store.stages(root).get(MODEL, []) if sae_store.is_complete(root, MODEL, key)
            and open_model(root, key)["complete"]]


def resolve_model_key(store: str | os.PathLike, model_key: str | None = None) -> str:
    """``model_key`` if ``model/<model_key>`` is complete in the store, else the store's only complete model.

    Raises
    ------
    ModelFolderError
        No such complete model, or none or several when ``model_key`` is None (their keys are named).
    """
    keys = model_keys(store)
    if model_key is None:
        if len(keys) != 1:
            raise ModelFolderError(f"the store holds {len(keys)} complete models {keys}: name one with --model KEY"
                                   if keys else "the store holds no complete trained model: run `sae train` first")
        return keys[0]
    if model_key not in keys:
        raise ModelFolderError(f"the store has no complete model/{model_key}; complete models: {keys}")
    return model_key


def _results_for(root: Any, model_key: str, results_key: str | None) -> tuple[str | None, dict | None]:
    """The complete ``results/<key>`` that classified ``model/<model_key>``: the one named, else the latest.

    The classification of the model's codes is its own group (config ``source``
    ``model/<model_key>``); the table that shows it beside the baseline (config
    ``features``: feature set -> results key) is preferred, for its summaries.
    """
    from sae import store as sae_store
    from sae.store.keys import MODEL, RESULTS

    if results_key is not None:
        if not sae_store.is_complete(root, RESULTS, results_key):
            raise ModelFolderError(f"the store has no complete results/{results_key}")
        return results_key, dict(sae_store.stage_group(root, RESULTS, results_key, mode="r").attrs)
    complete = {}
    for key in sae_store.stages(root).get(RESULTS, []):
        if sae_store.is_complete(root, RESULTS, key):
            complete[key] = dict(sae_store.stage_group(root, RESULTS, key, mode="r").attrs)
    own = {key for key, attrs in complete.items()
           if str((attrs.get("config") or {}).get("source", "")).split("/")[:2] == [MODEL, model_key]}
    tables = [key for key, attrs in complete.items()
              if own & set(((attrs.get("config") or {}).get("features") or {}).values())]
    found = tables or sorted(own)
    if not found:
        return None, None
    key = max(found, key=lambda k: (complete[k].get("completed", ""), k))
    return key, complete[key]


def _accuracy(summaries: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name, summary in summaries.items():
        row = {k: summary.get(k) for k in ("accuracy_mean", "accuracy_std", "chance", "n_scores", "protocol")}
        if summary.get("voting"):
            row["clip_accuracy_mean"] = summary["voting"].get("accuracy_mean")
            row["clip_accuracy_std"] = summary["voting"].get("accuracy_std")
        out[name] = row
    return out


def _trained_config(group: Any, state: dict[str, Any]) -> tuple[TrainConfig, ModelConfig]:
    """The training configuration of ``model/<key>`` and the model's, with the weights it was trained with."""
    recorded = dict(group.attrs["config"]["train"])
    recorded["model"] = {**recorded["model"], "max_outer": int(group.attrs.get("max_outer", 1))}
    train = TrainConfig.model_validate(recorded)
    last = state["history"][-1]
    weights = {name: float(last[name]) for name in ("lambda_d", "lambda_z", "lambda_g", "lambda_e") if name in last}
    return train, train.model.model_copy(update=weights)


def _write_folder(folder: Path, meta: dict[str, Any], arrays: dict[str, np.ndarray], classifiers: dict[str, Any]
                  ) -> None:
    import skops.io

    meta["arrays"] = {}
    for name, values in arrays.items():
        if values is None:
            continue
        save_rows(folder / f"{name}.npy", values)
        meta["arrays"][name] = f"{name}.npy"
    meta["classifiers"] = {}
    for name, classifier in classifiers.items():
        file = f"classifier-{name}.skops"
        skops.io.dump(classifier, folder / file)
        _check_types(folder / file)
        meta["classifiers"][name] = file
    (folder / "model.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    files = {path.name: {"sha256": _sha256(path), "bytes": path.stat().st_size}
             for path in sorted(folder.iterdir()) if path.name != MANIFEST}
    manifest = {"format": FORMAT, "layout": MODEL_LAYOUT, "sae_version": __version__, "created": meta["created"],
                "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))


def export_model(
    store: str | os.PathLike,
    out: str | os.PathLike,
    *,
    model_key: str | None = None,
    results_key: str | None = None,
    method: str | None = None,
    graph: bool = True,
    overwrite: bool = False,
    client: Any = None,
) -> dict[str, Any]:
    """Export ``model/<model_key>`` of a store as a model folder at ``out`` (module docstring).

    The folder gets the store's CQT configuration and labels, the model's
    preprocessing (configuration, ``offset``, ``scale``), ``C`` and ``E`` with
    the weights trained with, the training graph's frames, codes and degrees
    when ``lambda_g > 0`` and ``graph`` (N x (n_bins + n_atoms + 1) numbers:
    without them the folder is small and has no method "exact_graph"), and per
    method a classifier (`sae.classify.fit_classifier`) fitted on the window
    vectors (`sae.pooling.aggregate_config`) of every training clip coded as
    that method codes new music (`sae.inference.classifier_codes`: each clip
    encoded on its own, streamed by chunks of clips; "exact_graph": the stored
    training codes; with a Dask ``client``, the clips are encoded and pooled by
    tasks of `PART_CLIPS` clips on its workers, `part_features`), with the ``ClassifyConfig`` of the
    store's classification of this model (``results_key``, default: the latest
    complete one; none: the defaults, and no accuracy).  ``model_key`` may be
    left out when the store holds one complete model.  The folder is written
    beside ``out`` and renamed into place; an existing ``out`` is replaced only
    with ``overwrite``.

    Returns
    -------
    dict
        ``path``, ``model_key``, ``results_key``, ``methods``, ``method``,
        ``accuracy`` and ``bytes`` (the folder's size).
    """
    from sae import store as sae_store
    from sae.classify import fit_classifier
    from sae.distributed import open_model
    from sae.pooling import aggregate_config
    from sae.preprocess import open_preprocessed
    from sae.store.keys import GRAPH, MODEL

    out = Path(out)
    if out.exists() and not overwrite:
        raise ModelFolderError(f"{str(out)!r} already exists: choose another --out or pass --force to replace it")
    root = sae_store.open_store(store)
    model_key = resolve_model_key(store, model_key)
    group = sae_store.stage_group(root, MODEL, model_key, mode="r")
    state = open_model(root, model_key)
    train, model = _trained_config(group, state)
    preprocess_key, graph_key = group.attrs["config"]["preprocess"], group.attrs["config"]["graph"]
    pre = open_preprocessed(root, preprocess_key)
    preprocess = PreprocessConfig.model_validate(pre.attrs["config"])
    results_key, results = _results_for(root, model_key, results_key)
    if results is None:
        logger.warning("model/%s was never classified in this store: the model folder gets the default "
                       "ClassifyConfig and no cross-validated accuracy", model_key)
        classify, accuracy = ClassifyConfig(), None
    else:
        classify = ClassifyConfig.model_validate(results["config"]["classify"])
        accuracy = _accuracy(results.get("summaries", {}))
    row_clips = pre["clip_index"][:]
    clip_labels = sae_store.clip_table(root)["label_index"]

    arrays: dict[str, Any] = {"offset": pre["offset"][:], "scale": pre["scale"][:],
                              "components": state["components"], "encoder": state["encoder"]}
    graph_config, sigma = None, None
    if graph and model.lambda_g > 0 and graph_key is not None:
        group_graph = sae_store.stage_group(root, GRAPH, graph_key, mode="r")
        graph_config = GraphConfig.model_validate(group_graph.attrs["config"])
        sigma = float(group_graph.attrs["sigma"])
        arrays.update(train_frames=pre["X"], train_codes=state["codes"],  # copied by blocks of rows
                      train_degrees=_degrees(group_graph, "adjacency"))
    methods = available_methods(model, graph_config is not None)
    if method is not None and method not in methods:
        raise ModelFolderError(f"method must be one of this model's methods {methods} ({METHODS}), got {method!r}")
    # C (with a grid) is chosen by grouped folds: the store's groups (recording, work), else the clips.
    clip_groups = sae_store.clip_group_index(root)
    classifiers = {}
    for name in methods:
        started = time.perf_counter()
        codes = classifier_codes(name, pre["X"], row_clips, state["codes"], state["components"], state["encoder"],
                                 model)
        if client is not None and isinstance(codes, ClipCodes):  # clips to encode: on the workers
            features = _cluster_features(client, str(sae_store.store_path(root)), preprocess_key, row_clips, name,
                                         state, model, classify, clip_labels)
        else:
            features = aggregate_config(codes, row_clips, classify, clip_labels=clip_labels)
        classifiers[name] = fit_classifier(features, classify, groups=clip_groups[features.groups])
        logger.info("classifier of method %s fitted on %d clips, %s (%.0f s)", name, features.clips.size,
                    _CLASSIFIER_CODES[name], time.perf_counter() - started)
    meta = {
        "labels": sae_store.store_labels(root),
        "cqt": sae_store.store_cqt(root).model_dump(mode="json"),
        "frames_per_clip": sae_store.store_frames_per_clip(root),
        "preprocess": preprocess.model_dump(mode="json"),
        "model": model.model_dump(mode="json"),
        "train": train.model_dump(mode="json"),
        "classify": classify.model_dump(mode="json"),
        "graph": None if graph_config is None else graph_config.model_dump(mode="json"),
        "sigma": sigma,
        "method": method or DEFAULT_METHOD,
        "methods": list(methods),
        "classifier_codes": {name: _CLASSIFIER_CODES[name] for name in methods},
        "accuracy": accuracy,
        "n_train_clips": int(np.unique(row_clips).size),
        "n_train_frames": int(row_clips.size),
        "source": {
            "store": str(Path(sae_store.store_path(root)).resolve()),
            "model_key": model_key,
            "model_version": group.attrs.get("version"),
            "results_key": results_key,
            "results_version": None if results is None else results.get("version"),
            "outer_iterations": iterations_done(state["history"]),  # epochs of an online fit
            "stop_reason": state["stop_reason"],
        },
        "sae_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    partial.mkdir()
    try:
        _write_folder(partial, meta, arrays, classifiers)
        if out.exists():
            shutil.rmtree(out)
        partial.rename(out)
    finally:
        if partial.exists():
            shutil.rmtree(partial)
    size = sum(path.stat().st_size for path in out.iterdir())
    logger.info("exported model/%s of %s to %s (%.1f MB, methods %s)", model_key, store, out, size / 1e6, methods)
    return {"path": str(out.resolve()), "model_key": model_key, "results_key": results_key, "methods": list(methods),
            "method": meta["method"], "accuracy": accuracy, "bytes": size}


PART_CLIPS = 32
"""Clips that one task encodes and pools when a model is exported with a Dask client (`part_features`)."""


def part_features(store: str, preprocess_key: str, start: int, stop: int, components: np.ndarray,
                  encoder: np.ndarray | None, model: ModelConfig, method: str, classify: ClassifyConfig,
                  clip_labels: np.ndarray) -> Any:
    """Window vectors of rows ``start:stop`` (whole clips) of ``preprocess/<preprocess_key>``, every clip encoded
    on its own by ``method`` (`sae.inference.ClipCodes`): a task of `export_model` on a cluster."""
    from sae.pooling import aggregate_config
    from sae.preprocess import open_preprocessed

    pre = open_preprocessed(store, preprocess_key)
    X, rows = pre["X"][start:stop], pre["clip_index"][start:stop]
    return aggregate_config(ClipCodes(X, rows, components, encoder, model, method), rows, classify,
                            clip_labels=clip_labels)


def _cluster_features(client: Any, store: str, preprocess_key: str, row_clips: np.ndarray, method: str,
                      state: dict[str, Any], model: ModelConfig, classify: ClassifyConfig,
                      clip_labels: np.ndarray) -> Any:
    """`part_features` of every `PART_CLIPS` clips on the client's workers, joined in row order."""
    from distributed import as_completed

    from sae.inference import PROGRESS_SECONDS
    from sae.pooling import AggregatedFeatures, clip_runs

    clips, starts, stops = clip_runs(row_clips)
    shared = client.scatter([np.asarray(state["components"]), state["encoder"], np.asarray(clip_labels)],
                            broadcast=True)
    futures = [client.submit(part_features, store, preprocess_key, int(starts[first]),
                             int(stops[min(first + PART_CLIPS, clips.size) - 1]), shared[0], shared[1], model,
                             method, classify, shared[2], pure=False)
               for first in range(0, clips.size, PART_CLIPS)]
    started = reported = time.perf_counter()
    for done, _ in enumerate(as_completed(futures, loop=client.loop), start=1):  # the client need not be the default
        if time.perf_counter() - reported >= PROGRESS_SECONDS:
            reported = time.perf_counter()
            logger.info("encoded %d of %d clips on their own on the cluster (method %s, %.0f s)",
                        min(done * PART_CLIPS, clips.size), clips.size, method, reported - started)
    parts = client.gather(futures)
    return AggregatedFeatures(np.concatenate([part.vectors for part in parts]),
                              np.concatenate([part.labels for part in parts]),
                              np.concatenate([part.groups for part in parts]),
                              np.concatenate([part.clips for part in parts]), parts[0].vectors_per_clip)


def exported_source(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``source`` a model folder records (store, keys, versions), or None when it is no intact model folder."""
    try:
        verify_folder(path)
        return json.loads((Path(path) / "model.json").read_text()).get("source")
    except (ModelFolderError, OSError, ValueError):
        return None
