"""The model input: selected frames, scaled per feature, optionally noisy; computed once, stored.

The graph, the model and the baseline classifier all read the one array this
stage writes, so they see exactly the same (possibly noisy) frames.

For a `sae.config.PreprocessConfig` the stage

1. selects rows of the store's ``frames``: the first ``frames_per_clip``
   frames of every ok clip whose label is in ``labels``, clip after clip in
   clip order;
2. transforms every clip on its own (`clip_transform`, what a new clip goes
   through too): compression of the magnitudes, local contrast
   normalisation across frequency, temporal context (each row becomes the
   frame and the ``context - 1`` frames before it, concatenated);
3. scales every feature (column) over the selected frames (all samples by
   features, see ``sae``)::

       X = (F - offset) / scale                       F: (n_rows, n_bins)

   ``minmax`` (the thesis): offset = min_j F_jk, scale = max_j F_jk - min_j F_jk,
   so X lies in [0, 1]; ``percentile``: the same between the p-th and
   (100-p)-th percentiles (`scaling_statistics`); ``standard``: offset = mean,
   scale = std (ddof 0); ``none``: offset 0, scale 1.  A constant feature gets
   scale 1 (X = 0 there);
4. adds i.i.d. Gaussian noise ``noise_std * N(0, 1)`` after scaling.  The
   noise of row r is row ``r mod NOISE_BLOCK_ROWS`` of the
   (NOISE_BLOCK_ROWS, n_bins) standard normal matrix drawn by
   ``numpy.random.default_rng([noise_seed, r // NOISE_BLOCK_ROWS])``
   (float64): it depends on the seed and the row only, never on how the work is
   chunked;
5. writes, in the store's stage group ``preprocess/<config fingerprint>``:
   ``X`` float32 (n_rows, n_bins), ``clip_index`` int64 (n_rows,) (row of the
   clip table), ``frame_index`` int32 (n_rows,) (frame within its clip),
   ``offset`` and ``scale`` float64 (n_bins,); attributes ``n_rows``,
   ``n_bins``, ``n_clips`` (clips kept), ``noise_block_rows``, ``formula``
   (and ``config``, ``complete`` as every stage group).

Statistics are dask reductions over chunks, so the frames never need to fit
in one worker's memory; X is written chunk by chunk with chunk-aligned
regions (no locks needed).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import dask
import dask.array as da
import numpy as np
import zarr

from sae.config import PreprocessConfig
from sae.progress import Interrupt, go_on
from sae.store.keys import PREPROCESS, preprocess_key

logger = logging.getLogger(__name__)

NOISE_BLOCK_ROWS = 8192
"""Rows per noise block: the fixed unit from which the noise of a row is drawn."""

SCALINGS = ("minmax", "percentile", "standard", "none")
"""Per-feature scalings (`sae.config.PreprocessConfig.scaling`)."""

PERCENTILE_SAMPLE_ROWS = 100_000
"""At most this many rows (every k-th, k fixed by the row count) estimate the percentiles of "percentile"."""


# --------------------------------------------------------------------------- maths


def scaling_statistics(
    frames: np.ndarray | da.Array,
    scaling: Literal["minmax", "percentile", "standard", "none"] = "minmax",
    *,
    percentile: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature ``offset`` and ``scale`` (n_features,) float64 of frames (n_rows, n_features).

    ``minmax``: (min, max - min); ``percentile``: (q_p, q_{100-p} - q_p), the
    p-th and (100-p)-th percentiles of every feature over every k-th row,
    ``k = ceil(n_rows / PERCENTILE_SAMPLE_ROWS)`` (exact up to that many rows),
    so that a few extreme frames move neither; ``standard``: (mean, std with
    ddof 0); ``none``: (0, 1).  A zero scale becomes 1.  Dask input is reduced
    chunk by chunk.  Non-finite frames (a chunk missing from the store reads
    as NaN) are an error, never a statistic.

    >>> offset, scale = scaling_statistics(np.array([[1.0, 5.0], [3.0, 5.0]]))
    >>> offset.tolist(), scale.tolist()
    ([1.0, 5.0], [2.0, 1.0])
    >>> frames = np.vstack([np.arange(100.0)[:, None], [[1e30]]])
    >>> [round(float(v), 2) for v in np.concatenate(scaling_statistics(frames, "percentile", percentile=1.0))]
    [1.0, 98.0]
    """
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
    if frames.ndim != 2:
        raise ValueError(f"frames must be a 2-D array (n_rows, n_features), got shape {frames.shape}")
    if not 0 < percentile < 50:
        raise ValueError(f"percentile must be in (0, 50), got {percentile!r}")
    n_features = frames.shape[1]
    if scaling == "none":
        return np.zeros(n_features), np.ones(n_features)
    if frames.shape[0] == 0:
        raise ValueError("frames has no rows: cannot compute scaling statistics")
    lazy = frames if isinstance(frames, da.Array) else da.from_array(np.asarray(frames))
    lazy = lazy.astype(np.float64)
    if scaling == "percentile":
        step = -(-frames.shape[0] // PERCENTILE_SAMPLE_ROWS)
        sample = np.asarray(lazy[::step].compute())
        if not np.isfinite(sample).all():
            raise ValueError("frames hold non-finite values: cannot compute scaling statistics")
        low, high = np.percentile(sample, [percentile, 100.0 - percentile], axis=0)
        offset, scale = low, high - low
    elif scaling == "minmax":
        low, high = dask.compute(lazy.min(axis=0), lazy.max(axis=0))
        offset, scale = np.asarray(low), np.asarray(high) - np.asarray(low)
    else:
        mean, std = dask.compute(lazy.mean(axis=0), lazy.std(axis=0))
        offset, scale = np.asarray(mean), np.asarray(std)
    if not (np.isfinite(offset).all() and np.isfinite(scale).all()):
        raise ValueError("frames hold non-finite values: cannot compute scaling statistics")
    scale = np.where(scale > 0, scale, 1.0)
    return offset.astype(np.float64), scale.astype(np.float64)


def noise_rows(
    start: int, stop: int, n_features: int, noise_seed: int, *, noise_block_rows: int = NOISE_BLOCK_ROWS
) -> np.ndarray:
    """Standard normal noise of rows [start, stop), (stop - start, n_features) float64.

    Row r is row ``r % noise_block_rows`` of
    ``default_rng([noise_seed, r // noise_block_rows]).standard_normal((noise_block_rows, n_features))``.

    >>> a = noise_rows(0, 10, 3, 7, noise_block_rows=4)
    >>> bool(np.array_equal(a[5:9], noise_rows(5, 9, 3, 7, noise_block_rows=4)))
    True
    """
    if noise_block_rows < 1:
        raise ValueError(f"noise_block_rows must be >= 1, got {noise_block_rows}")
    if stop <= start:
        return np.zeros((0, n_features))
    first, last = start // noise_block_rows, (stop - 1) // noise_block_rows
    blocks = [
        np.random.default_rng([noise_seed, b]).standard_normal((noise_block_rows, n_features))
        for b in range(first, last + 1)
    ]
    base = first * noise_block_rows
    return np.concatenate(blocks)[start - base : stop - base]


def _scale_block(
    block: np.ndarray,
    offset: np.ndarray,
    scale: np.ndarray,
    noise_std: float,
    noise_seed: int,
    noise_block_rows: int,
    block_info: dict | None = None,
) -> np.ndarray:
    out = (np.asarray(block, dtype=np.float64) - offset) / scale
    if noise_std > 0:
        start, stop = block_info[0]["array-location"][0]
        out += noise_std * noise_rows(start, stop, out.shape[1], noise_seed, noise_block_rows=noise_block_rows)
    return out.astype(np.float32)


def scale_and_perturb(
    frames: np.ndarray | da.Array,
    offset: np.ndarray,
    scale: np.ndarray,
    *,
    noise_std: float = 0.0,
    noise_seed: int = 0,
    noise_block_rows: int = NOISE_BLOCK_ROWS,
) -> da.Array:
    """``X = (frames - offset) / scale + noise_std * noise_rows(...)``, lazily, float32.

    ``frames`` (n_rows, n_features), ``offset`` and ``scale`` (n_features,).
    The result keeps the row chunks of ``frames`` and the same values whatever
    they are (see `noise_rows`).
    """
    if not noise_std >= 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std!r}")
    lazy = frames if isinstance(frames, da.Array) else da.from_array(np.asarray(frames))
    lazy = lazy.rechunk({1: -1})
    return lazy.map_blocks(
        _scale_block,
        np.asarray(offset, dtype=np.float64),
        np.asarray(scale, dtype=np.float64),
        float(noise_std),
        int(noise_seed),
        int(noise_block_rows),
        dtype=np.float32,
        meta=np.empty((0, 0), dtype=np.float32),
    )


