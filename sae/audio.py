"""Audio loading and the constant-Q transform (CQT) of clips, and the ingestion batch.

Frames of a clip
----------------
A clip is ``y``, ``L = clip_samples`` mono samples at ``sr = sample_rate``.
With ``hop = hop_length``, ``S = n_shifts`` and ``delta = hop / S``, frame
set ``s`` (s = 0..S-1) is the CQT of the clip shifted by ``s * delta``
samples: its frame ``t`` is centred on sample ``t * hop + s * delta``.  The
sets are interleaved in time order: row ``t * S + s`` of the clip's frame
matrix is frame ``t`` of set ``s``, so consecutive rows are ``delta`` samples
apart.  All sets are computed by ONE ``librosa.cqt`` call with hop ``delta``
(frame j of it is centred on sample ``j * delta``), which equals frame by frame
the per-set CQTs on the hop grid, without the zero padding a separately
shifted signal would get at its start.

Frame count.  ``librosa.cqt`` (``center=True``) returns ``1 + floor(L_s / hop)``
frames for a signal of ``L_s`` samples; the most shifted set has
``L_s = L - (S - 1) * delta``.  We keep, per set,

    T = floor((L - (S - 1) * delta) / hop)

frames (librosa's count for the most shifted set minus its last frame, which
is centred less than one hop from the end of the clip and mostly analyses
padding), and ``F = S * T`` frames per clip.  For the defaults
(L = 660000, hop = 1024, S = 2): ``T = floor(659488 / 1024) = 644``, as the
original kept, and ``F = 1288``.

>>> from sae.config import CQTConfig, IngestConfig
>>> frames_per_clip(CQTConfig())
1288
>>> frames_per_clip(CQTConfig(clip_samples=22050 * 3))
128

Bad input
---------
`load_clip` raises `ClipError` whose ``kind`` is one of `ERROR_KINDS`; the
ingestion batch records it in the clip table and goes on with the next clip.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path

import librosa
import numpy as np
import soundfile

from sae.config import CQTConfig, IngestConfig

logger = logging.getLogger(__name__)

SUPPORTED_EXTENSIONS = (".au", ".wav", ".flac", ".ogg", ".mp3")
"""File name extensions read (with libsndfile, through soundfile)."""

ERROR_KINDS = (
    "missing", "unreadable", "empty", "unsupported", "corrupt", "out_of_range", "truncated", "too_short", "silent",
)
"""Kinds of bad input, in the order they are checked.

missing      the file does not exist
unreadable   it cannot be opened (permissions, a directory, an I/O error)
empty        zero bytes, or a valid header without samples
unsupported  the extension is not one of `SUPPORTED_EXTENSIONS`
corrupt      libsndfile cannot decode it (e.g. text in a ``.wav``), or non-finite samples
out_of_range samples far outside the format's range (peak above `MAX_PEAK`): a float
             file written at the wrong scale, which min-max scaling over the
             dataset would let squeeze every other clip to nothing
