"""A store's layout: its creation and opening, its arrays' settings, its version and location.

Every array of a store is created by `create_array` (see Integrity in `sae.store`);
`create_store` writes the ``frames`` array and the clip table of a new store,
`open_store` checks the layout version of an existing one, `check_location`
checks, before any work, that a path can hold a store as asked.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr
import zarr.codecs

from sae import __version__
from sae.config import CQTConfig

logger = logging.getLogger("sae.store")

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

STRING_COLUMNS = ("clip_id", "path", "label", "status", "error_kind", "error", "group")
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

"""Columns of the clip table stored as strings."""



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


def _check_name(what: str, value: str) -> None:
    if not isinstance(value, str) or not _NAME_PATTERN.match(value) or value in ("frames", "clips"):
        raise ValueError(
            f"{what} must be a non-empty name of letters, digits, '_', '-', '.' other than "
            f"'frames' and 'clips', got {value!r}"
        )


# --------------------------------------------------------------------------- creation


def clip_groups(clips: Sequence[Sequence[str]]) -> list[str]:
    """The group of every clip of a clip list: its fourth entry if given and not empty, else its clip id.

    >>> clip_groups([("a/x", "x.wav", "a"), ("a/y", "y.wav", "a", "album 1"), ("a/z", "z.wav", "a", "")])
    ['a/x', 'album 1', 'a/z']
    """
    return [str(c[3]) if len(c) > 3 and str(c[3]) else str(c[0]) for c in clips]


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
        create_array(table, name, shape=(n_clips,), dtype=str if name in STRING_COLUMNS else values.dtype,
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
