"""The one module that knows the Zarr layout of a dataset store.

A *store* is a Zarr v3 group on disk (``<name>.zarr``) that holds one dataset
run and everything computed from it.  Nothing else in ``sae`` or ``flows``
builds paths inside a store: it calls the functions here.  Everything in it is
plain arrays and JSON attributes, readable by any Zarr v3 client (strings use
the ``string`` data type with the ``vlen-utf8`` codec; no pickled objects).

Layout (orientation: samples by features, see ``sae``)::

    <store>.zarr/
      attrs: sae_layout (int), sae_version, created (ISO 8601),
             cqt (CQTConfig as JSON), labels (sorted label names),
             frames_per_clip (F), n_clips, chunk_clips
      frames        float32 (n_clips * F, n_bins), chunks (chunk_clips * F, n_bins);
                    dimension names ("frame", "bin").
                    Rows [i*F, (i+1)*F) belong to clip i; the rows of a clip
                    whose status is not "ok" hold zeros.
                    A chunk holds whole clips, so batches of chunk_clips clips
                    write disjoint chunks in parallel without locks.
      clips/        the clip table: one 1-D array per column, n_clips long
        clip_id      str    "<label>/<file stem>", unique
        path         str    source path as given
        label        str
        label_index  int32  index into attrs["labels"]
        first_frame  int64  i * F
        n_frames     int32  F for ok clips, 0 otherwise
        status       str    "pending" | "ok" | "error"
        error_kind   str    "" or one of sae.audio.ERROR_KINDS: missing,
                            unreadable, empty, unsupported, corrupt,
                            truncated, too_short, silent
        error        str    human-readable message, "" when ok
        checksum     int64  CRC-32 of the clip's F x n_bins float32 frames
                            (C order) when ok, else 0
        group        str    what must stay on one side of a cross-validation
                            split (recording, album, artist); the clip id when
                            the data gave none.  Stores made before this column
                            read as if every clip were its own group.
      <stage>/<key>/  results of later stages (ingest: the record of a complete
                      ingestion; preprocess, graph, model, results), one group per configuration
                      fingerprint; attrs: config (JSON), complete (bool), created,
                      and, written last by `mark_complete`: arrays (the manifest:
                      path -> shape of every array the stage wrote), inputs (path
                      -> version of every stage group it was computed from),
                      version (a content digest or a random id).  Sparse matrices
                      inside a stage group are sub-groups written by `write_sparse`.

Integrity.  Every array is created by `create_array`: its chunks carry a
CRC-32C checksum (Zarr's ``crc32c`` codec, verified on every read), floating
point arrays have the fill value NaN, and every chunk is written even when it
equals the fill value (``array.write_empty_chunks``), so a chunk missing from
disk reads as NaN, never as plausible zeros, and a damaged one fails to
decode.  `frames_problems` finds the clips whose frames are missing or
damaged (and `mark_damaged` queues them for re-ingestion); `stage_problems`
checks a stage group against its manifest and its inputs; `is_complete`
trusts a stage group only when it finds no problem.

Concurrency.  One process writes a store at a time: the run that holds
`store_lock` (a lock file ``<store>.lock`` beside the store, released by the
operating system when its process dies, even by SIGKILL); tasks of that run
on Dask workers write the chunks it assigns them.  The clip table is written
by the run's own process only, after the frames of a batch are fully written;
a clip is "ok" only then, so a crash never leaves a half-written clip marked
done.  Consolidated metadata is never written (it would go stale); groups are
opened with ``use_consolidated=False``.

Example
-------
>>> import tempfile, os
>>> from sae.config import CQTConfig
>>> root = tempfile.mkdtemp()
>>> cqt = CQTConfig(clip_samples=22050)
>>> clips = [("a/x", "x.wav", "a"), ("b/y", "y.wav", "b"), ("a/z", "z.wav", "a")]
>>> group = create_store(os.path.join(root, "demo.zarr"), cqt, clips, chunk_clips=2)
>>> frames_array(group).shape, frames_array(group).chunks
((126, 96), (84, 96))
>>> clip_table(group)["label_index"].tolist()
[0, 1, 0]
>>> ok_clips(group).tolist()
[]
>>> bool(np.isnan(frames_array(group).fill_value))  # a chunk never written reads as NaN
True
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import re
import socket
import sys
import time
import uuid
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp
import zarr
import zarr.codecs

from sae import __version__
from sae.config import CQTConfig

logger = logging.getLogger(__name__)

LAYOUT_VERSION = 2
"""Version of the layout described in this module; bumped on incompatible change.

