"""A sweep's stages: the distinct work of a grid's points (`sweep_plan`), then its rows and files.

The points of a sweep (`sae.sweep.sweep_points`) share a stage's result when
they share its key (`sae.store.keys.stage_keys`).  `sweep_plan` lists each
stage's distinct work once, in the order of the first point that needs it:
the preprocessings, the graphs (for points with ``lambda_g > 0`` only), the
models (with their preprocessing key, graph key or None, and training
configuration) and the classifications (the baseline and the codes of each
distinct model and classifier setting).  ``flows.sweep`` submits them as
Prefect tasks; a plain program can run them one after the other.

Once every stage is complete, `sweep_rows` reads one row per point
(`sae.sweep.point_row`) from the models and the classification summaries,
and `write_sweep_outputs` writes the CSV, the figures and the markdown report
beside the store (`sae.store.keys.sweep_paths`) and the ``sweep/<key>`` group.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from sae import store as sae_store
from sae.config import ClassifyConfig, GraphConfig, PipelineConfig, PreprocessConfig, TrainConfig
from sae.store.keys import SWEEP, feature_sources, stage_keys, sweep_paths

if TYPE_CHECKING:
    from sae.sweep import SweepPoint

logger = logging.getLogger("sae.stages")


class PlannedGraph(NamedTuple):
    """A graph to build: on ``preprocess/<preprocess_key>``, with ``config``."""

    preprocess_key: str
    config: GraphConfig


class PlannedModel(NamedTuple):
    """A model to train: on ``preprocess/<preprocess_key>`` and ``graph/<graph_key>`` (None without graph)."""

    preprocess_key: str
    graph_key: str | None
    train: TrainConfig


class PlannedClassification(NamedTuple):
    """A classification of ``features`` (name -> source, `sae.store.keys.feature_sources`) of a preprocessing."""

    preprocess_key: str
    features: dict[str, str]
    config: ClassifyConfig


@dataclass(frozen=True)
class SweepPlan:
    """The distinct work of a sweep's points, each stage keyed by its store key, in the order of the points.

    Attributes
    ----------
    store : str
        The store of the points (a sweep never varies the ingestion).
    points : list of SweepPoint
    keys : list of dict
        `sae.store.keys.stage_keys` of every point, in the order of ``points``.
    preprocess : dict
        Preprocess key -> `PreprocessConfig`.
    graphs : dict
        Graph key -> `PlannedGraph`; only for points with ``lambda_g > 0``.
    models : dict
        Model key -> `PlannedModel`.
    classifications : dict
        Results key -> `PlannedClassification`.
    """

    store: str
    points: list[SweepPoint]
    keys: list[dict[str, str]]
    preprocess: dict[str, PreprocessConfig]
    graphs: dict[str, PlannedGraph]
    models: dict[str, PlannedModel]
    classifications: dict[str, PlannedClassification]

    def model_waves(self, parallel: int) -> list[list[tuple[str, PlannedModel]]]:
        """The models in waves of ``parallel`` (trained at the same time), in order."""
        if parallel < 1:
            raise ValueError(f"parallel must be >= 1, got {parallel!r}")
        models = list(self.models.items())
        return [models[start:start + parallel] for start in range(0, len(models), parallel)]


def sweep_plan(points: Sequence[SweepPoint]) -> SweepPlan:
    """The distinct preprocessings, graphs, models and classifications of ``points`` (first point first).

    Parameters
    ----------
    points : list of SweepPoint
        The points of a sweep (`sae.sweep.sweep_points`), their configurations
        with the same store.
    """
    if not points:
        raise ValueError("a sweep plan needs at least one point")
    keys = [stage_keys(point.config) for point in points]
    preprocess: dict[str, PreprocessConfig] = {}
    graphs: dict[str, PlannedGraph] = {}
    models: dict[str, PlannedModel] = {}
    classifications: dict[str, PlannedClassification] = {}
    for k, point in zip(keys, points):
        config = point.config
        with_graph = config.train.model.lambda_g > 0
        preprocess.setdefault(k["preprocess"], config.preprocess)
        if with_graph:  # a graph key starts with its preprocess key: one graph key, one (preprocess, graph) pair
            graphs.setdefault(k["graph"], PlannedGraph(k["preprocess"], config.graph))
        models.setdefault(k["model"], PlannedModel(k["preprocess"], k["graph"] if with_graph else None, config.train))
        if k["results"] not in classifications:
            classifications[k["results"]] = PlannedClassification(
                k["preprocess"], feature_sources(k["preprocess"], k["model"]), config.classify)
    return SweepPlan(store=points[0].config.ingest.store, points=list(points), keys=keys, preprocess=preprocess,
                     graphs=graphs, models=models, classifications=classifications)


class SweepRows(NamedTuple):
    """What a sweep's outputs are made of: one row per point, and each point's history and atoms by label."""

    rows: list[dict[str, Any]]
    histories: dict[str, list[dict[str, Any]]]
    atoms: dict[str, Any]


def sweep_rows(
    plan: SweepPlan,
    results: Mapping[str, Mapping[str, Mapping[str, Any]]],
    *,
    log: Any = logger,
) -> SweepRows:
    """One row per point (`sae.sweep.point_row`) from its complete model and classification; logs each.

    Parameters
    ----------
    plan : SweepPlan
        The sweep's `sweep_plan` (its points, their stage keys and store).
    results : dict
        Results key -> feature set -> accuracy_mean, accuracy_std, chance, ...
        (`sae.stages.results.brief` of each classification).
    log : logger
        Gets one line per point: accuracy, baseline, non-zeros, iterations, time.
    """
    from sae.distributed import open_model
    from sae.sweep import point_row

    rows, histories, atoms = [], {}, {}
    for point, k in zip(plan.points, plan.keys):
        model = open_model(plan.store, k["model"])
        row = point_row(point, model["history"], results[k["results"]], k, stop_reason=model["stop_reason"])
        rows.append(row)
        histories[point.label] = model["history"]
        atoms[point.label] = model["components"]
        log.info(
            "%s: accuracy %.1f ± %.1f %% (baseline %.1f), non-zeros %.2f %%, %d outer iterations, %.1f s",
            point.label, 100 * row["accuracy_mean"], 100 * row["accuracy_std"], 100 * row["baseline_mean"],
            row["sparsity_percent"], row["outer_iterations"], row["train_seconds"],
        )
    return SweepRows(rows, histories, atoms)


def write_sweep_outputs(
    config: PipelineConfig,
    parameters: Mapping[str, Sequence[Any]],
    key: str,
    paths: Sequence[str],
    swept: SweepRows,
) -> dict[str, str]:
    """The CSV, the three figures, the markdown report and the ``sweep/<key>`` group; returns the file paths.

    Parameters
    ----------
    config : PipelineConfig
        The sweep's base configuration (its store, its protocol; recorded in ``sweep/<key>``).
    parameters : dict
        The sweep's parameters as given (recorded in ``sweep/<key>``).
    key : str
        `sae.store.keys.sweep_key` of the sweep.
    paths : list of str
        The swept dotted paths (the first is the x axis of the metric plot).
    swept : SweepRows
        `sweep_rows`.

    Returns
    -------
    dict
        ``csv``, ``markdown``, ``metrics_png``, ``atoms_png``, ``convergence_png``.
    """
    from sae.report import plot_atoms, plot_convergence, plot_sweep_metrics, sweep_report
    from sae.sweep import write_csv

    store = config.ingest.store
    rows = swept.rows
    files = sweep_paths(store, key)
    files["csv"].parent.mkdir(parents=True, exist_ok=True)
    write_csv(rows, files["csv"])
    plot_sweep_metrics(rows, paths[0], files["metrics_png"])
    plot_atoms(swept.atoms, files["atoms_png"])
    plot_convergence(swept.histories, files["convergence_png"])
    markdown = sweep_report(rows, paths, store=store, protocol=config.classify.protocol, csv=files["csv"].resolve(),
                            metrics_png=files["metrics_png"].name, convergence_png=files["convergence_png"].name,
                            atoms_png=files["atoms_png"].name)
    files["markdown"].write_text(markdown)
    group = sae_store.stage_group(
        store, SWEEP, key, mode="w",
        config={"base": config.model_dump(mode="json", exclude={"cluster", "force"}),
                "parameters": {p: list(values) for p, values in parameters.items()}},
    )
    group.attrs.update({"rows": sae_store.json_safe(rows),
                        "files": {name: str(path) for name, path in files.items()}})
    sae_store.mark_complete(group)
    return {name: str(path) for name, path in files.items()}
