"""Every name derived from a configuration or a store: stage keys, group names, paths beside a store.

A stage's result lives in the group ``<stage>/<key>`` of a store (`group_name`),
its key a fingerprint of what the result depends on, so that a configuration
names its results without opening the store (`stage_keys`).  Files that belong
to a store sit beside it: ``<store>-reports/`` (`report_folder`),
``<store>-models/<model key>`` (`default_model_path`), ``<store>-data``
(`builtin_data_folder`), ``<store>.lock`` (`lock_path`).  Nothing else in ``sae``
or ``flows`` computes a key or builds one of these names.

>>> group_name(RESULTS, "0c2d9e1b7a55")
'results/0c2d9e1b7a55'
>>> parse_source("preprocess/abc"), parse_source("model/def/codes_final")
(('preprocess', 'abc', 'X'), ('model', 'def', 'codes_final'))
>>> report_folder("/data/gtzan.zarr/").as_posix(), lock_path("/data/gtzan.zarr").name
('/data/gtzan.zarr-reports', 'gtzan.zarr.lock')
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sae.config import ClassifyConfig, IngestConfig, PipelineConfig, PreprocessConfig, TrainConfig

__all__ = [
    "INGEST", "PREPROCESS", "GRAPH", "MODEL", "RESULTS", "SWEEP", "ENCODE",
    "DEFAULT_ARRAYS", "INDUCTIVE_FIELDS", "INDUCTIVE_SOURCE", "INDUCTIVE_VERSION",
    "group_name", "ingest_key", "preprocess_key", "graph_key", "model_identity", "model_key",
    "feature_sources", "parse_source", "source_group", "feature_key", "feature_keys", "results_key",
    "stage_keys", "sweep_key", "encode_key", "experiment_tag",
    "report_folder", "report_paths", "model_report_paths", "sweep_paths", "experiment_paths",
    "prediction_paths", "default_model_path", "builtin_data_folder", "lock_path",
]

INGEST = "ingest"
"""Stage recording a complete ingestion (its configuration and clip counts)."""
PREPROCESS = "preprocess"
"""Stage of the scaled (and noisy) model input X (`sae.preprocess`)."""
GRAPH = "graph"
"""Stage of the kNN graph and its Laplacian (`sae.graph`)."""
MODEL = "model"
"""Stage of trained models and their checkpoints (`sae.distributed`)."""
RESULTS = "results"
"""Stage of classification results (`sae.stages.results`)."""
SWEEP = "sweep"
"""Stage of sweep tables: ``sweep/<key>`` with the attribute ``rows``."""
ENCODE = "encode"
"""Stage of an encoded collection in its own store (`sae.collection`)."""

DEFAULT_ARRAYS = {PREPROCESS: "X"}
"""Array read from a source group of a stage when the source names none (else ``codes``)."""

INDUCTIVE_FIELDS = ("model", "graph", "encode_methods")
"""Fields of `sae.config.ClassifyConfig` that only the "inductive" protocol reads."""

INDUCTIVE_SOURCE = "inductive"
"""Source name of the inductive protocol's results (models fitted per fold on ``preprocess/<key>``)."""

INDUCTIVE_VERSION = 3
"""Version of the inductive protocol, in the key of its results: version 1 encoded a fold's test clips together
(with a graph between them) and fitted every classifier on the training codes; version 2 does what a model folder
does with new music (`sae.inductive`); version 3 encodes "exact" for a model without graph term by the homotopy
path (`sae.lars`, the exact lasso) instead of coordinate descent to the inner tolerance."""


def _digest(record: Any) -> str:
    """12 hex digits of the SHA-256 of ``record`` as JSON with sorted keys."""
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:12]


def group_name(stage: str, key: str) -> str:
    """The path of a stage group inside a store: ``<stage>/<key>``."""
    return f"{stage}/{key}"


# --------------------------------------------------------------------------- stage keys


def ingest_key(config: IngestConfig) -> str:
    """Key of ``ingest/<key>``: what the frames depend on (data, CQT, chunking, built-in dataset).

    >>> ingest_key(IngestConfig(strict=True)) == ingest_key(IngestConfig(retries=0))
    True
    """
    return config.model_copy(update={"store": "", "strict": False, "retries": 0, "overwrite": False}).fingerprint()


def preprocess_key(config: PreprocessConfig) -> str:
    """Key of ``preprocess/<key>``: the fingerprint of the preprocessing configuration."""
    return config.fingerprint()