2: checksummed chunks, NaN fill, the ``checksum`` column, stage manifests."""

# Every chunk is written, even one that equals the fill value: a chunk missing from
# disk is then always damage (see Integrity in the module docstring).
zarr.config.set({"array.write_empty_chunks": True})

STATUSES = ("pending", "ok", "error")
"""Values of the ``status`` column."""

CLIP_COLUMNS = (
    "clip_id",
    "path",
    "label",
    "label_index",
    "first_frame",
    "n_frames",
    "status",
    "error_kind",
    "error",
    "checksum",
    "group",
)
"""Columns of the clip table, in order."""

_STRING_COLUMNS = ("clip_id", "path", "label", "status", "error_kind", "error", "group")
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.\-]+$")

PathLike = str | os.PathLike


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class StoreError(ValueError):
    """A store that cannot be used as asked: not a sae store, another layout, missing parts."""


class StoreDamaged(StoreError):
    """Data of a store is missing or damaged; the message names what and how to repair it."""


class StoreLocked(RuntimeError):
    """Another process holds the store's lock (see `store_lock`)."""


def array_compressors() -> list:
    """The codecs applied to the chunks of every array of a store: Blosc lz4 (byte shuffle), then CRC-32C.

    Blosc lz4 is fast on both sides (zeros and sparse codes compress well);
    the CRC-32C checksum appended to every chunk is verified when the chunk
    is read, so a damaged chunk raises instead of decoding to wrong numbers.
    """
    return [zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), zarr.codecs.Crc32cCodec()]


def fill_value(dtype: Any) -> Any:
    """The fill value of arrays of ``dtype``: NaN for floating point (no real data is NaN), else 0 or "".

    >>> fill_value("float32"), fill_value("int64"), fill_value(str)
    (nan, 0, '')
    """
    if dtype is str:
        return ""
    kind = np.dtype(dtype).kind
    if kind == "f":
        return float("nan")
    if kind in "US":
        return ""
    return False if kind == "b" else 0


