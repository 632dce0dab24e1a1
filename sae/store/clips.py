"""The clip table and the frames: chunks of clips, the table's columns, the clips' groups, ingestion's summary.

A chunk of ``frames`` holds whole clips (``chunk_clips`` of them), so batches
of clips write disjoint chunks in parallel without locks; the clip table is
written by the run's own process only (`update_clips`), after the frames of a
batch are fully written.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import zarr

from sae.store.layout import (
    CLIP_COLUMNS,
    STATUSES,
    STRING_COLUMNS,
    _strings,
    create_array,
    store_frames_per_clip,
    store_labels,
    store_path,
)

# --------------------------------------------------------------------------- frames


def frames_array(group: zarr.Group) -> zarr.Array:
    """The ``frames`` array, (n_clips * F, n_bins) float32, for ``dask.array.from_zarr``."""
    return group["frames"]


def n_chunks(group: zarr.Group) -> int:
    """Number of chunks of ``frames`` along the frame axis (= ingestion batches)."""
    chunk_clips = int(group.attrs["chunk_clips"])
    n_clips = int(group.attrs["n_clips"])
    return -(-n_clips // chunk_clips)


def chunk_clips_range(group: zarr.Group, chunk_index: int) -> range:
    """The clip indices whose frames live in chunk ``chunk_index`` of ``frames``."""
    count = n_chunks(group)
    if not 0 <= chunk_index < count:
        raise ValueError(f"chunk_index must be in [0, {count}), got {chunk_index}")
    chunk_clips = int(group.attrs["chunk_clips"])
    n_clips = int(group.attrs["n_clips"])
    start = chunk_index * chunk_clips
    return range(start, min(start + chunk_clips, n_clips))


def read_chunk_frames(group: zarr.Group, chunk_index: int) -> np.ndarray:
    """The frames of one chunk, (len(chunk_clips_range) * F, n_bins) float32."""
    clips = chunk_clips_range(group, chunk_index)
    n_frames = store_frames_per_clip(group)
    return frames_array(group)[clips.start * n_frames : clips.stop * n_frames]


def write_chunk_frames(group: zarr.Group, chunk_index: int, frames: np.ndarray) -> None:
    """Write the frames of every clip of one chunk, exactly that chunk.

    ``frames`` is (len(chunk_clips_range) * F, n_bins); the write covers whole
    chunks only, so concurrent writers of different chunks never touch the same
    chunk object.
    """
    clips = chunk_clips_range(group, chunk_index)
    n_frames = store_frames_per_clip(group)
    array = frames_array(group)
    expected = (len(clips) * n_frames, array.shape[1])
    if frames.shape != expected:
        raise ValueError(f"frames of chunk {chunk_index} must have shape {expected}, got {frames.shape}")
    array[clips.start * n_frames : clips.stop * n_frames] = np.asarray(frames, dtype=np.float32)


# --------------------------------------------------------------------------- clip table


def clip_table(group: zarr.Group) -> dict[str, np.ndarray]:
    """All columns of the clip table, as numpy arrays (strings as fixed-width unicode).

    Returns
    -------
    dict of str to np.ndarray
        Keys are `CLIP_COLUMNS`; every array has length n_clips.  A store made
        before the ``group`` column gets every clip as its own group.
    """
    table = group["clips"]
    out = {}
    for name in CLIP_COLUMNS:
        if name not in table and name == "group":
            out[name] = out["clip_id"].copy()
            continue
        values = table[name][:]
        out[name] = _strings(values) if name in STRING_COLUMNS else np.asarray(values)
    return out


def update_groups(group: zarr.Group, groups: Sequence[str]) -> bool:
    """Write the ``group`` column (one entry per clip); True if it changed.

    Groups only say how cross-validation splits the clips, never what the
    frames are, so a resumed ingestion updates them in place.
    """
    groups = np.array([str(g) for g in groups], dtype=str)
    n_clips = int(group.attrs["n_clips"])
    if groups.shape != (n_clips,):
        raise ValueError(f"groups must have one entry per clip ({n_clips}), got {groups.shape[0]}")
    table = group["clips"]
    if "group" in table and np.array_equal(_strings(table["group"][:]), groups):
        return False
    create_array(table, "group", shape=(n_clips,), dtype=str, dimension_names=("clip",), data=groups, overwrite=True)
    return True


def groups_digest(group: zarr.Group) -> str:
    """A digest of how the clips fall into groups (equal for any renaming of the groups)."""
    return hashlib.sha256(clip_group_index(group).tobytes()).hexdigest()[:16]


def clip_group_index(group: zarr.Group) -> np.ndarray:
    """The group of every clip as an integer (n_clips,) int64, numbered in order of first appearance.

    Equal groups get equal integers; the numbering depends only on how the
    clips are grouped, not on the groups' names.
    """
    _, first, inverse = np.unique(clip_table(group)["group"], return_index=True, return_inverse=True)
    rank = np.empty(first.size, dtype=np.int64)
    rank[np.argsort(first)] = np.arange(first.size)
    return rank[inverse]


def update_clips(group: zarr.Group, records: Iterable[Mapping[str, Any]]) -> None:
    """Write the outcome of processed clips into the clip table (single writer only).

    Parameters
    ----------
    group : zarr.Group
        The store, opened for writing.
    records : iterable of mapping
        One per clip: ``index`` (clip index), ``status`` ("ok", "error" or
        "pending"), ``error_kind`` and ``error`` (strings, "" when ok),
        ``n_frames`` (int) and ``checksum`` (int, the frames' CRC-32; 0 when not ok).
    """
    records = list(records)
    if not records:
        return
    table = group["clips"]
    columns = {name: table[name][:] for name in ("n_frames", "status", "error_kind", "error", "checksum")}
    for name in ("status", "error_kind", "error"):
        columns[name] = np.array(columns[name].tolist(), dtype=object)
    n_clips = len(columns["status"])
    for record in records:
        index = int(record["index"])
        if not 0 <= index < n_clips:
            raise ValueError(f"clip index must be in [0, {n_clips}), got {index}")
        status = record["status"]
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        columns["status"][index] = status
        columns["error_kind"][index] = str(record.get("error_kind", ""))
        columns["error"][index] = str(record.get("error", ""))
        columns["n_frames"][index] = int(record.get("n_frames", 0))
        columns["checksum"][index] = int(record.get("checksum", 0))
    for name, values in columns.items():
        table[name][:] = values.astype(str) if values.dtype == object else values


def ok_clips(group: zarr.Group) -> np.ndarray:
    """Indices (int64, increasing) of the clips whose status is "ok"."""
    status = _strings(group["clips"]["status"][:])
    return np.flatnonzero(status == "ok").astype(np.int64)


def frame_rows(
    group: zarr.Group,
    clips: Sequence[int] | np.ndarray | None = None,
    frames_per_clip: int | None = None,
) -> np.ndarray:
    """Row indices into ``frames`` of the ok clips, clip after clip, in clip order.

    Parameters
    ----------
    group : zarr.Group
        The store.
    clips : sequence of int, optional
        Restrict to these clip indices (the ones that are not ok are dropped).
        Default: every ok clip.
    frames_per_clip : int, optional
        Keep only the first ``frames_per_clip`` frames of every clip, 1 <= value <= F.
        Default: all F.

    Returns
    -------
    np.ndarray
        int64, of length n_selected_clips * frames_per_clip: for clip i the rows
        i*F, ..., i*F + frames_per_clip - 1.
    """
    n_frames = store_frames_per_clip(group)
    if frames_per_clip is None:
        frames_per_clip = n_frames
    if not 1 <= int(frames_per_clip) <= n_frames:
        raise ValueError(f"frames_per_clip must be in [1, {n_frames}] for this store, got {frames_per_clip}")
    selected = ok_clips(group)
    if clips is not None:
        wanted = np.unique(np.asarray(clips, dtype=np.int64))
        selected = selected[np.isin(selected, wanted)]
    rows = selected[:, None] * n_frames + np.arange(int(frames_per_clip), dtype=np.int64)[None, :]
    return rows.ravel()


def pending_batches(group: zarr.Group) -> list[tuple[int, list[int]]]:
    """The ingestion work left: ``(chunk_index, clip indices not "ok")`` for every chunk that has some."""
    status = _strings(group["clips"]["status"][:])
    batches = []
    for chunk_index in range(n_chunks(group)):
        todo = [i for i in chunk_clips_range(group, chunk_index) if status[i] != "ok"]
        if todo:
            batches.append((chunk_index, todo))
    return batches


def ingest_summary(group: zarr.Group) -> dict[str, Any]:
    """Counts per status, ok clips per label, the labels without any ok clip, and the errors (JSON-friendly).

    A label none of whose files is valid audio (a ``licenses/`` folder beside
    the genres, say) is listed in ``empty_labels``: it has no frames, so it
    is no label of the dataset for the later stages (classes, chance, folds).
    """
    table = clip_table(group)
    counts = {status: int(np.sum(table["status"] == status)) for status in STATUSES}
    labels = {name: int(np.sum((table["label"] == name) & (table["status"] == "ok"))) for name in store_labels(group)}
    errors = [
        {
            "index": int(i),
            "clip_id": str(table["clip_id"][i]),
            "path": str(table["path"][i]),
            "kind": str(table["error_kind"][i]),
            "message": str(table["error"][i]),
        }
        for i in np.flatnonzero(table["status"] == "error")
    ]
    return {"store": store_path(group), "n_clips": len(table["status"]), "counts": counts,
            "ok_per_label": labels, "empty_labels": sorted(name for name, n in labels.items() if n == 0),
            "errors": errors}
