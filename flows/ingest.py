"""The ingestion flow: audio files (or the built-in dataset) to the frames of a Zarr store.

One Prefect task per batch of ``chunk_clips`` clips: it computes their CQTs,
writes its own chunk of ``frames`` (`sae.audio.process_batch`) and returns
metadata only.  The flow is the single writer of the clip table: it records
each batch's outcome as the batch completes, so an interrupted run resumes
where it stopped (clips already "ok" are skipped).  Its progress in clips is
a progress artifact of the run and a line per batch (`flows._progress`).

Run it locally (threads) or on Dask workers::

    from prefect_dask import DaskTaskRunner
    from sae.config import IngestConfig
    from flows.ingest import run_ingest

    run_ingest(IngestConfig(data="gtzan/genres", store="gtzan.zarr"),
               task_runner=DaskTaskRunner(cluster_kwargs={"n_workers": 2, "threads_per_worker": 1}))
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.futures import as_completed
from prefect.task_runners import TaskRunner

from flows._dask import StoppableTaskRunner
from flows._progress import Progress
from flows._runs import run_namer
from sae.audio import prepare_ingest, process_batch
from sae.config import IngestConfig
from sae.report import errors_markdown
from sae.store import ingest_summary, open_store, pending_batches, update_clips


@task(name="prepare-store", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2)
def prepare_store(config: IngestConfig) -> str:
    """Resolve the clips (or generate the built-in dataset) and create or check the store."""
    return prepare_ingest(config)


@task(name="ingest-batch", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def ingest_batch(store: str, chunk_index: int, clip_indices: list[int]) -> list[dict]:
    """CQT of one batch of clips, written to its own chunk; returns per-clip metadata."""
    return process_batch(store, chunk_index, clip_indices)


@flow(name="ingest", task_runner=StoppableTaskRunner(max_workers=2),
      flow_run_name=run_namer("ingest", lambda p: Path(IngestConfig.model_validate(p["config"]).store).name))
def ingest_flow(config: IngestConfig) -> dict[str, Any]:
    """Ingest ``config.data`` into the store ``config.store``; return a summary.

    Returns
    -------
    dict
        ``store``, ``n_clips``, ``counts`` (clips per status), ``errors`` (one
        dict per clip in error: index, clip_id, path, kind, message),
        ``computed`` (indices of the clips processed by this run) and
        ``failed_batches`` (chunk indices whose task failed).

    Raises
    ------
    RuntimeError
        At the end, after the clip table is written, if a batch task failed
        (re-run to resume).  ``config.strict`` is judged by the pipeline's
        ingest stage (`flows.pipeline.run_ingest_stage`), on the clip table as
        it stands, whether or not this flow ran.
    """
    logger = get_run_logger()
    store = prepare_store(config)
    group = open_store(store, mode="r+")
    n_clips = int(group.attrs["n_clips"])
    batches = pending_batches(group)
    done = n_clips - sum(len(clips) for _, clips in batches)
    logger.info("%s: %d clips, %d already ok, %d batches to run", store, n_clips, done, len(batches))

    batch_task = ingest_batch.with_options(retries=config.retries)
    futures = {batch_task.submit(store, chunk, clips): chunk for chunk, clips in batches}
    computed: list[int] = []
    failed: list[int] = []
    progress = Progress("ingest", n_clips, "clips", store=store, log_seconds=0.0, done=done)
    for future in as_completed(list(futures)):
        chunk = futures[future]
        try:
            records = future.result()
        except Exception as exc:  # a batch task failed after its retries: record it, go on
            failed.append(chunk)
            logger.error("batch %d failed: %r; its clips stay pending", chunk, exc)
            continue
        update_clips(group, records)
        computed.extend(record["index"] for record in records)
        done += len(records)
        n_errors = sum(record["status"] == "error" for record in records)
        progress(done, detail=f"batch {chunk}: {n_errors} errors")

    if not failed:
        progress.finish()
    summary = ingest_summary(group)
    summary["computed"] = sorted(computed)
    summary["failed_batches"] = sorted(failed)
    logger.info("ingestion of %s: %s", store, summary["counts"])
    if FlowRunContext.get() is not None:
        create_markdown_artifact(
            errors_markdown(summary), key="ingest-errors", description=f"Clips in error in {store}"
        )
    if failed:
        raise RuntimeError(
            f"{len(failed)} batch(es) failed ({sorted(failed)}); their clips are still pending: re-run to resume"
        )
    return summary


def run_ingest(config: IngestConfig, task_runner: TaskRunner | None = None) -> dict[str, Any]:
    """Run `ingest_flow` with a given task runner (default: 2 threads); returns its summary."""
    runnable = ingest_flow if task_runner is None else ingest_flow.with_options(task_runner=task_runner)
    return runnable(config)