def create_array(
    group: zarr.Group,
    name: str,
    *,
    shape: tuple[int, ...],
    dtype: Any,
    chunks: tuple[int, ...] | None = None,
    dimension_names: tuple[str, ...] | None = None,
    data: np.ndarray | None = None,
    overwrite: bool = False,
) -> zarr.Array:
    """Create an array of a store, with its integrity settings (module docstring), and write ``data`` if given.

    ``chunks`` defaults to one chunk for the whole array (or one row of chunks
    for arrays of more than 64 MiB: 1-D chunks of ~16 MiB).  Every array of a
    store is made here.
    """
    if chunks is None:
        itemsize = 8 if dtype is str else np.dtype(dtype).itemsize
        row_bytes = itemsize * int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else itemsize
        rows = max(1, min(int(shape[0]) if shape else 1, (16 << 20) // max(row_bytes, 1)))
        whole = int(np.prod(shape, dtype=np.int64)) * itemsize <= 64 << 20
        chunks = tuple(max(1, int(s)) for s in shape) if whole or not shape else (rows, *shape[1:])
    array = group.create_array(
        name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill_value(dtype),
        compressors=array_compressors(), dimension_names=dimension_names, overwrite=overwrite,
    )
    if data is not None and array.size:
        array[...] = data
    return array


def _strings(values: np.ndarray) -> np.ndarray:
    """Fixed-width unicode copy of a string array read from Zarr (numpy StringDType)."""
    return np.array(values.tolist(), dtype=str)


def _as_json(config: Any) -> Any:
    """A JSON-normalised copy of a configuration (pydantic model or mapping)."""
    if hasattr(config, "model_dump"):
        config = config.model_dump(mode="json")
    return json.loads(json.dumps(config, sort_keys=True))


# --------------------------------------------------------------------------- creation


def create_store(
    path: PathLike,
    cqt: CQTConfig,
    clips: Sequence[tuple[str, str, str]],
    chunk_clips: int,
    *,
    overwrite: bool = False,
) -> zarr.Group:
    """Create an empty store for ``clips``: the frames array and a pending clip table.

    Parameters
    ----------
    path : str or path-like
        Directory of the store (conventionally ``<name>.zarr``).
    cqt : CQTConfig
        The CQT configuration; fixes the frames per clip F and the bins.
    clips : sequence of (clip_id, path, label[, group])
        One entry per clip, in the order of the store (e.g. `sae.datasets.Clip`).
        ``clip_id`` must be unique; a missing or empty group is the clip id.
    chunk_clips : int
        Clips per chunk of ``frames`` (and per ingestion batch), >= 1.
    overwrite : bool
        Replace an existing store at ``path``; otherwise an existing path is an error.

    Returns
    -------
    zarr.Group
        The root group, opened for writing.
    """
    from sae.audio import frames_per_clip  # sae.audio imports this module lazily too

    if not isinstance(chunk_clips, int | np.integer) or chunk_clips < 1:
        raise ValueError(f"chunk_clips must be an integer >= 1, got {chunk_clips!r}")
    clips = [tuple(map(str, c)) for c in clips]
    if not clips:
        raise ValueError("clips must hold at least one (clip_id, path, label) entry, got an empty list")
    if any(len(c) not in (3, 4) for c in clips):
        raise ValueError("clips must be (clip_id, path, label) or (clip_id, path, label, group) tuples")
    ids = [c[0] for c in clips]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"clip ids must be unique; duplicated: {dup}")
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"store path {str(path)!r} already exists; pass overwrite=True to replace it")

    n_clips = len(clips)
    n_frames = frames_per_clip(cqt)
    chunk_clips = int(min(chunk_clips, n_clips))
    labels = sorted({c[2] for c in clips})
    label_index = {name: i for i, name in enumerate(labels)}

    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    create_array(
        group, "frames", shape=(n_clips * n_frames, cqt.n_bins), chunks=(chunk_clips * n_frames, cqt.n_bins),
        dtype="float32", dimension_names=("frame", "bin"),
    )
    table = group.create_group("clips")
    columns: dict[str, np.ndarray] = {
        "clip_id": np.array(ids, dtype=str),
        "path": np.array([c[1] for c in clips], dtype=str),
        "label": np.array([c[2] for c in clips], dtype=str),
        "label_index": np.array([label_index[c[2]] for c in clips], dtype=np.int32),
        "first_frame": np.arange(n_clips, dtype=np.int64) * n_frames,
        "n_frames": np.zeros(n_clips, dtype=np.int32),
        "status": np.full(n_clips, "pending"),
        "error_kind": np.full(n_clips, ""),
        "error": np.full(n_clips, ""),
        "checksum": np.zeros(n_clips, dtype=np.int64),
        "group": np.array(clip_groups(clips), dtype=str),
    }
    for name in CLIP_COLUMNS:
        values = columns[name]
        create_array(table, name, shape=(n_clips,), dtype=str if name in _STRING_COLUMNS else values.dtype,
                     dimension_names=("clip",), data=values)
    group.attrs.update(
        {
            "sae_layout": LAYOUT_VERSION,
            "sae_version": __version__,
            "created": _now(),
            "cqt": cqt.model_dump(mode="json"),
            "labels": labels,
            "frames_per_clip": int(n_frames),
            "n_clips": int(n_clips),
            "chunk_clips": int(chunk_clips),
        }
    )
    logger.info(
        "created store %s: %d clips, %d labels, %d frames per clip, %d clips per chunk",
        path, n_clips, len(labels), n_frames, chunk_clips,
    )
    return group


