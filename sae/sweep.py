"""Hyper-parameter sweeps: the grid of pipeline configurations and the table of their results.

A sweep varies fields of a `sae.config.PipelineConfig` over lists of values
and runs the pipeline at every point of the grid (the Cartesian product of the
lists).  This module holds the plain parts, with no Prefect:

- `resolve_parameter` turns a name into a dotted path of the configuration
  (``lambda_g`` -> ``train.model.lambda_g``) and `parse_values` a
  comma-separated list into typed values;
- `sweep_points` builds and validates every point's configuration before any
  work, so a bad value fails at once with the field named;
- `point_row` gathers what the thesis's experiment launcher recorded per value
  (accuracy and std, baseline, chance, sparsity, every objective term at the end,
  weighted and unweighted, training time, inner and outer iterations) from a
  trained model's history and its classification summary; `write_csv` writes
  the rows.

The stages a point needs are found by their store keys (`sae.store.keys.stage_keys`),
so points sharing a stage's configuration share its result: a sweep over a
model weight computes the CQT, the preprocessing and the graph once.

>>> resolve_parameter("lambda_g"), resolve_parameter("n_neighbors")
('train.model.lambda_g', 'graph.n_neighbors')
>>> parse_values("1, 10,1e2")
[1, 10, 100.0]
>>> [point.values for point in sweep_points(PipelineConfig(), {"lambda_g": [0, 100]})]
[{'train.model.lambda_g': 0}, {'train.model.lambda_g': 100}]
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from sae.config import PipelineConfig
from sae.outer import iterations_done

__all__ = [
    "SWEEP_SECTIONS",
    "ROW_COLUMNS",
    "SweepPoint",
    "resolve_parameter",
    "parse_values",
    "sweep_points",
    "sweep_grid",
    "point_row",
    "write_csv",
]

SWEEP_SECTIONS = ("train.model", "train", "preprocess", "graph", "classify")
"""Where a bare parameter name is looked up, in this order (the first section holding it wins).

``ingest`` is not sweepable: one store holds one ingestion (sweep it with one store
per value); ``cluster`` and ``force`` say how to run, not what."""

UNSWEEPABLE = {
    "train.model.max_outer": "points would share one model (a model's store key leaves max_outer out, so that "
    "a longer run resumes a shorter one); sweep train.model.rtol instead",
    "train.lookahead": "it changes how the training runs, not its result",
    "train.checkpoint": "it changes how the training runs, not its result",
    "train.offload_previous": "it changes how the training runs, not its result",
}
"""Fields a sweep refuses, with the reason."""

TERMS = ("reconstruction", "sparsity", "graph", "encoder")

ROW_COLUMNS = (
    "accuracy_mean", "accuracy_std", "baseline_mean", "baseline_std", "chance",
    "sparsity_percent", "outer_iterations", "inner_codes", "inner_dictionary", "inner_encoder",
    "train_seconds", "stop_reason",
    *TERMS, *(f"{term}_weighted" for term in TERMS), "total",
    "lambda_d", "lambda_z", "lambda_g", "lambda_e",
    "graph_key", "model_key", "results_key",
)
"""Columns of a sweep row after the swept parameters (see `point_row`)."""


@dataclass(frozen=True)
class SweepPoint:
    """One point of a sweep: the swept values (dotted path -> value) and the full configuration."""

    values: dict[str, Any]
    config: PipelineConfig

    @property
    def label(self) -> str:
        """Short text naming the point, e.g. ``lambda_g=100``."""
        return ", ".join(f"{path.rsplit('.', 1)[-1]}={value}" for path, value in self.values.items())


def _fields(model: type[BaseModel], prefix: str) -> dict[str, Any]:
    """Every dotted path of a pydantic model class's fields (nested models expanded) -> its annotation."""
    out: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        path = f"{prefix}.{name}" if prefix else name
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out.update(_fields(annotation, path))
        else:
            out[path] = annotation
    return out


_PATHS = _fields(PipelineConfig, "")


def resolve_parameter(name: str) -> str:
    """The dotted path of a swept parameter: ``name`` itself if it is a path, else looked up in `SWEEP_SECTIONS`.

    >>> resolve_parameter("graph.n_neighbors"), resolve_parameter("noise_std")
    ('graph.n_neighbors', 'preprocess.noise_std')
    >>> resolve_parameter("ingest.data")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: --param ingest.data cannot be swept: ...
    """
    name = name.strip()
    if name.split(".", 1)[0] in ("ingest", "cluster", "force"):
        raise ValueError(
            f"--param {name} cannot be swept: one store holds one ingestion, and cluster/force say how to run; "
            "sweep a field of preprocess, graph, train or classify (run one store per ingestion setting)"
        )
    path = name if name in _PATHS else next(
        (f"{section}.{name}" for section in SWEEP_SECTIONS if f"{section}.{name}" in _PATHS), None
    )
    if path in UNSWEEPABLE:
        raise ValueError(f"--param {path} cannot be swept: {UNSWEEPABLE[path]}")
    if path is not None:
        return path
    close = sorted(path for path in _PATHS if path.rsplit(".", 1)[-1].startswith(name[:4]) and
                   not path.startswith(("ingest", "cluster", "force")))[:8]
    hint = f"; did you mean one of {', '.join(close)}?" if close else ""
    raise ValueError(f"--param {name!r} is not a field of the pipeline configuration{hint}")


