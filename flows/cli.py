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
import tomllib  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Annotated, Any  # noqa: E402

import typer  # noqa: E402
import yaml  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from sae.config import PipelineConfig  # noqa: E402

USAGE_ERROR = 2
"""Exit code of an invalid command line or configuration (no work done)."""

app = typer.Typer(
    name="sae",
    help="Structured auto-encoders for music: CQT -> Zarr store -> kNN graph -> SAE training -> "
    "cross-validated genre classification, as Prefect flows on local threads or a Dask cluster.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: flags show as flags (the rich help gives them a <bool> value)
)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML (.yaml/.yml) or TOML (.toml) file of a PipelineConfig: sections "
                 "ingest, preprocess, graph, train, classify, and cluster, force.", show_default=False),
]
DataOption = Annotated[
    str | None,
    typer.Option("--data", help="GTZAN-style folder (<root>/<genre>/<clip>) or CSV manifest (path,label). "
                 "Default: the built-in synthetic dataset, generated beside the store.", show_default=False),
]
StoreOption = Annotated[
    str | None, typer.Option("--store", help="Zarr store to create or reuse (default: sae.zarr).", show_default=False)
]
ClusterOption = Annotated[
    str | None,
    typer.Option("--cluster", help="Dask scheduler address, e.g. tcp://127.0.0.1:8786; 'local' for local threads. "
                 "Default: $SAE_DASK_ADDRESS if set, else local threads.", show_default=False),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override one field, e.g. --set train.model.n_atoms=128 "
                 "(value parsed as YAML); repeatable.", show_default=False),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the summary as JSON instead of text.")]
ForceOption = Annotated[bool, typer.Option("--force", help="Create the store anew and recompute every stage.")]
StrictOption = Annotated[
    bool, typer.Option("--strict", help="Fail (exit 1) if any clip of the store is in error, even when ingestion "
                       "is skipped.")
]
PresetOption = Annotated[
    str | None,
    typer.Option("--preset", help="Recipe the configuration starts from: 'default' (the best measured) or 'thesis' "
                 "(the 2015 settings and protocol).", show_default=False),
]
NoWaitOption = Annotated[
    bool, typer.Option("--no-wait", help="Fail at once if another sae run is writing the store (default: wait "
                       "for it to end).")
]


# --------------------------------------------------------------------------- configuration


class ConfigError(ValueError):
    """An invalid configuration; the message names the field(s) and the problem."""


def read_config_file(path: Path) -> dict[str, Any]:
    """The mapping of a YAML or TOML configuration file (empty file: empty mapping)."""
    if not path.is_file():
        raise ConfigError(f"--config: no such file {str(path)!r}")
    suffix = path.suffix.lower()
    text = path.read_text()
    try:
        if suffix == ".toml":
            values = tomllib.loads(text)
        elif suffix in (".yaml", ".yml", ".json"):
            values = yaml.safe_load(text)
        else:
            raise ConfigError(f"--config must end in .yaml, .yml, .toml or .json, got {str(path)!r}")
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"--config {str(path)!r} is not valid {suffix[1:].upper()}: {error}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"--config {str(path)!r} must hold a mapping of sections, got {type(values).__name__}")
    return values