def graph_key(preprocess_key: str, config: Any) -> str:
    """Key of ``graph/<key>``: ``<preprocess key>-<GraphConfig fingerprint>``."""
    return f"{preprocess_key}-{config.fingerprint()}"


def model_identity(train: TrainConfig, preprocess_key: str, graph_key: str | None) -> dict[str, Any]:
    """What identifies a training run: everything but ``max_outer`` (so a longer rerun resumes) and how it runs.

    Recorded as the ``config`` of ``model/<key>``; `model_key` is its digest.
    """
    config = train.model_dump(mode="json")
    config["model"].pop("max_outer")
    if config["model"]["init"] == "uniform":  # the keys of the models trained before the option
        config["model"].pop("init")
    config.pop("lookahead")
    config.pop("offload_previous")
    config.pop("memory_check")
    config.pop("checkpoint")
    return {"train": config, "preprocess": preprocess_key, "graph": graph_key if train.model.lambda_g > 0 else None}


def model_key(train: TrainConfig, preprocess_key: str, graph_key: str | None = None) -> str:
    """Key of ``model/<key>``: a fingerprint of the training configuration (but ``max_outer``) and its inputs.

    >>> from sae.config import ModelConfig
    >>> a = model_key(TrainConfig(model=ModelConfig(max_outer=2)), "p")
    >>> a == model_key(TrainConfig(model=ModelConfig(max_outer=9)), "p"), a == model_key(TrainConfig(), "q")
    (True, False)
    """
    return _digest(model_identity(train, preprocess_key, graph_key))


def feature_sources(preprocess_key: str, model_key: str) -> dict[str, str]:
    """The feature sets classified: the scaled CQT frames (baseline) and the codes of the model."""
    return {"baseline": group_name(PREPROCESS, preprocess_key), "sae": group_name(MODEL, model_key)}


def parse_source(source: str) -> tuple[str, str, str]:
    """A feature source ``"<stage>/<key>[/<array>]"`` -> (stage, key, array).

    The default array is ``X`` in ``preprocess`` groups and ``codes`` elsewhere.
    """
    parts = source.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"a feature source must read '<stage>/<key>' or '<stage>/<key>/<array>', got {source!r}")
    stage, key = parts[:2]
    return stage, key, parts[2] if len(parts) == 3 else DEFAULT_ARRAYS.get(stage, "codes")


def source_group(preprocess_key: str, source: str) -> str:
    """The stage group a feature source is read from (the inductive protocol's: ``preprocess/<preprocess_key>``).

    >>> source_group("p", "model/m/codes"), source_group("p", INDUCTIVE_SOURCE)
    ('model/m', 'preprocess/p')
    """
    if source == INDUCTIVE_SOURCE:
        return group_name(PREPROCESS, preprocess_key)
    return group_name(*parse_source(source)[:2])


def feature_key(preprocess_key: str, source: str, config: ClassifyConfig) -> str:
    """Key of ``results/<key>`` for one feature source: what its classification depends on.

    The baseline's key does not depend on the model it is shown beside, so every
    model trained on the same preprocessed frames (a sweep's points) reuses it.
    The settings of the inductive protocol count only when it runs
    (``classify.model`` follows ``train.model`` in a pipeline: a longer training
    keeps the key of a grouped classification).
    """
    exclude = set() if config.protocol == "inductive" else set(INDUCTIVE_FIELDS)
    record = {"preprocess": preprocess_key, "source": source, "config": config.model_dump(mode="json", exclude=exclude)}
    if source == INDUCTIVE_SOURCE:
        record["version"] = INDUCTIVE_VERSION
    return _digest(record)


def feature_keys(preprocess_key: str, features: Mapping[str, str], config: ClassifyConfig) -> dict[str, str]:
    """``results/<key>`` of every feature set (name -> key), plus the inductive protocol's when it is chosen."""
    keys = {name: feature_key(preprocess_key, source, config) for name, source in features.items()}
    if config.protocol == "inductive":
        keys[INDUCTIVE_SOURCE] = feature_key(preprocess_key, INDUCTIVE_SOURCE, config)
    return keys


def results_key(preprocess_key: str, features: Mapping[str, str], config: ClassifyConfig) -> str:
    """Key of the combined ``results/<key>`` (the table of all feature sets): a digest of their keys."""
    return _digest(feature_keys(preprocess_key, features, config))