def _scalar(text: str) -> Any:
    """A number if ``text`` reads as one (``1e2`` too, which YAML 1.1 leaves a string), else YAML's reading."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_values(text: str | Sequence[Any]) -> list[Any]:
    """The values of a ``--values`` list: comma-separated, each parsed as YAML (numbers, true/false, null, text).

    >>> parse_values("exact,approximate"), parse_values("true,false"), parse_values([1, 2])
    (['exact', 'approximate'], [True, False], [1, 2])
    """
    if not isinstance(text, str):
        values = list(text)
    else:
        items = [item.strip() for item in text.split(",")]
        if not all(items):
            raise ValueError(f"--values must be a comma-separated list of values, got {text!r}")
        values = [_scalar(item) for item in items]
    if not values:
        raise ValueError(f"--values must hold at least one value, got {text!r}")
    if len({json.dumps(v, sort_keys=True, default=str) for v in values}) != len(values):
        raise ValueError(f"--values must not repeat a value, got {text!r}")
    return values


def _set(values: dict[str, Any], path: str, value: Any) -> None:
    node = values
    *parents, leaf = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value


def sweep_points(base: PipelineConfig, parameters: Mapping[str, Sequence[Any]]) -> list[SweepPoint]:
    """Every point of the grid over ``parameters`` (name or path -> values), validated, in grid order.

    Raises
    ------
    ValueError
        An unknown or unsweepable parameter, a parameter given twice, or a
        value the configuration rejects (the message names the point and the field).
    """
    if not parameters:
        raise ValueError("a sweep needs at least one --param with its --values")
    paths: dict[str, list[Any]] = {}
    for name, values in parameters.items():
        path = resolve_parameter(name)
        if path in paths:
            raise ValueError(f"--param {path} is given twice")
        paths[path] = parse_values(values)
    dumped = base.model_dump(mode="json")
    follows = dumped["classify"]["model"] == dumped["train"]["model"]
    if follows and not any(path.startswith("classify.model.") for path in paths):
        del dumped["classify"]["model"]  # the trained model's at every point (PipelineConfig's default)
    points = []
    for combination in itertools.product(*paths.values()):
        values = dict(zip(paths, combination))
        raw = json.loads(json.dumps(dumped))
        for path, value in values.items():
            _set(raw, path, value)
        try:
            config = PipelineConfig.model_validate(raw)
        except ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in item['loc'])}: {item['msg']}" for item in error.errors()
            )
            raise ValueError(f"sweep point {values}: invalid configuration: {problems}") from None
        points.append(SweepPoint(values, config))
    return points


def sweep_grid(parameters: Mapping[str, Sequence[Any]]) -> dict[str, list[Any]]:
    """The grid of a sweep: the dotted path of every parameter -> its values (`sae.store.keys.sweep_key` digests it).

    >>> sweep_grid({"lambda_g": "0,100"})
    {'train.model.lambda_g': [0, 100]}
    """
    return {resolve_parameter(name): parse_values(values) for name, values in parameters.items()}


def point_row(
    point: SweepPoint,
    history: Sequence[Mapping[str, Any]],
    results: Mapping[str, Mapping[str, float]],
    keys: Mapping[str, str],
    stop_reason: str = "",
) -> dict[str, Any]:
    """The record of one sweep point (the thesis's experiment launcher's), as a flat row.

    Parameters
    ----------
    point : SweepPoint
    history : list of dict
        The trained model's history (`sae.model.FitResult.history`: iteration 0
        is the initial point).
    results : dict
        Feature set -> ``accuracy_mean``, ``accuracy_std``, ``chance``: ``sae``
        (the codes) and ``baseline`` (the scaled CQT).
    keys : dict
        ``graph``, ``model``, ``results`` keys of the point's stages.
    stop_reason : str
        Why the training stopped ("rtol" or "max_outer").

    Returns
    -------
    dict
        The swept values (by dotted path), then `ROW_COLUMNS`: accuracies as
        fractions; ``sparsity_percent`` of non-zero codes; the final terms,
        unweighted and weighted, and ``total``; ``outer_iterations``; the inner
        (FISTA) iterations of each step summed over the outer iterations;
        ``train_seconds`` summed over the outer iterations (the time of the run
        that trained the model, also when the point reused it); the weights
        the model was trained with (after balancing, if any).
    """
    last = history[-1]
    model = point.config.train.model
    row: dict[str, Any] = dict(point.values)
    row.update({
        "accuracy_mean": results["sae"]["accuracy_mean"],
        "accuracy_std": results["sae"]["accuracy_std"],
        "baseline_mean": results["baseline"]["accuracy_mean"],
        "baseline_std": results["baseline"]["accuracy_std"],
        "chance": results["sae"]["chance"],
        "sparsity_percent": last["sparsity_percent"],
        "outer_iterations": iterations_done(history),  # epochs of an online fit
        **{f"inner_{step}": int(sum(r.get(f"inner_{step}", 0) for r in history))
           for step in ("codes", "dictionary", "encoder")},
        "train_seconds": float(sum(r.get("seconds", 0.0) for r in history)),
        "stop_reason": stop_reason,
    })
    for term in TERMS:
        row[term] = last[term]
        row[f"{term}_weighted"] = last[f"{term}_weighted"]
    row["total"] = last["total"]
    for name in ("lambda_d", "lambda_z", "lambda_g", "lambda_e"):
        row[name] = float(last.get(name, getattr(model, name)))
    for stage in ("graph", "model", "results"):
        row[f"{stage}_key"] = keys.get(stage, "")
    return {**point.values, **{column: row[column] for column in ROW_COLUMNS}}


def _cell(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return ""
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return value


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> str:
    """Write sweep rows as CSV (columns of the first row; NaN as an empty cell); returns the path."""
    if not rows:
        raise ValueError("write_csv needs at least one row")
    columns = list(rows[0])
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({column: _cell(row.get(column)) for column in columns})
    return str(path)
