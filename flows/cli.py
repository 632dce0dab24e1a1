"""The ``sae`` command: the whole pipeline (``sae run``) or one stage at a time.

Every command builds one `sae.config.PipelineConfig` from, in increasing
priority: the pipeline's defaults, ``--config file.yaml|.toml``, ``--set
section.field=value`` overrides, and ``--data`` / ``--store`` / ``--cluster``.
An invalid configuration (unknown key, value out of range, missing data) stops
the command before any work, with exit code 2 and a message naming the field.

Without a Prefect server (``PREFECT_API_URL`` unset) the flows run in Prefect's
ephemeral mode: a temporary local server for the duration of the command.

While a command works, the terminal shows a progress bar per step (ingestion,
kNN, training, cross-validation: `flows._progress`), also for the steps that
run on a Dask cluster, whose dashboard address is printed first; when the
output is not a terminal, progress is plain log lines.

The options and the configuration they build are `flows._cli_config`'s, how a
command runs its work (lock, Prefect API, progress, stop) `flows._cli_run`'s,
the commands of a trained model `flows._cli_model`'s, and what the commands
print `sae.report.text`'s.
"""

from __future__ import annotations

import os

# Before Prefect and Dask are imported: no analytics, the library's logs on the
# terminal with the flows', Dask's own chatter only when it matters.
for _name, _value in (
    ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"),
    ("DO_NOT_TRACK", "1"),
    ("PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT", "false"),
    ("PREFECT_LOGGING_EXTRA_LOGGERS", "sae"),
    ("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore"),  # the library's logs outside flow runs: terminal only
    ("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120"),
    ("DASK_LOGGING__DISTRIBUTED", "warning"),
):
    os.environ.setdefault(_name, _value)

import json  # noqa: E402
import sys  # noqa: E402
from typing import Annotated  # noqa: E402

import typer  # noqa: E402
import yaml  # noqa: E402

from flows import _cli_model  # noqa: E402
from flows._cli_config import (  # noqa: E402
    USAGE_ERROR,
    ClusterOption,
    ConfigOption,
    DataOption,
    ForceOption,
    JsonOption,
    NoWaitOption,
    PresetOption,
    SetOption,
    StoreOption,
    StrictOption,
    config_or_exit,
)
from flows._cli_run import fail, prepared  # noqa: E402
from sae.config import PipelineConfig  # noqa: E402
from sae.report import accuracy_table, experiment_text, summary_text, sweep_text, verify_text  # noqa: E402

app = typer.Typer(
    name="sae",
    help="Structured auto-encoders for music: CQT -> Zarr store -> kNN graph -> SAE training -> "
    "cross-validated genre classification, as Prefect flows on local threads or a Dask cluster.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: flags show as flags (the rich help gives them a <bool> value)
)


# --------------------------------------------------------------------------- running a stage


def _run_stage(name: str, config: PipelineConfig, as_json: bool, no_wait: bool = False) -> None:
    from flows import pipeline

    runners = {
        "ingest": pipeline.run_ingest_stage,
        "graph": pipeline.run_graph_stage,
        "train": pipeline.run_train_stage,
        "classify": pipeline.run_classify_stage,
    }
    with prepared(name, config, no_wait) as config:
        if name == "run":
            summary = pipeline.run_pipeline(config)
        else:
            summary = runners[name](config, pipeline.dask_address(config))
            summary = {"store": config.ingest.store, **summary}
            if name == "classify":
                summary["table"] = accuracy_table(summary["results"])
    if name == "ingest":
        summary = {k: v for k, v in summary.items() if k not in ("errors", "computed")} | {
            "n_errors": len(summary.get("errors", []))
        }
    typer.echo(json.dumps(summary, indent=2, default=str) if as_json else summary_text(summary))


# --------------------------------------------------------------------------- commands


@app.command()
def run(
    config: ConfigOption = None,
    data: DataOption = None,
    store: StoreOption = None,
    cluster: ClusterOption = None,
    set_: SetOption = None,
    preset: PresetOption = None,
    force: ForceOption = False,
    strict: StrictOption = False,
    no_wait: NoWaitOption = False,
    as_json: JsonOption = False,
) -> None:
    """Run the whole pipeline: ingest -> preprocess + graph -> train -> classify.

    Stages whose result the store already holds (same configuration) are
    skipped. Prints the store, the report and the accuracy table. The default
    run, on the built-in dataset with local threads, takes a few minutes.
    """
    cfg = config_or_exit(config_file=config, preset=preset, overrides=set_, data=data, store=store, cluster=cluster,
                          force=force, strict=strict)
    _run_stage("run", cfg, as_json, no_wait)