def open_store(path: PathLike, mode: Literal["r", "r+", "a"] = "r") -> zarr.Group:
    """Open an existing store, checking that it is a sae store of this layout version.

    Parameters
    ----------
    path : str or path-like
        Directory of the store.
    mode : {"r", "r+", "a"}
        "r" read only; "r+" and "a" read and write (the store must exist either way).

    Raises
    ------
    FileNotFoundError
        Nothing at ``path``.
    StoreError
        ``path`` is not a sae store, or its layout version differs from `LAYOUT_VERSION`.
    """
    if mode not in ("r", "r+", "a"):
        raise ValueError(f"mode must be one of 'r', 'r+', 'a', got {mode!r}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no sae store at {str(path)!r}: the path does not exist")
    if not path.is_dir():
        raise StoreError(f"{str(path)!r} is not a sae store: it is a file, not a directory")
    try:
        group = zarr.open_group(str(path), mode="r" if mode == "r" else "r+", use_consolidated=False)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError) as exc:
        raise StoreError(f"{str(path)!r} is not a sae store: not a Zarr group ({exc})") from exc
    layout = group.attrs.get("sae_layout")
    if layout is None:
        raise StoreError(f"{str(path)!r} is not a sae store: attribute 'sae_layout' is missing")
    if layout != LAYOUT_VERSION:
        raise StoreError(
            f"store {str(path)!r} has layout version {layout}; this sae ({__version__}) reads "
            f"layout version {LAYOUT_VERSION} only: re-create the store (e.g. sae run --force)"
        )
    return group


def check_location(path: PathLike, *, exists: bool | None = None, writable: bool = True) -> Path:
    """Check, before any work, that ``path`` can hold a store as asked; returns it resolved.

    ``exists`` True: there must be a sae store (directory) at ``path``; False:
    there must be nothing there; None: either.  ``writable``: the store (or,
    when it does not exist yet, its parent folder) must be writable by this process.

    Raises
    ------
    StoreError
        With a message saying what is wrong: a file where a store should be,
        a missing store, a read-only store or parent folder.
    """
    path = Path(path).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise StoreError(f"store {str(path)!r} is a file, not a store directory: choose another --store")
    if exists is True and not path.exists():
        raise StoreError(f"no store at {str(path)!r}: run `sae ingest` (or `sae run`) to create it")
    if exists is False and path.exists():
        raise StoreError(f"store {str(path)!r} already exists")
    if writable:
        target = path if path.exists() else path.parent
        if not target.exists():
            raise StoreError(f"the folder {str(target)!r} of store {str(path)!r} does not exist")
        if not os.access(target, os.W_OK | os.X_OK):
            what = "store" if target == path else "folder"
            raise StoreError(f"the {what} {str(target)!r} is not writable by this process: cannot write store "
                             f"{str(path)!r}")
        if path.exists():
            readonly = [str(p) for p in (path / "zarr.json", path / "clips") if p.exists() and not os.access(p, os.W_OK)]
            if readonly:
                raise StoreError(f"store {str(path)!r} is read-only ({readonly[0]} is not writable)")
    return path


def _group(group_or_path: zarr.Group | PathLike, mode: Literal["r", "r+", "a"] = "r") -> zarr.Group:
    if isinstance(group_or_path, zarr.Group):
        return group_or_path
    return open_store(group_or_path, mode=mode)


def store_path(group: zarr.Group) -> str:
    """The local directory of a store opened with `create_store` or `open_store`."""
    root = getattr(group.store, "root", None)
    if root is None:
        raise ValueError(f"the store of this group is not a local directory: {group.store!r}")
    return str(Path(root) / group.path) if group.path else str(root)


def store_cqt(group: zarr.Group) -> CQTConfig:
    """The CQT configuration the store's frames were computed with."""
    return CQTConfig.model_validate(group.attrs["cqt"])


def store_labels(group: zarr.Group) -> list[str]:
    """Sorted label names; ``label_index`` in the clip table indexes this list."""
    return list(group.attrs["labels"])


def store_frames_per_clip(group: zarr.Group) -> int:
    """F, the number of frames (rows of ``frames``) of every clip."""
    return int(group.attrs["frames_per_clip"])


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


def clip_groups(clips: Sequence[Sequence[str]]) -> list[str]:
    """The group of every clip of a clip list: its fourth entry if given and not empty, else its clip id.

    >>> clip_groups([("a/x", "x.wav", "a"), ("a/y", "y.wav", "a", "album 1"), ("a/z", "z.wav", "a", "")])
    ['a/x', 'album 1', 'a/z']
    """
    return [str(c[3]) if len(c) > 3 and str(c[3]) else str(c[0]) for c in clips]


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
        out[name] = _strings(values) if name in _STRING_COLUMNS else np.asarray(values)
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


# --------------------------------------------------------------------------- stage groups


