"""The ``sae`` commands of a trained model: ``export`` (a store's model as a model folder), ``predict`` (audio
files, one line each) and ``encode`` (a collection into a store, as a Prefect flow).

Exit codes: 2 when nothing could be done (no model folder, a method the model
lacks, no audio input), 1 when the work failed or, where said, some clips could
not be handled, 0 otherwise.  `flows.cli` registers these functions as commands.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from flows._cli_config import USAGE_ERROR, ClusterOption, JsonOption, NoWaitOption
from flows._cli_run import fail, running
from sae.report import encode_text, export_text, predictions_tally, predictions_text

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
        raise fail(error, USAGE_ERROR) from None
    return model


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
    cluster: ClusterOption = None,
    as_json: JsonOption = False,
) -> None:
    """Export a trained model as a self-contained, versioned model folder.

    The folder holds the CQT settings, the preprocessing, the dictionary and encoder, per encoding method a
    classifier fitted on every clip of the store coded as that method codes new music, and the cross-validated
    accuracy; `sae predict` and `sae encode` use it. With a Dask cluster, the training clips are encoded on its
    workers.
    """
    from flows.pipeline import address_of, show_library_logs
    from sae import store as sae_store
    from sae.artifact import ModelFolderError, resolve_model_key
    from sae.stages import export_on
    from sae.store.keys import default_model_path

    show_library_logs()  # the classifiers' encoding of every training clip takes minutes on a big store: progress
    try:
        sae_store.open_store(store)
        key = resolve_model_key(store, model_key)
        target = out if out is not None else default_model_path(store, key)
        if target.exists() and not force:
            raise ModelFolderError(f"{str(target)!r} already exists: choose another --out or pass --force")
    except (sae_store.StoreError, FileNotFoundError, ModelFolderError) as error:
        raise fail(error, USAGE_ERROR) from None
    try:
        summary = export_on(address_of(cluster), store, target, model_key=key, results_key=results_key,
                            method=method, graph=graph, overwrite=force)
    except ModelFolderError as error:
        raise fail(error, USAGE_ERROR) from None
    except Exception as error:  # noqa: BLE001 - the command's boundary
        raise fail(error, 1) from None
    if as_json:
        typer.echo(json.dumps(summary, indent=2, default=str))
        return
    typer.echo(export_text(summary))


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
        raise fail(error, USAGE_ERROR) from None
    try:
        records = predict_files(loaded, files, method=method)
    except Exception as error:  # noqa: BLE001 - the command's boundary
        raise fail(error, 1) from None
    n_errors = sum(record["status"] != "ok" for record in records)
    if as_json:
        summary = {"model": str(model), "method": method or loaded.method, "n_files": len(records),
                   "n_errors": n_errors, "results": records}
        typer.echo(json.dumps(summary, indent=2))
    else:
        typer.echo(predictions_text(records, top))
        typer.echo(predictions_tally(len(records), n_errors, method or loaded.method), err=True)
    raise typer.Exit(1 if n_errors else 0)


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
        raise fail(error, USAGE_ERROR) from None
    pipeline.show_library_logs()
    with running(out, no_wait, address):
        summary = predict_flow(model=str(model), data=data, out=out, method=method,
                               cluster=address or "local", chunk_clips=chunk_clips)
    n_errors = summary["counts"]["error"]
    if as_json:
        typer.echo(json.dumps(summary, indent=2, default=str))
    else:
        typer.echo(encode_text(summary))
    raise typer.Exit(1 if strict and n_errors else 0)