def preprocess_frames(
    frames: np.ndarray | da.Array, config: PreprocessConfig, *, noise_block_rows: int = NOISE_BLOCK_ROWS
) -> tuple[da.Array, np.ndarray, np.ndarray]:
    """Scale (statistics over ``frames``) then perturb already selected frames.

    Returns the lazy X (n_rows, n_features) float32 and ``offset``, ``scale``.
    """
    offset, scale = scaling_statistics(frames, config.scaling, percentile=config.percentile)
    X = scale_and_perturb(
        frames, offset, scale, noise_std=config.noise_std, noise_seed=config.noise_seed,
        noise_block_rows=noise_block_rows,
    )
    return X, offset, scale


def compress(frames: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """Compression of CQT magnitudes (float64, any shape): ``log(1 + log_gain x)``, ``x ** power`` or ``x``.

    >>> compress(np.array([0.0, 0.9, 9.9]), PreprocessConfig(compression="log", log_gain=10.0)).round(6).tolist()
    [0.0, 2.302585, 4.60517]
    """
    frames = np.asarray(frames, dtype=np.float64)
    if config.compression == "log":
        return np.log1p(config.log_gain * np.maximum(frames, 0.0))
    if config.compression == "power":
        return np.maximum(frames, 0.0) ** config.power
    return frames


def local_contrast(frames: np.ndarray, width: float) -> np.ndarray:
    """Local contrast normalisation of every frame (row) of ``frames`` (n_frames, n_bins) across frequency.

    With ``g`` the Gaussian window of std ``width`` bins (truncated at 4 std,
    edges mirrored: `scipy.ndimage.gaussian_filter1d`, mode "reflect")::

        v = x - g * x                    (subtract the local mean)
        s = sqrt(g * v^2)                (the local std)
        y = v / max(s, mean(s))          (divide, floored by the frame's mean local std)

    so every frame has zero local mean and unit local contrast where it has
    contrast at all, and a nearly flat frame is not blown up.
    """
    from scipy.ndimage import gaussian_filter1d

    frames = np.asarray(frames, dtype=np.float64)
    centred = frames - gaussian_filter1d(frames, width, axis=1, mode="reflect")
    spread = np.sqrt(gaussian_filter1d(centred**2, width, axis=1, mode="reflect"))
    floor = spread.mean(axis=1, keepdims=True)
    return centred / np.maximum(spread, np.where(floor > 0, floor, 1.0))


def stack_context(frames: np.ndarray, context: int, stride: int = 1) -> np.ndarray:
    """Temporal context: row t of ``frames`` (n_frames, d) becomes ``[x_t, x_{t-s}, ..., x_{t-(k-1)s}]`` (k d,).

    ``k = context``, ``s = stride``; frames before the first are the first
    frame repeated (the clip's edge), so a clip keeps its number of rows.

    >>> stack_context(np.arange(4.0)[:, None], context=3, stride=1).tolist()
    [[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [2.0, 1.0, 0.0], [3.0, 2.0, 1.0]]
    """
    if context < 1 or stride < 1:
        raise ValueError(f"context and stride must be >= 1, got {context} and {stride}")
    frames = np.asarray(frames)
    if context == 1:
        return frames
    n_frames = frames.shape[0]
    lags = np.arange(context) * stride
    rows = np.maximum(np.arange(n_frames)[:, None] - lags[None, :], 0)  # (n_frames, context)
    return frames[rows].reshape(n_frames, -1)


def clip_features(config: PreprocessConfig, n_bins: int) -> int:
    """Columns of X for frames of ``n_bins`` bins: ``n_bins * context``."""
    return n_bins * config.context


def clip_transform(frames: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """The per-clip part of the stage: what one clip's CQT frames become before scaling.

    ``frames`` (n_frames, n_bins) are the frames of one clip as ingested; the
    result (n_kept, n_bins * context) float64 is what the stage scales (with the
    dataset's ``offset`` and ``scale``) into that clip's rows of X: the first
    ``frames_per_clip`` frames, compressed (`compress`), contrast-normalised
    (`local_contrast`) and with their temporal context (`stack_context`).  A
    new clip (`sae.load_model`) goes through exactly this function, then
    ``(F - offset) / scale``, so that it meets the model as the training clips did.
    """
    frames = np.asarray(frames, dtype=np.float64)
    if frames.ndim != 2:
        raise ValueError(f"frames must be a 2-D array (n_frames, n_bins), got shape {frames.shape}")
    if config.frames_per_clip is not None:
        if frames.shape[0] < config.frames_per_clip:
            raise ValueError(f"the clip has {frames.shape[0]} frames, fewer than frames_per_clip={config.frames_per_clip}")
        frames = frames[: config.frames_per_clip]
    frames = compress(frames, config)
    if config.contrast == "local":
        frames = local_contrast(frames, config.contrast_width)
    return stack_context(frames, config.context, config.context_stride)


def _transform_block(block: np.ndarray, config: PreprocessConfig, frames_per_clip: int) -> np.ndarray:
    """`clip_transform` of every clip of a block of whole clips (k * F, n_bins)."""
    whole = config.model_copy(update={"frames_per_clip": None})
    clips = np.asarray(block).reshape(-1, frames_per_clip, block.shape[1])
    return np.concatenate([clip_transform(clip, whole) for clip in clips]) if clips.size else np.zeros(
        (0, clip_features(config, block.shape[1]))
    )


def transform_clips(frames: da.Array, config: PreprocessConfig, frames_per_clip: int) -> da.Array:
    """`clip_transform` of every clip of selected frames (n_clips * F, n_bins), lazily, float64.

    ``frames`` holds whole clips of ``frames_per_clip`` rows each, clip after
    clip; the result keeps one row per frame, ``n_bins * context`` columns.
    Chunks are rounded to whole clips.
    """
    if config.compression == "none" and config.contrast == "none" and config.context == 1:
        return frames.astype(np.float64)
    n_rows, n_bins = frames.shape
    if n_rows % frames_per_clip:
        raise ValueError(f"frames hold {n_rows} rows, not whole clips of {frames_per_clip}")
    clips_per_chunk = max(1, round(frames.chunks[0][0] / frames_per_clip))
    rows = clips_per_chunk * frames_per_clip
    aligned = frames.rechunk((rows, -1))
    return aligned.map_blocks(
        _transform_block, config, frames_per_clip, dtype=np.float64,
        chunks=(aligned.chunks[0], (clip_features(config, n_bins),)), meta=np.empty((0, 0)),
    )


# --------------------------------------------------------------------------- the stage in a store


def select_rows(group: zarr.Group, config: PreprocessConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of ``frames`` that a configuration keeps, with their clip and frame indices.

    Returns
    -------
    rows : (n_rows,) int64, row indices into the store's ``frames``
    clip_index : (n_rows,) int64, row of the clip table of each row
    frame_index : (n_rows,) int32, frame within its clip
    """
    from sae import store

    clips = None
    if config.labels is not None:
        known = store.store_labels(group)
        unknown = sorted(set(config.labels) - set(known))
        if unknown:
            raise ValueError(f"labels must be among the store's labels {known}, got unknown labels {unknown}")
        table = store.clip_table(group)
        clips = np.flatnonzero(np.isin(table["label"], list(config.labels)))
    n_frames = store.store_frames_per_clip(group)
    if config.frames_per_clip is not None and config.frames_per_clip > n_frames:
        raise ValueError(
            f"frames_per_clip must be <= {n_frames} (the store's frames per clip), got {config.frames_per_clip}"
        )
    rows = store.frame_rows(group, clips=clips, frames_per_clip=config.frames_per_clip)
    return rows, rows // n_frames, (rows % n_frames).astype(np.int32)


def _version(root: zarr.Group, key: str, clip_index: np.ndarray) -> str:
    """The version of ``preprocess/<key>``: a digest of the frames it reads.

    A recomputation from the same frames keeps every stage computed from it
    current; frames re-ingested differently make them stale.
    """
    from sae import store

    return f"{key}-{store.frames_digest(root, np.unique(clip_index))}"


def preprocess_current(store_path: str | Path | zarr.Group, config: PreprocessConfig) -> bool:
    """Whether ``preprocess/<key>`` is complete and computed from the frames the store holds now."""
    from sae import store

    root = store.open_store(store_path) if not isinstance(store_path, zarr.Group) else store_path
    key = preprocess_key(config)
    if not store.is_complete(root, PREPROCESS, key):
        return False
    _, clip_index, _ = select_rows(root, config)
    return store.stage_group(root, PREPROCESS, key, mode="r").attrs.get("version") == _version(root, key, clip_index)


def run_preprocess(
    store_path: str | Path,
    config: PreprocessConfig,
    *,
    chunk_rows: int = 32768,
    overwrite: bool = False,
    interrupt: Interrupt = go_on,
) -> dict[str, Any]:
    """Compute the preprocessed frames of a store once and write them (skipped when complete).

    Parameters
    ----------
    store_path : str or Path
        The store (see `sae.store`).
    config : PreprocessConfig
        What to select, how to scale and perturb.
    chunk_rows : int
        Rows per chunk of the stored X (and per task).
    overwrite : bool
        Recompute even when a complete result exists.
    interrupt : callable, optional
        `sae.progress.Interrupt`, asked before the group is replaced, before
        its attributes and before it is marked complete.

    Returns
    -------
    dict
        ``key``, ``n_rows``, ``n_bins``, ``skipped`` (bool).
    """
    from sae import store

    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    key = preprocess_key(config)
    root = store.open_store(store_path, mode="r+")
    rows, clip_index, frame_index = select_rows(root, config)
    if rows.size == 0:
        raise ValueError(f"the configuration selects no frames (no ok clip with labels {config.labels})")
    version = _version(root, key, clip_index)
    if store.is_complete(root, PREPROCESS, key) and not overwrite:
        out = store.stage_group(root, PREPROCESS, key, mode="r")
        if out.attrs.get("version") == version:
            logger.info("preprocess %s: complete, skipped", key)
            return {"key": key, "n_rows": int(out.attrs["n_rows"]), "n_bins": int(out.attrs["n_bins"]),
                    "skipped": True}
        logger.info("preprocess %s: the store's frames changed since it was computed: recomputed", key)
    frames = da.from_zarr(store.frames_array(root))
    kept = config.frames_per_clip or store.store_frames_per_clip(root)
    selected = transform_clips(frames[rows].rechunk((chunk_rows, -1)), config, kept)
    X, offset, scale = preprocess_frames(selected, config)
    n_rows, n_bins = X.shape
    interrupt(f"preprocess {key}, before it writes")
    group = store.stage_group(root, PREPROCESS, key, config=config, mode="w")
    target = store.create_array(group, "X", shape=(n_rows, n_bins), chunks=(min(chunk_rows, n_rows), n_bins),
                                dtype="float32", dimension_names=("frame", "bin"))
    da.store(X.rechunk((chunk_rows, -1)), target, lock=False)
    for name, values in (("clip_index", clip_index), ("frame_index", frame_index), ("offset", offset), ("scale", scale)):
        store.create_array(group, name, shape=values.shape, dtype=values.dtype, data=values)
    interrupt(f"preprocess {key}, written, before it is marked complete")
    group.attrs.update(
        {
            "n_rows": int(n_rows),
            "n_bins": int(n_bins),
            "n_clips": int(np.unique(clip_index).size),
            "noise_block_rows": NOISE_BLOCK_ROWS,
            "formula": "X = (clip_transform(frames[rows]) - offset) / scale + noise_std * N(0, 1)",
        }
    )
    store.mark_complete(group, version=version)
    logger.info("preprocess %s: %d rows x %d bins from %d clips", key, n_rows, n_bins, np.unique(clip_index).size)
    return {"key": key, "n_rows": int(n_rows), "n_bins": int(n_bins), "skipped": False}


def open_preprocessed(store_path: str | Path | zarr.Group, key: str) -> zarr.Group:
    """The complete stage group ``preprocess/<key>`` (arrays X, clip_index, frame_index, offset, scale)."""
    from sae import store

    if not store.is_complete(store_path, PREPROCESS, key):
        raise ValueError(f"the store has no complete preprocessed frames for key {key!r}: run run_preprocess first")
    return store.stage_group(store_path, PREPROCESS, key, mode="r")


def preprocessed_frames(store_path: str | Path | zarr.Group, key: str) -> da.Array:
    """The stored X (n_rows, n_bins) float32 as a dask array over its chunks."""
    return da.from_zarr(open_preprocessed(store_path, key)["X"])