def _check_name(what: str, value: str) -> None:
    if not isinstance(value, str) or not _NAME_PATTERN.match(value) or value in ("frames", "clips"):
        raise ValueError(
            f"{what} must be a non-empty name of letters, digits, '_', '-', '.' other than "
            f"'frames' and 'clips', got {value!r}"
        )


def stage_group(
    group_or_path: zarr.Group | PathLike,
    stage: str,
    key: str,
    *,
    config: Mapping[str, Any] | Any = None,
    mode: Literal["r", "a", "w"] = "a",
) -> zarr.Group:
    """The group ``<stage>/<key>`` of a store, for the results of a later stage.

    Parameters
    ----------
    group_or_path : zarr.Group or path
        The store (a path is opened with `open_store`).
    stage, key : str
        E.g. ``"graph"`` and a configuration fingerprint.
    config : mapping or pydantic model
        The configuration of the stage, recorded as attribute ``config``.
    mode : {"r", "a", "w"}
        "r": open an existing group read only (error if absent).
        "a": open if present (its recorded ``config`` must equal ``config``), else create.
        "w": create, deleting any existing group of that name.

    Returns
    -------
    zarr.Group
        Attributes ``config``, ``complete`` (False until `mark_complete`), ``created``.
    """
    _check_name("stage", stage)
    _check_name("key", key)
    if mode not in ("r", "a", "w"):
        raise ValueError(f"mode must be one of 'r', 'a', 'w', got {mode!r}")
    root = _group(group_or_path, mode="r" if mode == "r" else "r+")
    name = f"{stage}/{key}"
    exists = name in root
    if mode == "r":
        if not exists:
            raise KeyError(f"store has no group {name!r}")
        return root[name]
    wanted = None if config is None else _as_json(config)
    if exists and mode == "a":
        found = root[name]
        if wanted is not None and _as_json(found.attrs.get("config")) != wanted:
            raise StoreError(
                f"group {name!r} exists with config {found.attrs.get('config')!r}, "
                f"which differs from the config given {wanted!r}; use mode='w' to replace it"
            )
        return found
    if exists:
        del root[name]
    parent = root.require_group(stage)
    created = parent.create_group(key)
    created.attrs.update({"config": wanted, "complete": False, "created": _now()})
    return created


def json_safe(value: Any) -> Any:
    """A copy of ``value`` fit for JSON attributes: non-finite floats (NaN, +-inf) as None, in nested
    mappings and sequences (tuples become lists).

    >>> json_safe({"a": float("nan"), "b": [1.0, float("inf")], "c": "x"})
    {'a': None, 'b': [1.0, None], 'c': 'x'}
    """
    if isinstance(value, Mapping):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def _arrays_of(group: zarr.Group) -> dict[str, zarr.Array]:
    return {name: node for name, node in group.members(max_depth=None) if isinstance(node, zarr.Array)}


def mark_complete(
    group: zarr.Group,
    *,
    inputs: Iterable[zarr.Group] = (),
    arrays: Iterable[str] | None = None,
    version: str | None = None,
) -> None:
    """Flag a stage group as complete; call last, after every array is written.

    Records the manifest (``arrays``: the shape of each array, default every
    array in the group, or only those named, as paths relative to it), the
    versions of the stage groups it was computed from (``inputs``), and its
    own ``version``: a digest of its content when the caller has one (then a
    recomputation that gives the same content keeps the groups computed from
    it current), else a random id.
    """
    found = _arrays_of(group)
    names = sorted(found) if arrays is None else list(arrays)
    missing = [name for name in names if name not in found]
    if missing:
        raise StoreError(f"cannot mark {group.path!r} complete: it has no array {missing[0]!r}")
    manifest = {name: [int(n) for n in found[name].shape] for name in names}
    recorded_inputs = {}
    for source in inputs:
        source_version = source.attrs.get("version")
        if source.attrs.get("complete") is not True or source_version is None:
            raise StoreError(f"cannot mark {group.path!r} complete: its input {source.path!r} is not complete")
        recorded_inputs[source.path] = source_version
    group.attrs.update({"arrays": manifest, "inputs": recorded_inputs, "version": version or uuid.uuid4().hex[:16],
                        "complete": True, "completed": _now()})


