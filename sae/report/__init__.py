"""Every rendering of results: markdown tables and reports, terminal text, figures (plain functions).

- `sae.report.markdown`: the markdown tables (classification, noise experiment,
  training history, sweep, ingestion errors, predictions) and the reports built
  from them, written beside a store (`sae.store.keys.report_folder`) and published by the flows
  as Prefect artifacts (`inline_images` puts their figures inside).
- `sae.report.text`: what the ``sae`` command prints (summaries, the state of a
  store, predictions).
- `sae.report.figures`: the PNG figures (matplotlib, no pyplot state).

Functions take data (summaries, histories, rows) and return a str, or, for a
figure, write the PNG and return its path; none knows Prefect or the store layout.
"""

from sae.report.figures import (
    SWEEP_METRICS,
    plot_atoms,
    plot_convergence,
    plot_noise_experiment,
    plot_results,
    plot_sweep_metrics,
)
from sae.report.markdown import (
    PUBLISHED_NOISE_TABLE,
    accuracy_table,
    agreement_text,
    classification_report,
    errors_markdown,
    experiment_report,
    history_markdown,
    inline_images,
    model_report,
    noise_table_markdown,
    paired_difference,
    pipeline_report,
    predictions_markdown,
    results_markdown,
    summary_rows,
    sweep_report,
    sweep_table,
)
from sae.report.text import (
    clips_by_reason,
    encode_text,
    experiment_text,
    export_text,
    predictions_tally,
    predictions_text,
    summary_text,
    sweep_text,
    verify_text,
)

__all__ = [
    "inline_images",
    "PUBLISHED_NOISE_TABLE",
    "history_markdown",
    "results_markdown",
    "noise_table_markdown",
    "paired_difference",
    "accuracy_table",
    "errors_markdown",
    "summary_rows",
    "sweep_table",
    "predictions_markdown",
    "agreement_text",
    "classification_report",
    "pipeline_report",
    "model_report",
    "experiment_report",
    "sweep_report",
    "clips_by_reason",
    "summary_text",
    "verify_text",
    "sweep_text",
    "experiment_text",
    "export_text",
    "predictions_text",
    "predictions_tally",
    "encode_text",
    "plot_results",
    "plot_noise_experiment",
    "SWEEP_METRICS",
    "plot_sweep_metrics",
    "plot_atoms",
    "plot_convergence",
]