truncated    the header declares more audio than the file holds and too few samples remain
too_short    fewer than ``clip_samples`` samples (after resampling) and ``pad_short`` is off
silent       peak amplitude below `SILENCE_PEAK`
"""

SILENCE_PEAK = 1e-6
"""A clip whose peak absolute amplitude (after loading) is below this is silent (-120 dBFS)."""

MAX_PEAK = 4.0
"""Largest accepted peak absolute sample value (+12 dBFS).  Integer formats decode to [-1, 1];
float formats may exceed it a little (overs), never by orders of magnitude."""

_TRUNCATED = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)


class ClipError(Exception):
    """A clip that cannot be ingested; ``kind`` is one of `ERROR_KINDS`."""

    def __init__(self, kind: str, message: str):
        if kind not in ERROR_KINDS:
            raise ValueError(f"kind must be one of {ERROR_KINDS}, got {kind!r}")
        super().__init__(message)
        self.kind = kind
        self.message = message


def frames_per_clip(cqt: CQTConfig) -> int:
    """F, rows of the frame matrix of every clip: ``n_shifts * floor((L - (n_shifts-1) hop/n_shifts) / hop)``.

    See the module docstring for the rule; F depends on the configuration only.
    """
    delta = cqt.hop_length // cqt.n_shifts
    per_set = (cqt.clip_samples - (cqt.n_shifts - 1) * delta) // cqt.hop_length
    if per_set < 1:
        raise ValueError(
            f"clip_samples ({cqt.clip_samples}) must cover at least one hop_length ({cqt.hop_length}) "
            f"plus the shifts ({(cqt.n_shifts - 1) * delta} samples)"
        )
    return cqt.n_shifts * per_set


def load_clip(path: str | os.PathLike, cqt: CQTConfig) -> np.ndarray:
    """Read one clip as mono float32 at ``cqt.sample_rate``, exactly ``cqt.clip_samples`` long.

    Channels are averaged; other sample rates are resampled (soxr, high quality);
    longer clips are truncated to their first ``clip_samples`` samples; shorter
    ones are zero-padded at the end if ``cqt.pad_short``, else rejected.

    Parameters
    ----------
    path : str or path-like
        An audio file with one of `SUPPORTED_EXTENSIONS`.
    cqt : CQTConfig
        Gives ``sample_rate``, ``clip_samples`` and ``pad_short``.

    Returns
    -------
    np.ndarray
        float32, shape (clip_samples,).

    Raises
    ------
    ClipError
        With a ``kind`` from `ERROR_KINDS` and a message naming the file.
    """
    path = Path(path)
    name = str(path)
    if not path.exists():
        raise ClipError("missing", f"{name}: no such file")
    if path.is_dir():
        raise ClipError("unreadable", f"{name}: is a directory, not an audio file")
    try:
        size = path.stat().st_size
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ClipError("unreadable", f"{name}: cannot be opened ({exc.strerror or exc})") from exc
    if size == 0:
        raise ClipError("empty", f"{name}: the file is empty (0 bytes)")
    if path.suffix.lower() not in SUPPORTED_EXTENSIONS:
        raise ClipError(
            "unsupported",
            f"{name}: extension {path.suffix or '(none)'!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_EXTENSIONS)}",
        )
    try:
        info = soundfile.info(name)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as exc:
        raise ClipError("corrupt", f"{name}: not a readable {path.suffix.lower()} file ({exc})") from exc
    if info.samplerate <= 0 or info.channels <= 0:
        raise ClipError("corrupt", f"{name}: invalid header (rate {info.samplerate}, channels {info.channels})")
    sr_in = int(info.samplerate)
    # Read only what the clip needs, plus a margin for the resampler's edge.
    needed = int(np.ceil(cqt.clip_samples * sr_in / cqt.sample_rate)) + (sr_in // 10 if sr_in != cqt.sample_rate else 0)
    try:
        data, _ = soundfile.read(name, frames=needed, dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError) as exc:
        raise ClipError("corrupt", f"{name}: decoding failed ({exc})") from exc
    if data.shape[0] == 0:
        raise ClipError("empty", f"{name}: the file holds no audio samples")
    if not np.all(np.isfinite(data)):
        raise ClipError("corrupt", f"{name}: non-finite sample values (NaN or infinity)")
    peak = float(np.max(np.abs(data)))
    if peak > MAX_PEAK:
        raise ClipError(
            "out_of_range",
            f"{name}: samples reach {peak:.3g}, far outside the audio range [-1, 1] (at most {MAX_PEAK:g} "
            f"accepted): a {info.subtype_info or info.subtype} file written at the wrong scale?",
        )
    y = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if sr_in != cqt.sample_rate:
        y = librosa.resample(y, orig_sr=sr_in, target_sr=cqt.sample_rate, res_type="soxr_hq").astype(np.float32)
    if y.shape[0] < cqt.clip_samples:
        seconds = y.shape[0] / cqt.sample_rate
        wanted = cqt.clip_samples / cqt.sample_rate
        truncated = _TRUNCATED.search(info.extra_info or "")
        if truncated:
            declared, present = (int(v) for v in truncated.groups())
            raise ClipError(
                "truncated",
                f"{name}: truncated file: its header declares {declared} bytes of audio but only {present} "
                f"are present ({seconds:.2f} s, {wanted:.2f} s needed)",
            )
        if not cqt.pad_short:
            raise ClipError(
                "too_short",
                f"{name}: {seconds:.2f} s ({y.shape[0]} samples at {cqt.sample_rate} Hz) is shorter than "
                f"clip_samples = {cqt.clip_samples} ({wanted:.2f} s); set pad_short=True to zero-pad",
            )
        y = np.pad(y, (0, cqt.clip_samples - y.shape[0]))
    y = np.ascontiguousarray(y[: cqt.clip_samples], dtype=np.float32)
    peak = float(np.max(np.abs(y)))
    if peak < SILENCE_PEAK:
        raise ClipError("silent", f"{name}: silent clip (peak amplitude {peak:.2g} < {SILENCE_PEAK:g})")
    return y


def clip_cqt(y: np.ndarray, cqt: CQTConfig) -> np.ndarray:
    """CQT magnitude frames of one clip, interleaved frame sets, (F, n_bins) float32.

    ``X[t * S + s, k] = |CQT(y)[k, centre = t * hop + s * hop / S]|`` for
    ``t < T``, ``s < S`` (S = n_shifts, T and F = S * T from `frames_per_clip`),
    with bin ``k`` centred on ``fmin * 2 ** (k / bins_per_octave)`` Hz.
    Magnitude, no log compression (librosa defaults otherwise: Hann filters,
    L1-normalised, ``scale=True``).

    Parameters
    ----------
    y : np.ndarray
        Mono clip, shape (clip_samples,), as returned by `load_clip`.
    cqt : CQTConfig
        The transform's parameters.

    Returns
    -------
    np.ndarray
        float32, shape (F, n_bins): samples (frames) by features (bins).

    Examples
    --------
    >>> import numpy as np
    >>> cfg = CQTConfig(clip_samples=22050)
    >>> t = np.arange(cfg.clip_samples) / cfg.sample_rate
    >>> X = clip_cqt(np.sin(2 * np.pi * 440.0 * t).astype(np.float32), cfg)
    >>> X.shape, X.dtype
    ((42, 96), dtype('float32'))
    >>> int(np.argmax(X[10:30].mean(axis=0)))  # 440 Hz = fmin * 2 ** (66 / 24)
    66
    """
    y = np.asarray(y, dtype=np.float32)
    if y.ndim != 1 or y.shape[0] != cqt.clip_samples:
        raise ValueError(f"y must be 1-D of length clip_samples = {cqt.clip_samples}, got shape {y.shape}")
    n_frames = frames_per_clip(cqt)
    spectrum = librosa.cqt(
        y,
        sr=cqt.sample_rate,
        hop_length=cqt.hop_length // cqt.n_shifts,
        fmin=cqt.fmin,
        n_bins=cqt.n_bins,
        bins_per_octave=cqt.bins_per_octave,
    )
    return np.ascontiguousarray(np.abs(spectrum[:, :n_frames]).T, dtype=np.float32)


def clip_frames(path: str | os.PathLike, cqt: CQTConfig) -> np.ndarray:
    """`clip_cqt` of `load_clip`: the (F, n_bins) float32 frames of one audio file."""
    return clip_cqt(load_clip(path, cqt), cqt)


def warm_up(cqt: CQTConfig | None = None) -> None:
    """Compile librosa's numba kernels once (the first CQT of a process costs seconds)."""
    cqt = cqt or CQTConfig()
    small = cqt.model_copy(update={"clip_samples": max(cqt.sample_rate, 16 * cqt.hop_length)})
    noise = np.random.default_rng(0).standard_normal(small.clip_samples).astype(np.float32)
    clip_cqt(noise, small)