def stage_problems(group: zarr.Group | PathLike, stage: str, key: str) -> list[str]:
    """Why ``<stage>/<key>`` is not a usable complete result: [] when it is.

    Checks, without reading any chunk's data: the group exists and is marked
    complete; every array of its manifest is there with its recorded shape
    and all its chunks on disk; every input it was computed from is still
    there, complete, at the version it recorded (so results never outlive the
    data they came from).
    """
    root = _group(group)
    name = f"{stage}/{key}"
    if name not in root:
        return [f"{name} does not exist"]
    node = root[name]
    if node.attrs.get("complete") is not True:
        return [f"{name} is not complete (a run was interrupted, or is running)"]
    problems = []
    for path, shape in (node.attrs.get("arrays") or {}).items():
        try:
            array = node[path]
        except KeyError:
            problems.append(f"{name}: array {path!r} is missing")
            continue
        if list(array.shape) != list(shape):
            problems.append(f"{name}: array {path!r} has shape {tuple(array.shape)}, recorded {tuple(shape)}")
        elif array.nchunks_initialized != array.nchunks:
            problems.append(f"{name}: array {path!r} has {array.nchunks - array.nchunks_initialized} of its "
                            f"{array.nchunks} chunks missing")
    for path, version in (node.attrs.get("inputs") or {}).items():
        if path not in root:
            problems.append(f"{name}: its input {path} is gone")
        elif root[path].attrs.get("complete") is not True or root[path].attrs.get("version") != version:
            problems.append(f"{name}: its input {path} changed since it was computed")
    return problems


def is_complete(group: zarr.Group | PathLike, stage: str, key: str) -> bool:
    """Whether ``<stage>/<key>`` is a complete, intact, current result (`stage_problems` finds nothing)."""
    return not stage_problems(group, stage, key)


def stages(group: zarr.Group | PathLike) -> dict[str, list[str]]:
    """The stage groups of a store: stage name -> keys (sorted)."""
    root = _group(group)
    out = {}
    for stage, node in sorted(root.groups()):
        if stage != "clips":
            out[stage] = sorted(key for key, _ in node.groups())
    return out


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
        "locked": _lock_state(path),
        "intact": not damaged and not broken,
    }


def _lock_state(store: PathLike) -> str:
    """Who holds the store's lock now ("" when nobody: the lock is free)."""
    from filelock import FileLock, Timeout

    path = lock_path(store)
    if not path.exists() or str(path) in _LOCKS and _LOCKS[str(path)].is_locked:
        return ""
    probe = FileLock(str(path), thread_local=False)
    try:
        probe.acquire(timeout=0)
    except Timeout:
        return lock_holder(store) or "another process"
    probe.release()
    return ""


# --------------------------------------------------------------------------- the lock


def lock_path(store: PathLike) -> Path:
    """The lock file of a store: ``<store>.lock`` beside it (so it can be taken before the store exists)."""
    store = Path(store).expanduser().resolve()
    return store.with_name(store.name + ".lock")


def lock_holder(store: PathLike) -> str:
    """Who holds (or last held) the lock of a store, as recorded in its lock file ("" if unknown)."""
    try:
        info = json.loads(lock_path(store).read_text() or "{}")
    except (OSError, ValueError):
        return ""
    return ", ".join(f"{k} {info[k]}" for k in ("pid", "host", "since", "command") if k in info)


def _write_holder(fd: int) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(), "since": _now(), "command": " ".join(sys.argv)[:200]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)


_LOCKS: dict[str, Any] = {}