def stage_keys(config: PipelineConfig) -> dict[str, str]:
    """The store keys of every stage's result for ``config`` (no store needed).

    Returns
    -------
    dict
        ``ingest``, ``preprocess``, ``graph``, ``model`` and ``results``.
    """
    pre = preprocess_key(config.preprocess)
    graph = graph_key(pre, config.graph)
    model = model_key(config.train, pre, graph if config.train.model.lambda_g > 0 else None)
    return {
        "ingest": ingest_key(config.ingest),
        "preprocess": pre,
        "graph": graph,
        "model": model,
        "results": results_key(pre, feature_sources(pre, model), config.classify),
    }


def sweep_key(base: PipelineConfig, grid: Mapping[str, Sequence[Any]]) -> str:
    """Key of ``sweep/<key>``: a fingerprint of the base configuration (but where it runs) and the grid.

    ``grid`` maps dotted paths to lists of values (`sae.sweep.sweep_grid`).
    """
    config = base.model_dump(mode="json", exclude={"cluster", "force"})
    config["ingest"].pop("store", None)
    return _digest({"base": config, "grid": dict(grid)})


def encode_key(model: Any, method: str) -> str:
    """Key of ``encode/<key>``: a fingerprint of the model folder's manifest and the method."""
    return _digest({"model": model.info["digest"], "method": method})


def experiment_tag(results_keys: Sequence[str]) -> str:
    """The name of a noise experiment's files: its results keys joined, at most 64 characters."""
    return "-".join(results_keys)[:64]


# --------------------------------------------------------------------------- paths beside a store


def _beside(store: str | os.PathLike, suffix: str) -> Path:
    """``<store><suffix>``: a name beside the store's own (a trailing slash of ``store`` ignored)."""
    return Path(f"{os.fspath(store).rstrip('/')}{suffix}")


def report_folder(store: str | os.PathLike) -> Path:
    """Where the reports of a store go: ``<store>-reports/`` beside it."""
    return _beside(store, "-reports")


def report_paths(store: str | os.PathLike, key: str) -> tuple[Path, Path]:
    """Where the markdown and PNG of ``results/<key>`` are written: ``<store>-reports/classify-<key>.{md,png}``."""
    folder = report_folder(store)
    return folder / f"classify-{key}.md", folder / f"classify-{key}.png"


def model_report_paths(store: str | os.PathLike, key: str) -> dict[str, Path]:
    """The report of ``model/<key>`` beside the store: ``model-<key>.md``, ``-convergence.png``, ``-atoms.png``."""
    folder = report_folder(store)
    return {"markdown": folder / f"model-{key}.md", "convergence_png": folder / f"model-{key}-convergence.png",
            "atoms_png": folder / f"model-{key}-atoms.png"}


def sweep_paths(store: str | os.PathLike, key: str) -> dict[str, Path]:
    """Where a sweep's files go: ``<store>-reports/sweep-<key>{.csv,.md,-metrics.png,-atoms.png,-convergence.png}``."""
    folder = report_folder(store)
    stem = f"sweep-{key}"
    return {
        "csv": folder / f"{stem}.csv",
        "markdown": folder / f"{stem}.md",
        "metrics_png": folder / f"{stem}-metrics.png",
        "atoms_png": folder / f"{stem}-atoms.png",
        "convergence_png": folder / f"{stem}-convergence.png",
    }


def experiment_paths(store: str | os.PathLike, tag: str) -> tuple[Path, Path]:
    """Markdown and PNG of a noise experiment, in ``<store>-reports/`` beside the store."""
    folder = report_folder(store)
    return folder / f"noise-{tag}.md", folder / f"noise-{tag}.png"


def prediction_paths(store: str | os.PathLike, key: str) -> tuple[Path, Path]:
    """CSV and markdown of the predictions of ``encode/<key>``, in ``<store>-reports/`` beside the collection."""
    folder = report_folder(store)
    return folder / f"predict-{key}.csv", folder / f"predict-{key}.md"


def default_model_path(store: str | os.PathLike, model_key: str) -> Path:
    """Where the pipeline exports ``model/<key>`` of a store: ``<store>-models/<key>`` beside it."""
    return _beside(store, "-models") / model_key


def builtin_data_folder(store: str | os.PathLike) -> Path:
    """Where the built-in dataset of a store is generated: ``<name>-data`` beside ``<name>.zarr``.

    >>> builtin_data_folder("/data/demo.zarr").as_posix()
    '/data/demo-data'
    """
    store = Path(store)
    return store.parent / f"{store.name.removesuffix('.zarr')}-data"


def lock_path(store: str | os.PathLike) -> Path:
    """The lock file of a store: ``<store>.lock`` beside it (so it can be taken before the store exists)."""
    store = Path(store).expanduser().resolve()
    return store.with_name(store.name + ".lock")