def process_batch(store_path: str, chunk_index: int, clip_indices: Sequence[int] | None = None) -> list[dict]:
    """Compute the frames of the clips of one chunk of a store and write that chunk.

    The clips in ``clip_indices`` (default: the chunk's clips that are not "ok")
    are loaded and transformed; the chunk's other clips keep their stored
    frames; the whole chunk is then written at once (its clips only, so
    batches of different chunks may run concurrently).  The clip table is
    NOT written: the caller records the returned outcomes with
    `sae.store.update_clips` (single writer).  Bad input (`ClipError`) is
    recorded, not raised; any other exception propagates (a retry may cure it).

    Parameters
    ----------
    store_path : str
        Path of a store made by `sae.store.create_store`.
    chunk_index : int
        Which chunk (batch) of the store's ``frames``.
    clip_indices : sequence of int, optional
        Clips of this chunk to (re)compute.

    Returns
    -------
    list of dict
        One per computed clip: ``index``, ``clip_id``, ``status`` ("ok" or
        "error"), ``error_kind``, ``error``, ``n_frames``, ``checksum`` (CRC-32
        of the frames written, `sae.store.frames_checksum`), ``seconds``.
    """
    from sae import store as _store

    group = _store.open_store(store_path, mode="r+")
    cqt = _store.store_cqt(group)
    n_frames = _store.store_frames_per_clip(group)
    clips = _store.chunk_clips_range(group, chunk_index)
    table = _store.clip_table(group)
    if clip_indices is None:
        todo = [i for i in clips if table["status"][i] != "ok"]
    else:
        todo = sorted({int(i) for i in clip_indices})
        outside = [i for i in todo if i not in clips]
        if outside:
            raise ValueError(
                f"clip_indices must lie in chunk {chunk_index}, i.e. in [{clips.start}, {clips.stop}), got {outside}"
            )
    if not todo:
        return []
    keep = [i for i in clips if i not in todo and table["status"][i] == "ok"]
    frames = np.zeros((len(clips) * n_frames, cqt.n_bins), dtype=np.float32)
    if keep:
        # The chunk is rewritten whole: the clips kept must still be intact, else they are recomputed too.
        try:
            frames = _store.read_chunk_frames(group, chunk_index)
        except Exception as exc:  # a damaged chunk fails to decode (checksums)
            logger.warning("chunk %d of %s cannot be read (%s): its clips are recomputed", chunk_index,
                           store_path, exc)
            todo = sorted({*todo, *keep})
        else:
            damaged = [i for i in keep if _store.frames_checksum(
                frames[(i - clips.start) * n_frames : (i - clips.start + 1) * n_frames]) != int(table["checksum"][i])]
            if damaged:
                logger.warning("clips %s of chunk %d have damaged frames: recomputed", damaged, chunk_index)
                todo = sorted({*todo, *damaged})
    records = []
    for index in todo:
        start = time.perf_counter()
        rows = slice((index - clips.start) * n_frames, (index - clips.start + 1) * n_frames)
        record = {"index": index, "clip_id": str(table["clip_id"][index])}
        try:
            frames[rows] = clip_frames(table["path"][index], cqt)
        except ClipError as exc:
            frames[rows] = 0.0
            record.update(status="error", error_kind=exc.kind, error=exc.message, n_frames=0, checksum=0)
            logger.warning("clip %s: %s", record["clip_id"], exc.message)
        else:
            record.update(status="ok", error_kind="", error="", n_frames=n_frames,
                          checksum=_store.frames_checksum(frames[rows]))
        record["seconds"] = time.perf_counter() - start
        records.append(record)
    _store.write_chunk_frames(group, chunk_index, frames)
    return records