@contextmanager
def store_lock(store: PathLike, *, wait: float | None = None, log_every: float = 30.0) -> Iterator[None]:
    """Hold the store's lock: the calling process is the one writer of ``store`` until the block ends.

    The lock is re-entrant within a process (a pipeline holds it around its
    stages, which take it again).  Another process waits, logging who holds
    it every ``log_every`` seconds, at most ``wait`` seconds (None: as long as
    it takes), then raises `StoreLocked`.  It is an operating-system lock on
    ``<store>.lock`` (`filelock`): it is released when its process ends, even
    when killed, and works on local filesystems (not across the hosts of a
    network filesystem).
    """
    from filelock import FileLock, Timeout

    path = str(lock_path(store))
    lock = _LOCKS.get(path)
    if lock is None:
        lock = _LOCKS[path] = FileLock(path, thread_local=False, on_acquired=_write_holder)
    deadline = None if wait is None else time.monotonic() + wait
    step = 0.0  # the first attempt does not wait: a busy store is reported at once
    while True:
        try:
            lock.acquire(timeout=step)
            break
        except Timeout:
            holder = lock_holder(store) or "unknown process"
            if deadline is not None and time.monotonic() >= deadline:
                raise StoreLocked(
                    f"store {str(store)!r} is in use by another sae run ({holder}); "
                    f"{f'waited {wait:.0f} s; ' if wait else ''}try again when it ends"
                ) from None
            logger.warning("store %s is in use by another sae run (%s): waiting for it to end%s", store, holder,
                           " (Ctrl-C to give up)" if step == 0 else "")
            step = log_every if deadline is None else max(0.0, min(log_every, deadline - time.monotonic()))
    try:
        yield
    finally:
        lock.release()


# --------------------------------------------------------------------------- sparse matrices


def write_sparse(
    group: zarr.Group,
    name: str,
    matrix: sp.sparray | sp.spmatrix,
    *,
    chunk_entries: int = 1 << 20,
    chunk_rows: int = 1 << 16,
) -> zarr.Group:
    """Store a sparse matrix as CSR: sub-group ``name`` with three 1-D arrays.

    ``indptr`` int64 (n_rows + 1), ``indices`` int32 (nnz), ``data`` float32 (nnz),
    attributes ``shape``, ``nnz`` and ``format`` ("csr").  Row i holds
    ``indices[indptr[i]:indptr[i+1]]``, so `read_sparse` can read a range of
    rows without reading the rest.  Indices are sorted within rows.
    """
    _check_name("name", name)
    csr = sp.csr_array(matrix, copy=True)
    csr.sum_duplicates()
    if csr.shape[1] > np.iinfo(np.int32).max:
        raise ValueError(f"matrix has {csr.shape[1]} columns; at most {np.iinfo(np.int32).max} fit int32 indices")
    if name in group:
        del group[name]
    sub = group.create_group(name)
    for array_name, values, chunk in (
        ("indptr", csr.indptr.astype(np.int64), chunk_rows + 1),
        ("indices", csr.indices.astype(np.int32), chunk_entries),
        ("data", csr.data.astype(np.float32), chunk_entries),
    ):
        create_array(sub, array_name, shape=values.shape, chunks=(max(1, min(chunk, values.size)),),
                     dtype=values.dtype, data=values)
    sub.attrs.update({"format": "csr", "shape": [int(s) for s in csr.shape], "nnz": int(csr.nnz)})
    return sub


def read_sparse(group: zarr.Group, name: str, rows: slice | None = None) -> sp.csr_array:
    """Read a matrix written by `write_sparse`, optionally only the rows ``rows`` (step 1).

    Returns
    -------
    scipy.sparse.csr_array
        float32, of shape (n_rows_selected, n_cols).
    """
    if name not in group:
        raise KeyError(f"group {group.path!r} has no sparse matrix {name!r}")
    sub = group[name]
    if sub.attrs.get("format") != "csr":
        raise ValueError(f"{name!r} is not a CSR matrix written by write_sparse")
    n_rows, n_cols = sub.attrs["shape"]
    start, stop, step = (rows or slice(None)).indices(n_rows)
    if step != 1:
        raise ValueError(f"rows must be a slice with step 1, got step {step}")
    stop = max(start, stop)
    indptr = sub["indptr"][start : stop + 1]
    lo, hi = int(indptr[0]), int(indptr[-1])
    indices = sub["indices"][lo:hi] if hi > lo else np.zeros(0, np.int32)
    data = sub["data"][lo:hi] if hi > lo else np.zeros(0, np.float32)
    return sp.csr_array((data, indices, indptr - lo), shape=(stop - start, n_cols))


def pending_batches(group: zarr.Group) -> list[tuple[int, list[int]]]:
    """The ingestion work left: ``(chunk_index, clip indices not "ok")`` for every chunk that has some."""
    status = _strings(group["clips"]["status"][:])
    batches = []
    for chunk_index in range(n_chunks(group)):
        todo = [i for i in chunk_clips_range(group, chunk_index) if status[i] != "ok"]
        if todo:
            batches.append((chunk_index, todo))
    return batches
