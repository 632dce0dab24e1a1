"""The ingest stage: audio -> ``frames`` and the clip table, recorded as ``ingest/<key>`` when complete.

Freshness: `ingest_complete` (the record of this configuration, no clip
pending); before it is judged, `repair_frames` queues the clips whose frames
are missing or damaged for re-ingestion; after, `check_ingestion` reports the
labels without valid audio and, with ``strict``, fails on clips in error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sae import store as sae_store
from sae.config import IngestConfig, PipelineConfig
from sae.stages.inputs import named, store_exists
from sae.store.keys import INGEST, ingest_key

logger = logging.getLogger("sae.stages")


def ingest_complete(config: IngestConfig) -> bool:
    """Whether the store holds a complete ingestion for this configuration (no clip pending)."""
    if not store_exists(config.store) or not sae_store.is_complete(config.store, INGEST, ingest_key(config)):
        return False
    status = sae_store.clip_table(sae_store.open_store(config.store))["status"]
    return not bool((status == "pending").any())


def repair_frames(store: str, *, log: Any = logger) -> dict[str, str]:
    """Find the ok clips of ``store`` whose frames are missing or damaged and queue them for re-ingestion.

    Returns
    -------
    dict
        clip_id -> what was found (empty when the frames are intact).
    """
    root = sae_store.open_store(store, mode="r+")
    problems = sae_store.frames_problems(root)
    if not problems:
        return {}
    clip_ids = sae_store.clip_table(root)["clip_id"]
    found = {str(clip_ids[i]): reason for i, reason in sorted(problems.items())}
    log.warning("store %s: the frames of %d clip(s) are missing or damaged (%s): %s; they are ingested "
                "again", store, len(found), next(iter(found.values())), named(list(found)))
    sae_store.mark_damaged(root, problems)
    return found


def check_ingestion(summary: dict[str, Any], strict: bool, *, log: Any = logger) -> None:
    """Report the labels without valid audio; with ``strict``, fail if any clip of the clip table is in error."""
    for label in summary.get("empty_labels", []):
        log.warning("label %r has no valid audio file: it is not a label of this dataset (not counted among the "
                    "labels, the chance level or the folds)", label)
    if strict and summary["counts"]["error"]:
        kinds = sorted({error["kind"] for error in summary["errors"]})
        raise RuntimeError(
            f"strict ingestion: {summary['counts']['error']} clip(s) in error (kinds: {', '.join(kinds)}): "
            f"{named([error['clip_id'] for error in summary['errors']])}; see `sae verify --store {summary['store']}`"
        )


def record_ingestion(config: IngestConfig, summary: dict[str, Any]) -> None:
    """Write ``ingest/<key>``, the record of a complete ingestion: its configuration and clip counts."""
    group = sae_store.stage_group(config.store, INGEST, ingest_key(config), config=config.model_dump(mode="json"),
                                  mode="w")
    group.attrs.update({"counts": summary["counts"]})
    sae_store.mark_complete(group)


def ingest_stage(
    config: PipelineConfig, ingest: Callable[[IngestConfig], dict[str, Any]], *, log: Any = logger
) -> dict[str, Any]:
    """Ingestion, skipped when complete; with ``config.force`` the store is created anew.

    Clips whose frames are missing or damaged in the store are ingested again
    first (`repair_frames`); ``ingest.strict`` judges the clip table as it
    stands, whether or not ingestion ran.

    Parameters
    ----------
    config : PipelineConfig
    ingest : callable
        ``ingest(config=)`` runs the ingestion of an `IngestConfig` and returns
        its summary (``flows.ingest.ingest_flow`` in a flow).
    log : logger

    Returns
    -------
    dict
        ``skipped``, ``key``, ``repaired`` (clip_id -> what was found) and the
        ingestion summary (``counts``, ``errors``, ``empty_labels``, ...).
    """
    settings = config.ingest.model_copy(update={"overwrite": config.ingest.overwrite or config.force})
    key = ingest_key(settings)
    with sae_store.store_lock(settings.store):
        resumed = not settings.overwrite and store_exists(settings.store)
        repaired = repair_frames(settings.store, log=log) if resumed else {}
        skipped = not settings.overwrite and ingest_complete(settings)
        if skipped:
            summary = sae_store.ingest_summary(sae_store.open_store(settings.store))
            log.info("ingest: %s holds every clip (%s): skipped", settings.store, summary["counts"])
        else:
            summary = ingest(config=settings)
            record_ingestion(settings, summary)
    check_ingestion(summary, settings.strict, log=log)
    return {"skipped": skipped, "key": key, "repaired": repaired, **summary}
