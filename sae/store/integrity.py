"""Integrity of a store's frames: checksums, missing or damaged chunks, their repair, the state of a store.

Every chunk carries a CRC-32C checksum verified on every read, floating point
arrays have the fill value NaN and every chunk is written (`sae.store.layout`),
so a chunk missing from disk reads as NaN and a damaged one fails to decode;
`frames_problems` finds the clips whose frames are missing or damaged and
`mark_damaged` queues them for re-ingestion; `verify` reports the state of a
whole store without changing anything.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import zarr

from sae.store.clips import (
    chunk_clips_range,
    clip_table,
    ingest_summary,
    n_chunks,
    read_chunk_frames,
    update_clips,
)
from sae.store.layout import PathLike, open_store, store_frames_per_clip
from sae.store.lock import lock_state
from sae.store.stages import stage_problems, stages


def frames_checksum(frames: np.ndarray) -> int:
    """CRC-32 of a clip's frames as stored: the bytes of the float32 array in C order.

    >>> frames_checksum(np.zeros((2, 3), dtype=np.float32)) == zlib.crc32(bytes(2 * 3 * 4))
    True
    """
    return zlib.crc32(np.ascontiguousarray(frames, dtype=np.float32).tobytes())


def frames_problems(group: zarr.Group) -> dict[int, str]:
    """The ok clips whose frames are missing or damaged, each with what was found.

    Reads ``frames`` chunk by chunk (one chunk in memory at a time): a chunk
    that fails to decode (checksum mismatch, truncated file) damages all its ok
    clips; rows that read as NaN are a chunk missing from disk; otherwise a
    clip's frames must still have the CRC-32 recorded when it was ingested.

    Returns
    -------
    dict of int to str
        Clip index -> reason, empty when every ok clip is intact.
    """
    table = clip_table(group)
    ok = table["status"] == "ok"
    n_frames = store_frames_per_clip(group)
    problems: dict[int, str] = {}
    for chunk in range(n_chunks(group)):
        clips = chunk_clips_range(group, chunk)
        wanted = [i for i in clips if ok[i]]
        if not wanted:
            continue
        try:
            frames = read_chunk_frames(group, chunk)
        except Exception as exc:  # zarr raises codec-specific errors for a damaged chunk
            for i in wanted:
                problems[i] = f"chunk {chunk} of frames cannot be read ({type(exc).__name__}: {exc})"
            continue
        for i in wanted:
            rows = frames[(i - clips.start) * n_frames : (i - clips.start + 1) * n_frames]
            if np.isnan(rows).all():
                problems[i] = f"chunk {chunk} of frames is missing from disk"
            elif not np.isfinite(rows).all():
                problems[i] = f"frames hold non-finite values (chunk {chunk})"
            elif frames_checksum(rows) != int(table["checksum"][i]):
                problems[i] = f"frames differ from those ingested (CRC-32 mismatch, chunk {chunk})"
    return problems


def mark_damaged(group: zarr.Group, problems: Mapping[int, str]) -> None:
    """Queue damaged clips for re-ingestion: status "pending", the reason as their error message."""
    update_clips(group, [{"index": i, "status": "pending", "error": f"damaged: {reason}; re-ingest to repair"}
                         for i, reason in problems.items()])


def frames_digest(group: zarr.Group, clips: Sequence[int] | np.ndarray) -> str:
    """A digest of the frames of ``clips`` (their indices and recorded checksums): equal digests, equal frames."""
    table = clip_table(group)
    clips = np.asarray(clips, dtype=np.int64)
    blob = np.stack([clips, table["checksum"][clips].astype(np.int64)]).tobytes()
    return hashlib.sha256(blob).hexdigest()[:16]


def verify(path: PathLike) -> dict[str, Any]:
    """The state of a store, read without changing anything: clips, damage, stage groups, lock.

    Reads every chunk of ``frames`` (`frames_problems`) and the metadata of
    every stage group (`stage_problems`).

    Returns
    -------
    dict
        ``store``, ``layout``, ``n_clips``, ``counts`` (clips per status),
        ``ok_per_label``, ``empty_labels``, ``errors`` (clips in error),
        ``damaged`` (clip_id -> what is wrong with its frames), ``stages``
        (``"<stage>/<key>"`` -> {"complete": bool, "problems": [...]}),
        ``locked`` (a run holds the store now: who, else ""), ``intact`` (bool:
        no damaged clip and no stage group damaged; incomplete groups of an
        interrupted run are not damage).
    """
    root = open_store(path)
    summary = ingest_summary(root)
    clip_ids = clip_table(root)["clip_id"]
    damaged = {str(clip_ids[i]): reason for i, reason in sorted(frames_problems(root).items())}
    groups = {}
    for stage, keys in stages(root).items():
        for key in keys:
            problems = stage_problems(root, stage, key)
            groups[f"{stage}/{key}"] = {"complete": not problems, "problems": problems}
    broken = [name for name, info in groups.items()
              if any("missing" in p or "shape" in p for p in info["problems"])]
    return {
        **summary,
        "layout": int(root.attrs["sae_layout"]),
        "damaged": damaged,
        "stages": groups,
        "locked": lock_state(path),
        "intact": not damaged and not broken,
    }