def apply_override(values: dict[str, Any], assignment: str) -> None:
    """Set ``a.b.c=value`` in nested ``values`` (value parsed as YAML: 1e-3, true, [a, b], null).

    >>> values = {}
    >>> apply_override(values, "train.model.n_atoms=128"); values
    {'train': {'model': {'n_atoms': 128}}}
    """
    path, sep, raw = assignment.partition("=")
    keys = path.strip().split(".")
    if not sep or not all(keys):
        raise ConfigError(f"--set must read 'section.field=value', got {assignment!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"--set {assignment!r}: the value is not valid YAML: {error}") from None
    node = values
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {assignment!r}: {key!r} is a value, not a section")
        node = child
    node[keys[-1]] = value


def describe_errors(error: ValidationError) -> str:
    """One line per problem: the dotted field, pydantic's message and the value received."""
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        received = "" if item["type"] == "value_error" else f" (got {item['input']!r})"
        if item["type"] == "extra_forbidden":
            message, received = "unknown key", ""
        lines.append(f"  {where}: {message}{received}" if where else f"  {message}")
    return "\n".join(lines)


def build_config(
    config_file: Path | None = None,
    overrides: list[str] | None = None,
    *,
    data: str | None = None,
    store: str | None = None,
    cluster: str | None = None,
    force: bool = False,
    strict: bool = False,
    preset: str | None = None,
) -> PipelineConfig:
    """The validated configuration of a command (see the module docstring for the priority).

    Raises
    ------
    ConfigError
        With every problem found, each naming its field.
    """
    values = read_config_file(config_file) if config_file is not None else {}
    for assignment in overrides or ():
        apply_override(values, assignment)
    for dotted, value in (("ingest.data", data), ("ingest.store", store), ("cluster", cluster)):
        if value is not None:
            section, _, field = dotted.rpartition(".")
            target = values.setdefault(section, {}) if section else values
            if not isinstance(target, dict):
                raise ConfigError(f"{section} must be a mapping of fields, got {target!r}")
            target[field] = value
    if force:
        values["force"] = True
    if preset is not None:
        values["preset"] = preset
    if strict:
        ingest = values.setdefault("ingest", {})
        if not isinstance(ingest, dict):
            raise ConfigError(f"ingest must be a mapping of fields, got {ingest!r}")
        ingest["strict"] = True
    try:
        return PipelineConfig.model_validate(values)
    except ValidationError as error:
        source = f" in {str(config_file)!r}" if config_file is not None else ""
        raise ConfigError(f"invalid configuration{source}:\n{describe_errors(error)}") from None


def _config_or_exit(**kwargs: Any) -> PipelineConfig:
    try:
        return build_config(**kwargs)
    except ConfigError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(USAGE_ERROR) from None


# --------------------------------------------------------------------------- output


def _clips_by_reason(found: dict[str, str], limit: int = 8) -> list[str]:
    """``{clip_id: reason}`` as one line per reason: the reason, the count and the first clip ids."""
    by_reason: dict[str, list[str]] = {}
    for clip_id, reason in found.items():
        by_reason.setdefault(reason, []).append(clip_id)
    return [f"{reason}: {len(ids)} clip(s): {', '.join(ids[:limit])}{' ...' if len(ids) > limit else ''}"
            for reason, ids in by_reason.items()]


def _echo_summary(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(summary, indent=2, default=str))
        return
    for key, value in summary.items():
        if key == "table" or (key == "results" and "table" in summary):
            continue
        if key == "repaired":
            for line in _clips_by_reason(value):
                typer.echo(f"re-ingested, {line}")
            continue
        if key == "cluster" and value is None:
            value = "local threads"
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        typer.echo(f"{key}: {value}")
    if "table" in summary:
        typer.echo("\n" + summary["table"])


def _fail(error: BaseException, code: int) -> typer.Exit:
    """Print ``error`` as one ``error:`` line (its traceback too when $SAE_TRACEBACK is set); the exit to raise."""
    if os.environ.get("SAE_TRACEBACK"):
        import traceback

        traceback.print_exception(error)
    message = str(error) or type(error).__name__
    if isinstance(error, (OSError, KeyError)) and type(error).__name__ not in message:
        message = f"{type(error).__name__}: {message}"
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@contextmanager
def _prepared(command: str, config: PipelineConfig, no_wait: bool) -> Iterator[PipelineConfig]:
    """Check ``config`` for ``command`` before any work (exit 2), then hold the store's lock and a Prefect API.

    Errors of the work inside become one ``error:`` line and exit code 1.
    """
    import logging

    from flows import pipeline

    logging.getLogger("distributed").setLevel(logging.WARNING)
    pipeline.show_library_logs()
    config = pipeline.resolve_paths(config)
    try:
        pipeline.preflight(command, config)
    except ValueError as error:
        raise _fail(error, USAGE_ERROR) from None
    with _running(config.ingest.store, no_wait, pipeline.dask_address(config)):
        yield config


@contextmanager
def _running(store: str, no_wait: bool, address: str | None = None) -> Iterator[None]:
    """Hold ``store``'s lock, a Prefect API and the terminal's progress display (with a Dask ``address``, the
    workers' progress too) for the work inside; its errors become one ``error:`` line, exit 1."""
    from flows._progress import terminal_display
    from flows._server import prefect_api
    from prefect.exceptions import TerminationSignal

    from sae import store as sae_store

    try:
        with _terminated_as_exception(), sae_store.store_lock(store, wait=0 if no_wait else None), \
                prefect_api(), terminal_display(address, store=store) as display:
            try:
                yield
            except (KeyboardInterrupt, TerminationSignal, _Terminated) as stop:
                _stop_now(stop, display)  # here, not below: leaving the blocks above would wait for the server
    except typer.Exit:
        raise
    except (KeyboardInterrupt, TerminationSignal, _Terminated) as stop:
        _stop_now(stop)
    except Exception as error:  # noqa: BLE001 - the command's boundary: one line, no traceback
        raise _fail(error, 1) from None


class _Terminated(BaseException):
    """SIGTERM outside a flow run (inside one, Prefect raises its own ``TerminationSignal``)."""


@contextmanager
def _terminated_as_exception() -> Iterator[None]:
    """SIGTERM raises `_Terminated` in the main thread while the work runs, as Ctrl-C raises KeyboardInterrupt."""
    import signal

    def handler(signum: int, frame: Any) -> None:
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop_now(stop: BaseException, display: Any = None) -> None:
    """End the command at once after Ctrl-C (``stop`` a KeyboardInterrupt: exit 130) or SIGTERM (143).

    The work runs in threads (task runners, an in-process Dask cluster) that do
    not stop on request: an ordinary exit would wait for them, i.e. for the
    current stage to finish.  Nothing is lost by not waiting: a stage group
    is complete only once fully written, the store's lock is the operating
    system's (released with the process), the temporary Prefect server stops
    when its input closes, and a cluster drops the tasks of a client that left.
    """
    what, code = ("interrupted", 130) if isinstance(stop, KeyboardInterrupt) else ("terminated", 143)
    if display is not None:
        display.__exit__(None, None, None)  # the terminal back as it was (the progress bars hide the cursor)
    typer.echo(f"{what}: the store keeps every completed stage; run again to resume", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run_stage(name: str, config: PipelineConfig, as_json: bool, no_wait: bool = False) -> None:
    from flows import pipeline
    from sae.report import accuracy_table

    runners = {
        "ingest": pipeline.run_ingest_stage,
        "graph": pipeline.run_graph_stage,
        "train": pipeline.run_train_stage,
        "classify": pipeline.run_classify_stage,
    }
    with _prepared(name, config, no_wait) as config:
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
    _echo_summary(summary, as_json)


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
    cfg = _config_or_exit(config_file=config, preset=preset, overrides=set_, data=data, store=store, cluster=cluster,
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
    cfg = _config_or_exit(config_file=config, overrides=set_, data=data, store=store, cluster=cluster, force=force,
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
        cfg = _config_or_exit(config_file=config, preset=preset, overrides=set_, data=data, store=store,
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

    cfg = _config_or_exit(config_file=config, preset=preset, overrides=set_, data=data, store=store, cluster=cluster,
                          force=force)
    if len(param) != len(values):
        typer.echo(f"error: every --param needs one --values (got {len(param)} --param and {len(values)} --values)",
                   err=True)
        raise typer.Exit(USAGE_ERROR)
    grid = {name: values_text for name, values_text in zip(param, values)}
    try:
        sweep_points(cfg, grid)  # every point valid before any work
    except ValueError as error:
        raise _fail(error, USAGE_ERROR) from None
    parameters = {name: parse_values(text) for name, text in grid.items()}
    with _prepared("sweep", cfg, no_wait) as cfg:
        summary = run_sweep(cfg, parameters, parallel=parallel)
    if as_json:
        typer.echo(json.dumps(summary, indent=2, default=str))
        return
    for name in ("store", "key", "csv", "markdown", "metrics_png", "atoms_png", "convergence_png"):
        typer.echo(f"{name}: {summary[name]}")
    typer.echo("computed: " + ", ".join(f"{stage} {len(keys)}" for stage, keys in summary["computed"].items()))
    typer.echo("\n" + summary["table"])


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

    cfg = _config_or_exit(config_file=config, preset=preset, overrides=set_, data=data, store=store, cluster=cluster)
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
    with _prepared("experiment", cfg, no_wait) as cfg:
        summary = run_experiment(cfg, stds, weight)
    if as_json:
        typer.echo(json.dumps({k: v for k, v in summary.items() if k != "text"}, indent=2, default=str))
        return
    for name in ("store", "markdown", "png"):
        typer.echo(f"{name}: {summary[name]}")
    typer.echo("\n" + summary["text"])


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
        raise _fail(error, USAGE_ERROR) from None
    if as_json:
        typer.echo(json.dumps(report, indent=2, default=str))
    else:
        typer.echo(_verify_text(report))
    raise typer.Exit(0 if report["intact"] else 1)


def _verify_text(report: dict[str, Any]) -> str:
    counts = report["counts"]
    lines = [f"store: {report['store']} (layout {report['layout']})",
             f"clips: {report['n_clips']} ({', '.join(f'{k} {v}' for k, v in counts.items())})",
             "labels: " + ", ".join(f"{name} {n}" for name, n in report["ok_per_label"].items())]
    lines += [f"  label {name!r} has no valid audio file: not a label of this dataset" for name in report["empty_labels"]]
    if report["errors"]:
        kinds: dict[str, int] = {}
        for error in report["errors"]:
            kinds[error["kind"]] = kinds.get(error["kind"], 0) + 1
        lines.append("clips in error: " + ", ".join(f"{kind} {n}" for kind, n in sorted(kinds.items())))
    lines.append(f"damaged clips: {len(report['damaged'])}" if report["damaged"] else "damaged clips: none")
    lines += [f"  {line}" for line in _clips_by_reason(report["damaged"])]
    lines.append("stages:")
    for name, info in report["stages"].items():
        state = "ok" if info["complete"] else "; ".join(info["problems"])
        lines.append(f"  {name}: {state}")
    lines.append(f"lock: held by {report['locked']}" if report["locked"] else "lock: free")
    lines.append("intact: yes" if report["intact"] else
                 "intact: no (the next `sae run` re-ingests the damaged clips and recomputes the damaged stages)")
    return "\n".join(lines)


# --------------------------------------------------------------------------- a trained model on new music

ModelFolderOption = Annotated[
    Path, typer.Option("--model", "-m", help="A model folder (made by `sae export`, or by `sae run` in "
                       "<store>-models/<key>).", show_default=False)
]
MethodOption = Annotated[
    str | None,
    typer.Option("--method", help="Encoding of the new frames: encoder (one product, needs lambda_e > 0), exact "
                 "(the Z step), exact_graph (the Z step with the K nearest training frames as fixed neighbours, "
                 "needs lambda_g > 0; a search through the training frames per clip). Default: the model's "
                 "(exact unless chosen at export).", show_default=False),
]


def _model_or_exit(path: Path, method: str | None) -> Any:
    """The model folder loaded and checked, and ``method`` valid for it; else one error line and exit 2."""
    from sae.artifact import ModelFolderError, load_model

    try:
        model = load_model(path)
        if method is not None:
            model.resolve_method(method)
    except (ModelFolderError, ValueError) as error:
        raise _fail(error, USAGE_ERROR) from None
    return model


@app.command()
def export(
    store: Annotated[str, typer.Option("--store", help="The store holding the trained model.", show_default=False)],
    model_key: Annotated[
        str | None, typer.Option("--model", help="Key of model/<key> in the store (default: its only complete "
                                 "model).", show_default=False)
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="The model folder to write (default: <store>-models/<key>).",
                                  show_default=False)
    ] = None,
    results_key: Annotated[
        str | None, typer.Option("--results", help="Key of results/<key> whose classification settings and "
                                 "accuracy the model takes (default: the latest of this model).", show_default=False)
    ] = None,
    method: MethodOption = None,
    graph: Annotated[bool, typer.Option("--graph/--no-graph", help="Carry the training frames, codes and graph "
                                        "degrees (method exact_graph; the folder grows with the training set).")] = True,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing model folder.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Export a trained model as a self-contained, versioned model folder.

    The folder holds the CQT settings, the preprocessing, the dictionary and encoder, a classifier fitted on
    every clip of the store, and the cross-validated accuracy; `sae predict` and `sae encode` use it.
    """
    from sae import store as sae_store
    from sae.artifact import ModelFolderError, default_model_path, export_model, resolve_model_key

    try:
        sae_store.open_store(store)
        key = resolve_model_key(store, model_key)
        target = out if out is not None else default_model_path(store, key)
        if target.exists() and not force:
            raise ModelFolderError(f"{str(target)!r} already exists: choose another --out or pass --force")
    except (sae_store.StoreError, FileNotFoundError, ModelFolderError) as error:
        raise _fail(error, USAGE_ERROR) from None
    try:
        summary = export_model(store, target, model_key=key, results_key=results_key, method=method, graph=graph,
                               overwrite=force)
    except ModelFolderError as error:
        raise _fail(error, USAGE_ERROR) from None
    except Exception as error:  # noqa: BLE001 - the command's boundary
        raise _fail(error, 1) from None
    if as_json:
        typer.echo(json.dumps(summary, indent=2, default=str))
        return
    for name in ("path", "model_key", "results_key", "method"):
        typer.echo(f"{name}: {summary[name]}")
    typer.echo(f"methods: {', '.join(summary['methods'])}")
    typer.echo(f"size: {summary['bytes'] / 1e6:.1f} MB")
    for name, row in (summary["accuracy"] or {}).items():
        typer.echo(f"accuracy {name}: {100 * row['accuracy_mean']:.1f} ± {100 * row['accuracy_std']:.1f} % "
                   f"({row['protocol']})")


@app.command()
def predict(
    paths: Annotated[list[str], typer.Argument(help="Audio files and folders (every audio file below them).",
                                               show_default=False)],
    model: ModelFolderOption,
    method: MethodOption = None,
    top: Annotated[int, typer.Option("--top", min=1, help="Labels shown per clip, best first.")] = 3,
    as_json: JsonOption = False,
) -> None:
    """Classify audio files with a trained model: one line per file, its top labels or its error.

    A label's score is the share of the clip's window vectors that vote for it.

    Exit code 0 when every file was classified, 1 when some could not be (each reported; the others are
    classified), 2 when nothing could be done (no model, not an audio file, an empty folder).
    """
    from sae.inference import InputError, collect_audio, predict_files

    loaded = _model_or_exit(model, method)
    try:
        files = collect_audio(paths)
    except InputError as error:
        raise _fail(error, USAGE_ERROR) from None
    try:
        records = predict_files(loaded, files, method=method)
    except Exception as error:  # noqa: BLE001 - the command's boundary
        raise _fail(error, 1) from None
    n_errors = sum(record["status"] != "ok" for record in records)
    if as_json:
        summary = {"model": str(model), "method": method or loaded.method, "n_files": len(records),
                   "n_errors": n_errors, "results": records}
        typer.echo(json.dumps(summary, indent=2))
    else:
        for record in records:
            if record["status"] == "ok":
                best = "  ".join(f"{name} {share:.2f}" for name, share in list(record["scores"].items())[:top])
                typer.echo(f"{record['path']}\t{best}")
            else:
                typer.echo(f"{record['path']}\terror {record['error_kind']}: {record['error']}")
        typer.echo(f"{len(records) - n_errors} of {len(records)} files classified (method "
                   f"{method or loaded.method})", err=True)
    raise typer.Exit(1 if n_errors else 0)


@app.command()
def encode(
    model: ModelFolderOption,
    data: Annotated[str, typer.Option("--data", help="A folder of audio files (GTZAN layout, or flat: no labels) "
                                      "or a CSV manifest (path,label).", show_default=False)],
    out: Annotated[str, typer.Option("--out", help="The store to write (created, or resumed).", show_default=False)],
    method: MethodOption = None,
    cluster: ClusterOption = None,
    chunk_clips: Annotated[int, typer.Option("--chunk-clips", min=1, help="Clips per chunk and per task.")] = 16,
    strict: Annotated[bool, typer.Option("--strict", help="Fail (exit 1) if any clip is in error.")] = False,
    no_wait: NoWaitOption = False,
    as_json: JsonOption = False,
) -> None:
    """Encode a whole collection with a trained model into a store: codes, clip vectors, predicted labels.

    The store also holds the clips' CQT frames and clip table, as ingestion writes them; the work runs on local
    threads or a Dask cluster and resumes an interrupted run. The predictions go to a CSV and a markdown table
    in <out>-reports/.
    """
    from flows import pipeline
    from flows.predict import predict_flow
    from sae import store as sae_store
    from sae.inference import InputError, collection_clips

    _model_or_exit(model, method)
    out = str(Path(out).expanduser().resolve())
    address = pipeline.address_of(cluster)
    try:
        if address is not None and "://" not in address:
            raise InputError(f"--cluster must be 'local' or an address such as tcp://127.0.0.1:8786, got {address!r}")
        collection_clips(data)
        sae_store.check_location(out)
        if Path(out).exists():
            sae_store.open_store(out)
        if address is not None:
            pipeline.check_cluster(address)
    except (InputError, ValueError, sae_store.StoreError, FileNotFoundError) as error:
        raise _fail(error, USAGE_ERROR) from None
    pipeline.show_library_logs()
    with _running(out, no_wait, address):
        summary = predict_flow(model=str(model), data=data, out=out, method=method,
                               cluster=address or "local", chunk_clips=chunk_clips)
    n_errors = summary["counts"]["error"]
    if as_json:
        typer.echo(json.dumps(summary, indent=2, default=str))
    else:
        for name in ("store", "key", "method", "counts", "csv", "markdown"):
            value = summary[name]
            typer.echo(f"{name}: {', '.join(f'{k}={v}' for k, v in value.items()) if isinstance(value, dict) else value}")
    raise typer.Exit(1 if strict and n_errors else 0)


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
    cfg = _config_or_exit(config_file=config, preset=preset, overrides=set_, data=data, store=store, cluster=cluster)
    values = cfg.model_dump(mode="json")
    if values["classify"]["model"] == values["train"]["model"]:
        del values["classify"]["model"]  # the default: it follows train.model when the file is edited
    typer.echo(json.dumps(values, indent=2) if as_json else yaml.safe_dump(values, sort_keys=False).rstrip())


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
