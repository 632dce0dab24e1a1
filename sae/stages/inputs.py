"""What a stage needs before it runs: a complete ingestion, complete stage groups to read.

>>> named(["a", "b", "c"], limit=2)
'a, b and 1 more'
"""

from __future__ import annotations

from pathlib import Path

from sae import store as sae_store


def store_exists(store: str) -> bool:
    """Whether anything is at the path of ``store`` (a store to open, or a file that is none)."""
    return Path(store).exists()


def require_frames(store: str) -> None:
    """Fail unless ``store`` holds a complete ingestion: no clip pending, at least one clip ok.

    Raises
    ------
    RuntimeError
        Saying to run the ingest stage first.
    """
    status = sae_store.clip_table(sae_store.open_store(store))["status"] if store_exists(store) else None
    if status is None or (status == "pending").any() or not (status == "ok").any():
        raise RuntimeError(f"store {store!r} holds no complete ingestion: run the ingest stage first")


def require(store: str, stage: str, key: str, producer: str) -> None:
    """Fail unless ``<stage>/<key>`` is complete in ``store``; the message names the ``producer`` stage to run."""
    if not store_exists(store) or not sae_store.is_complete(store, stage, key):
        raise RuntimeError(f"store {store!r} has no complete {stage}/{key}: run the {producer} stage first")


def named(clip_ids: list[str], limit: int = 10) -> str:
    """The first ``limit`` clip ids, and how many more."""
    shown = ", ".join(clip_ids[:limit])
    return shown + (f" and {len(clip_ids) - limit} more" if len(clip_ids) > limit else "")