@app.command()
def ingest(
    config: ConfigOption = None,
    data: DataOption = None,
    store: StoreOption = None,
    cluster: ClusterOption = None,
    set_: SetOption = None,
    force: ForceOption = False,
    strict: StrictOption = False,
    no_wait: NoWaitOption = False,
    as_json: JsonOption = False,
) -> None:
    """Ingest audio clips: the CQT of every clip into the frames of the store.

    Resumes an interrupted run; re-ingests the clips whose frames are missing or damaged.
    """
    cfg = config_or_exit(config_file=config, overrides=set_, data=data, store=store, cluster=cluster, force=force,
                          strict=strict)
    _run_stage("ingest", cfg, as_json, no_wait)


def _add_stage_command(stage: str, summary: str) -> None:
    """Register ``sae <stage>``: one stage of the pipeline, with the options of ``sae run``."""

    def command(
        config: ConfigOption = None,
        data: DataOption = None,
        store: StoreOption = None,
        cluster: ClusterOption = None,
        set_: SetOption = None,
        preset: PresetOption = None,
        no_wait: NoWaitOption = False,
        as_json: JsonOption = False,
    ) -> None:
        cfg = config_or_exit(config_file=config, preset=preset, overrides=set_, data=data, store=store,
                              cluster=cluster)
        _run_stage(stage, cfg, as_json, no_wait)

    command.__doc__ = summary
    app.command(stage)(command)


for _stage, _summary in (
    ("graph", "Preprocess the frames (selection, scaling, noise) and build their kNN graph and Laplacian."),
    ("train", "Train the structured auto-encoder on the preprocessed frames (resumes from its last checkpoint)."),
    ("classify", "Cross-validated genre classification of the scaled CQT (baseline) and of the learned codes."),
):
    _add_stage_command(_stage, _summary)


@app.command()
def sweep(
    param: Annotated[
        list[str],
        typer.Option("--param", "-p", help="Parameter to sweep: a dotted path (train.model.lambda_g) or a field "
                     "name looked up in train.model, train, preprocess, graph, classify (lambda_g); repeatable, "
                     "each with its --values: the grid is their product.", show_default=False),
    ],
    values: Annotated[
        list[str],
        typer.Option("--values", "-v", help="Comma-separated values of the matching --param, e.g. 0,10,100.",
                     show_default=False),
    ],
    parallel: Annotated[
        int | None,
        typer.Option("--parallel", min=1, help="Trainings at the same time (default: all on a Dask cluster, "
                     "1 on local threads).", show_default=False),
    ] = None,
    config: ConfigOption = None,
    data: DataOption = None,
    store: StoreOption = None,
    cluster: ClusterOption = None,
    set_: SetOption = None,
    preset: PresetOption = None,
    force: ForceOption = False,
    no_wait: NoWaitOption = False,
    as_json: JsonOption = False,
) -> None:
    """Sweep hyper-parameters: the pipeline at every point of the grid, reusing every stage it can.

    Writes a CSV (one row per point: accuracy, baseline, chance, sparsity, objective terms, time,
    iterations), plots of each metric, of the atoms and of the convergence, and a report beside
    the store; prints the table.
    """
    from flows.sweep import run_sweep
    from sae.sweep import parse_values, sweep_points

    cfg = config_or_exit(config_file=config, preset=preset, overrides=set_, data=data, store=store, cluster=cluster,
                          force=force)
    if len(param) != len(values):
        typer.echo(f"error: every --param needs one --values (got {len(param)} --param and {len(values)} --values)",
                   err=True)
        raise typer.Exit(USAGE_ERROR)
    grid = {name: values_text for name, values_text in zip(param, values)}
    try:
        sweep_points(cfg, grid)  # every point valid before any work
    except ValueError as error:
        raise fail(error, USAGE_ERROR) from None
    parameters = {name: parse_values(text) for name, text in grid.items()}
    with prepared("sweep", cfg, no_wait) as cfg:
        summary = run_sweep(cfg, parameters, parallel=parallel)
    if as_json:
        typer.echo(json.dumps(summary, indent=2, default=str))
        return
    typer.echo(sweep_text(summary))


