"""The pipeline's stages as plain functions: each stage's inputs, key, freshness and outputs, without Prefect.

A stage of a `sae.config.PipelineConfig` reads complete stage groups of a store
and writes its own, ``<stage>/<key>`` with the key of `sae.store.keys.stage_keys`;
it is skipped when that group is complete and current.  The functions here
decide that and record the results; the work itself is passed in as a callable
(``run``, ``ingest``, ``submit_features``), so that the flows of ``flows/`` run it
as Prefect flows and tasks, and a plain program or a test runs it directly.

Modules
-------
- `sae.stages.inputs`: what a stage needs (a complete ingestion, complete groups);
- `sae.stages.ingest`: ``ingest/<key>``; `ingest_complete`, `repair_frames`, `check_ingestion`;
- `sae.stages.graph`: ``preprocess/<key>`` and ``graph/<key>``; `graph_current`;
- `sae.stages.train`: ``model/<key>``; `model_complete`, `require_model`;
- `sae.stages.results`: ``results/<key>``; `results_current`, `classify_features`,
  `classify_inductive`, `classify_sources`;
- `sae.stages.export`: the model folder ``<store>-models/<model key>``;
- `sae.stages.sweep`: a sweep's distinct work over its points, `sweep_plan`; its rows
  (`sweep_rows`), files and ``sweep/<key>`` (`write_sweep_outputs`);
- `sae.stages.experiment`: the noise experiment's stage configurations per noise std
  (`noise_stages`), the names of its results (`noise_features`, `noise_keys`), its report
  and plot (`write_experiment_outputs`).
"""

from sae.stages.experiment import (
    NoiseStages,
    noise_features,
    noise_keys,
    noise_stages,
    write_experiment_outputs,
)
from sae.stages.export import export_on, export_stage
from sae.stages.graph import graph_current, graph_stage
from sae.stages.ingest import check_ingestion, ingest_complete, ingest_stage, record_ingestion, repair_frames
from sae.stages.inputs import require, require_frames
from sae.stages.results import (
    brief,
    check_folds,
    classify_features,
    classify_inductive,
    classify_sources,
    classify_stage,
    open_rows,
    open_source,
    read_summaries,
    results_current,
)
from sae.stages.sweep import (
    PlannedClassification,
    PlannedGraph,
    PlannedModel,
    SweepPlan,
    SweepRows,
    sweep_plan,
    sweep_rows,
    write_sweep_outputs,
)
from sae.stages.train import model_complete, require_model, train_inputs, train_stage

STAGES = ("ingest", "graph", "train", "classify")
"""The stages of a pipeline, in order (the model folder's export follows them)."""

__all__ = [
    "STAGES",
    "require", "require_frames",
    "ingest_stage", "ingest_complete", "repair_frames", "check_ingestion", "record_ingestion",
    "graph_stage", "graph_current",
    "train_stage", "model_complete", "require_model", "train_inputs",
    "classify_stage", "check_folds", "results_current", "read_summaries", "brief", "open_rows", "open_source",
    "classify_features", "classify_inductive", "classify_sources",
    "export_on",
    "export_stage",
    "SweepPlan", "PlannedGraph", "PlannedModel", "PlannedClassification", "SweepRows",
    "sweep_plan", "sweep_rows", "write_sweep_outputs",
    "NoiseStages", "noise_stages", "noise_features", "noise_keys", "write_experiment_outputs",
]
