"""A trained model on a collection of new music: the ``predict`` flow (``sae encode``, deployment ``predict/predict``).

`predict_flow` (model folder, folder or manifest of audio, output store) runs
`encode_flow` on local threads or on the Dask cluster of ``cluster`` /
``SAE_DASK_ADDRESS``, then writes the predictions as a CSV and a markdown
table (`sae.collection.write_predictions`) and publishes the table as an
artifact of the run.  `encode_flow` is ingestion with the model's CQT
configuration, then the model, one Prefect task per chunk of clips: the task
computes the CQT of its clips that are not ok yet (`sae.audio.process_batch`)
and the codes, vectors and scores of every ok clip of its chunk
(`sae.collection.encode_chunk`), writes its chunks and returns metadata only;
the flow records each batch in the clip table as it completes, so a rerun
resumes where the last one stopped::

    from flows.predict import predict_flow

    predict_flow(model="gtzan.zarr-models/0c2d9e1b7a55", data="new-music/", out="new-music.zarr")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.futures import as_completed

from flows._dask import StoppableTaskRunner
from sae import collection

DEFAULT_CHUNK_CLIPS = 16
"""Clips per chunk of the collection's store and per task."""


@task(name="encode-batch", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def encode_batch(out: str, key: str, chunk_index: int, clip_indices: list[int], model: str) -> list[dict]:
    """CQT of the batch's clips not ok yet, then the codes, vectors and scores of its chunk; returns the clip outcomes."""
    from sae.artifact import cached_model
    from sae.audio import process_batch

    records = process_batch(out, chunk_index, clip_indices) if clip_indices else []
    collection.encode_chunk(out, key, chunk_index, cached_model(model), records)
    return records


@flow(name="encode-collection", task_runner=StoppableTaskRunner(max_workers=2))
def encode_flow(model: str, data: str, out: str, method: str | None = None,
                chunk_clips: int = DEFAULT_CHUNK_CLIPS) -> dict[str, Any]:
    """Encode every clip of ``data`` with the model folder ``model`` into the store ``out`` (resumes).

    Returns
    -------
    dict
        ``store``, ``key`` (of ``encode/<key>``), ``method``, ``counts`` (clips
        per status), ``complete`` (bool), ``failed_batches``.
    """
    from sae import store as sae_store
    from sae.artifact import load_model
    from sae.audio import create_or_resume_store
    from sae.inference import collection_clips

    logger = get_run_logger()
    trained = load_model(model)
    method = trained.resolve_method(method)
    create_or_resume_store(out, trained.cqt, collection_clips(data), chunk_clips)
    key = collection.prepare_encoding(out, trained, method)
    batches = collection.pending_chunks(out, key)
    logger.info("%s: %d batches to run (method %s, encode/%s)", out, len(batches), method, key)
    futures = {encode_batch.submit(out, key, chunk, clips, model): chunk for chunk, clips in batches}
    failed = []
    for future in as_completed(list(futures)):
        chunk = futures[future]
        try:
            records = future.result()
        except Exception as exc:  # a batch that failed after its retries: the others go on
            failed.append(chunk)
            logger.error("batch %d failed: %r; it is done again by the next run", chunk, exc)
            continue
        collection.record_chunk(out, key, chunk, records)
        logger.info("batch %d encoded (%d clips ingested, %d errors)", chunk, len(records),
                    sum(record["status"] == "error" for record in records))
    complete = collection.finish_encoding(out, key)
    counts = sae_store.ingest_summary(sae_store.open_store(out))["counts"]
    if failed:
        raise RuntimeError(f"{len(failed)} batch(es) failed ({sorted(failed)}): run again to resume")
    return {"store": out, "key": key, "method": method, "counts": counts, "complete": complete,
            "failed_batches": sorted(failed)}


@flow(name="predict", task_runner=StoppableTaskRunner(max_workers=1))
def predict_flow(model: str, data: str, out: str, method: str | None = None, cluster: str | None = None,
                 chunk_clips: int = DEFAULT_CHUNK_CLIPS) -> dict[str, Any]:
    """Classify the clips of a folder or manifest with a model folder; the result table as an artifact.

    Parameters
    ----------
    model : str
        A model folder (`sae.artifact`).
    data : str
        A folder of audio files (GTZAN layout or flat) or a CSV manifest (path,label).
    out : str
        The collection's store (created, or resumed: `sae.collection`).
    method : str, optional
        Encoding method (default: the model's).
    cluster : str, optional
        Dask scheduler address; None: ``$SAE_DASK_ADDRESS`` if set, else local threads; "local": threads.
    chunk_clips : int
        Clips per chunk and per task.

    Returns
    -------
    dict
        `encode_flow`'s summary plus ``csv`` and ``markdown`` (paths of the table), ``rows`` (one per
        clip) and ``agreement`` (`sae.collection.label_agreement`: the given labels predicted, or None).
    """
    from flows.pipeline import address_of, make_task_runner

    logger = get_run_logger()
    model, data, out = (str(Path(path).expanduser().resolve()) for path in (model, data, out))
    address = address_of(cluster)
    runner = make_task_runner(address)
    encode = encode_flow if runner is None else encode_flow.with_options(task_runner=runner)
    logger.info("predict %s with %s into %s; tasks on %s", data, model, out, address or "local threads")
    summary = encode(model=model, data=data, out=out, method=method, chunk_clips=chunk_clips)
    rows = collection.predictions(out, summary["key"])
    csv_path, markdown_path, markdown = collection.write_predictions(out, summary["key"], rows)
    if FlowRunContext.get() is not None:
        create_markdown_artifact(markdown, key=f"predict-{summary['key']}",
                                 description=f"Predictions of {data} by {model}")
    return {**summary, "cluster": address, "csv": str(csv_path), "markdown": str(markdown_path), "rows": rows,
            "agreement": collection.label_agreement(rows)}