@app.command()
def experiment(
    noise: Annotated[
        str, typer.Option("--noise", help="Comma-separated noise stds added to the scaled frames.")
    ] = "0,0.1,0.2",
    lambda_g: Annotated[
        float | None,
        typer.Option("--lambda-g", help="Weight of the graph term of the graph column (default: train.model.lambda_g, "
                     "or 100 when that is 0).", show_default=False),
    ] = None,
    config: ConfigOption = None,
    data: DataOption = None,
    store: StoreOption = None,
    cluster: ClusterOption = None,
    set_: SetOption = None,
    preset: PresetOption = None,
    no_wait: NoWaitOption = False,
    as_json: JsonOption = False,
) -> None:
    """The experiment behind the claim: baseline, codes without graph and with graph, at every noise level.

    Trains the model of the configuration with lambda_g = 0 and with the graph term on frames with
    i.i.d. Gaussian noise of each std, and cross-validates the scaled input (baseline) and both codes
    under the configured protocol (grouped by the data's groups by default). Prints the table and
    writes it with a figure beside the store.
    """
    from flows.experiments import run_experiment

    cfg = config_or_exit(config_file=config, preset=preset, overrides=set_, data=data, store=store, cluster=cluster)
    try:
        stds = tuple(float(v) for v in noise.split(",") if v.strip())
    except ValueError:
        stds = ()
    if not stds or any(not s >= 0 for s in stds):
        typer.echo(f"error: --noise must be a comma-separated list of stds >= 0, got {noise!r}", err=True)
        raise typer.Exit(USAGE_ERROR)
    weight = lambda_g if lambda_g is not None else (cfg.train.model.lambda_g or 100.0)
    if not weight > 0:
        typer.echo(f"error: --lambda-g must be > 0 (the graph column), got {weight}", err=True)
        raise typer.Exit(USAGE_ERROR)
    with prepared("experiment", cfg, no_wait) as cfg:
        summary = run_experiment(cfg, stds, weight)
    if as_json:
        typer.echo(json.dumps({k: v for k, v in summary.items() if k != "text"}, indent=2, default=str))
        return
    typer.echo(experiment_text(summary))


@app.command()
def verify(
    store: Annotated[str, typer.Option("--store", help="The store to check.", show_default=False)],
    as_json: JsonOption = False,
) -> None:
    """Report the state of a store without changing it: clips, damaged frames, stage groups, lock.

    Exit code 0 when nothing is damaged, 1 when something is (the next `sae run` or `sae ingest` re-ingests
    the damaged clips and recomputes the damaged stages), 2 when there is no usable store.
    """
    from sae import store as sae_store

    try:
        report = sae_store.verify(store)
    except (sae_store.StoreError, FileNotFoundError, OSError) as error:
        raise fail(error, USAGE_ERROR) from None
    if as_json:
        typer.echo(json.dumps(report, indent=2, default=str))
    else:
        typer.echo(verify_text(report))
    raise typer.Exit(0 if report["intact"] else 1)


for _command in (_cli_model.export, _cli_model.predict, _cli_model.encode):
    app.command()(_command)


@app.command("config")
def show_config(
    config: ConfigOption = None,
    data: DataOption = None,
    store: StoreOption = None,
    cluster: ClusterOption = None,
    set_: SetOption = None,
    preset: PresetOption = None,
    as_json: JsonOption = False,
) -> None:
    """Validate and print the complete configuration (YAML, usable as --config); runs nothing."""
    cfg = config_or_exit(config_file=config, preset=preset, overrides=set_, data=data, store=store, cluster=cluster)
    values = cfg.model_dump(mode="json")
    if values["classify"]["model"] == values["train"]["model"]:
        del values["classify"]["model"]  # the default: it follows train.model when the file is edited
    typer.echo(json.dumps(values, indent=2) if as_json else yaml.safe_dump(values, sort_keys=False).rstrip())


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