def prepare_ingest(config: IngestConfig) -> str:
    """Resolve the clips of an ingestion and create its store, or check the store to resume.

    ``config.data`` None generates the built-in dataset into ``<store>-data``
    beside the store (`sae.datasets.make_builtin_dataset`); a folder is
    scanned (`sae.datasets.scan_folder`); a ``.csv`` is read as a manifest.
    An existing store is resumed (unless ``config.overwrite``) when it was
    made with the same CQT configuration, clips and chunk size; otherwise it
    is an error.

    Returns
    -------
    str
        The store path.
    """
    from sae import datasets as _datasets
    from sae.store.keys import builtin_data_folder

    store = Path(config.store)
    if config.data is None:
        clips = _datasets.make_builtin_dataset(builtin_data_folder(store), config.dataset)
    else:
        clips = _datasets.resolve_clips(config.data)
    return create_or_resume_store(store, config.cqt, clips, config.chunk_clips, overwrite=config.overwrite)


def create_or_resume_store(
    store: str | os.PathLike,
    cqt: CQTConfig,
    clips: Sequence[tuple[str, str, str]],
    chunk_clips: int,
    *,
    overwrite: bool = False,
) -> str:
    """Create the store of ``clips`` (`sae.store.create_store`), or check that an existing one is theirs to resume.

    An existing store (unless ``overwrite``) must have been made with the same
    CQT configuration, clips (ids and paths, in order) and chunk size;
    otherwise it is an error.  Returns the store path.
    """
    from sae import store as _store

    store = Path(store)
    if store.exists() and not overwrite:
        group = _store.open_store(store, mode="r+")
        table = _store.clip_table(group)
        found_cqt = _store.store_cqt(group)
        same_clips = table["clip_id"].tolist() == [c[0] for c in clips] and table["path"].tolist() == [
            c[1] for c in clips
        ]
        chunk_clips = min(chunk_clips, len(clips))
        if found_cqt != cqt or not same_clips or int(group.attrs["chunk_clips"]) != chunk_clips:
            raise ValueError(
                f"store {str(store)!r} exists but was made with other settings (cqt {found_cqt.model_dump()}, "
                f"{len(table['clip_id'])} clips, chunk_clips {group.attrs['chunk_clips']}); "
                "use another store path or overwrite=True"
            )
        if _store.update_groups(group, _store.clip_groups(clips)):
            logger.info("store %s: the clips' groups changed; updated (the frames are unchanged)", store)
        logger.info("resuming store %s: %d of %d clips ok", store, int(np.sum(table["status"] == "ok")), len(clips))
    else:
        _store.create_store(store, cqt, clips, chunk_clips, overwrite=overwrite)
    return str(store)
