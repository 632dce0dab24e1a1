"""Datasets: the built-in synthetic genres, GTZAN-style folders and CSV manifests.

Every function returns the clip list `sae.store.create_store` takes: a list of
`Clip` ``(clip_id, path, label, group)`` with ``clip_id = "<label>/<file stem>"``.
The *group* is what must stay on one side of a cross-validation split: the
recording, album or artist a clip was cut from (the ``group`` column of a
manifest); a clip without one is its own group (``group == ""``, read as its
clip id by the store).

The built-in dataset
--------------------
`make_builtin_dataset` writes seeded, deterministic WAV files (16-bit PCM) in
GTZAN layout ``<root>/<genre>/<genre>.<00000>.wav``.  Each synthetic genre is a
*recipe* of four traits that differ the way musical genres do:

timbre   harmonic spectrum (amplitude of harmonic h ~ h ** -slope, weight of
         the even harmonics), note envelope (attack, decay), distortion;
rhythm   16-step onset probabilities of the chords and of kick, snare and
         hi-hat, swing, drum level;
harmony  chord vocabulary (triads, sevenths, power chords...), a progression
         of chord roots (semitones above the key), usual keys, register;
tempo    a range of beats per minute.

A clip draws every trait from its genre's recipe, except that with
probability ``crossover`` a trait is borrowed from another random genre (as
cross-over records do); it then varies the parameters within the recipe's
ranges and plays in one of the usual keys of its harmony.  So genres overlap, and the CQT baseline
stays well below 100 % accuracy.  Clip ``j`` of genre ``g`` uses the random
generator ``np.random.default_rng([seed, g, j])``: the same seed gives the
same bytes, whatever the number of clips.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import soundfile
from scipy.signal import lfilter

from sae.audio import SUPPORTED_EXTENSIONS
from sae.config import BuiltinDatasetConfig

logger = logging.getLogger(__name__)

GENRES = ("blues", "classical", "country", "disco", "hiphop", "jazz", "metal", "pop", "reggae", "rock")
"""Names of the synthetic genres; ``n_genres = k`` uses the first k."""

_MARKER = "sae-dataset.json"


class Clip(NamedTuple):
    """One clip of a dataset: its id, audio file, label and group ("" = the clip is its own group)."""

    clip_id: str
    path: str
    label: str
    group: str = ""

# Chord vocabularies: semitone intervals above the root.
_MAJ, _MIN, _DOM7 = (0, 4, 7), (0, 3, 7), (0, 4, 7, 10)
_MAJ7, _MIN7, _HDIM, _POWER = (0, 4, 7, 11), (0, 3, 7, 10), (0, 3, 6, 10), (0, 7, 12)
_ADD9, _SUS4, _MIN9 = (0, 4, 7, 14), (0, 5, 7), (0, 3, 7, 10, 14)


def _steps(*on: int, base: float = 0.0, p: float = 0.9) -> np.ndarray:
    probs = np.full(16, base)
    probs[list(on)] = p
    return probs


# Recipes: one per genre.  Numbers are ranges (lo, hi) drawn uniformly per clip.
_RECIPES: dict[str, dict] = {
    "blues": dict(
        timbre=dict(slope=(0.8, 1.3), even=(0.6, 1.0), attack=(0.005, 0.02), decay=(0.3, 0.6), drive=(0.0, 0.5)),
        rhythm=dict(chords=_steps(0, 6, 8, 14, base=0.1), kick=_steps(0, 8), snare=_steps(4, 12),
                    hat=_steps(0, 3, 4, 7, 8, 11, 12, 15, p=0.6), swing=(0.25, 0.4), drums=(0.3, 0.6)),
        harmony=dict(chords=[_DOM7], degrees=[0, 0, 5, 0, 7, 5, 0, 7], keys=(4, 9, 7, 0), register=(45, 52)),
        tempo=(70, 100),
    ),
    "classical": dict(
        timbre=dict(slope=(1.6, 2.4), even=(0.7, 1.0), attack=(0.04, 0.12), decay=(1.0, 2.0), drive=(0.0, 0.0)),
        rhythm=dict(chords=_steps(0, 8, base=0.15, p=0.8), kick=_steps(), snare=_steps(), hat=_steps(),
                    swing=(0.0, 0.0), drums=(0.0, 0.0)),
        harmony=dict(chords=[_MAJ, _MIN], degrees=[0, 5, 7, 0, 9, 2, 7, 0], keys=(0, 2, 7, 5, 10, 3), register=(48, 60)),
        tempo=(60, 110),
    ),
    "country": dict(
        timbre=dict(slope=(1.0, 1.4), even=(0.8, 1.0), attack=(0.001, 0.005), decay=(0.15, 0.35), drive=(0.0, 0.1)),
        rhythm=dict(chords=_steps(0, 4, 8, 12, base=0.2), kick=_steps(0, 8), snare=_steps(4, 12, p=0.8),
                    hat=_steps(2, 6, 10, 14, p=0.5), swing=(0.0, 0.15), drums=(0.2, 0.4)),
        harmony=dict(chords=[_MAJ], degrees=[0, 5, 7, 0], keys=(7, 2, 9, 0), register=(50, 57)),
        tempo=(90, 130),
    ),
    "disco": dict(
        timbre=dict(slope=(1.3, 1.8), even=(0.5, 0.9), attack=(0.01, 0.04), decay=(0.4, 0.8), drive=(0.0, 0.1)),
        rhythm=dict(chords=_steps(2, 6, 10, 14, base=0.1), kick=_steps(0, 4, 8, 12, p=1.0), snare=_steps(4, 12),
                    hat=_steps(2, 6, 10, 14, p=1.0), swing=(0.0, 0.05), drums=(0.5, 0.8)),
        harmony=dict(chords=[_MIN7, _MAJ7], degrees=[0, 5, 0, 5, 3, 10], keys=(9, 2, 4, 7), register=(48, 55)),
        tempo=(110, 130),
    ),
    "hiphop": dict(
        timbre=dict(slope=(2.0, 3.0), even=(0.3, 0.8), attack=(0.005, 0.03), decay=(0.2, 0.5), drive=(0.0, 0.2)),
        rhythm=dict(chords=_steps(0, 10, base=0.05, p=0.7), kick=_steps(0, 7, 10), snare=_steps(4, 12, p=1.0),
                    hat=_steps(0, 2, 4, 6, 8, 10, 12, 14, p=0.8), swing=(0.1, 0.3), drums=(0.7, 1.0)),
        harmony=dict(chords=[_MIN, _MIN7], degrees=[0, 0, 8, 7], keys=(1, 5, 8, 3), register=(40, 48)),
        tempo=(80, 100),
    ),
    "jazz": dict(
        timbre=dict(slope=(1.5, 2.2), even=(0.4, 0.8), attack=(0.01, 0.03), decay=(0.4, 0.9), drive=(0.0, 0.0)),
        rhythm=dict(chords=_steps(0, 6, 10, base=0.2, p=0.6), kick=_steps(0, p=0.3), snare=_steps(7, 15, p=0.3),
                    hat=_steps(0, 4, 6, 8, 12, 14, p=0.8), swing=(0.3, 0.45), drums=(0.2, 0.4)),
        harmony=dict(chords=[_MIN7, _DOM7, _MAJ7, _HDIM, _MIN9], degrees=[2, 7, 0, 9, 2, 7, 0, 0],
                     keys=(5, 10, 3, 0), register=(48, 56)),
        tempo=(100, 180),
    ),
    "metal": dict(
        timbre=dict(slope=(0.6, 1.0), even=(0.8, 1.0), attack=(0.001, 0.004), decay=(0.3, 0.6), drive=(0.6, 1.0)),
        rhythm=dict(chords=_steps(0, 2, 4, 6, 8, 10, 12, 14, base=0.4), kick=_steps(0, 2, 4, 6, 8, 10, 12, 14),
                    snare=_steps(4, 12), hat=_steps(0, 4, 8, 12), swing=(0.0, 0.0), drums=(0.6, 0.9)),
        harmony=dict(chords=[_POWER], degrees=[0, 0, 3, 5, 6, 5], keys=(4, 2, 1), register=(38, 45)),
        tempo=(140, 200),
    ),
    "pop": dict(
        timbre=dict(slope=(1.1, 1.6), even=(0.6, 1.0), attack=(0.005, 0.02), decay=(0.3, 0.5), drive=(0.0, 0.2)),
        rhythm=dict(chords=_steps(0, 4, 8, 12, base=0.15), kick=_steps(0, 8, 10), snare=_steps(4, 12),
                    hat=_steps(0, 2, 4, 6, 8, 10, 12, 14, p=0.7), swing=(0.0, 0.1), drums=(0.4, 0.7)),
        harmony=dict(chords=[_MAJ, _ADD9, _SUS4], degrees=[0, 7, 9, 5], keys=(0, 7, 2, 9), register=(52, 60)),
        tempo=(100, 125),
    ),
    "reggae": dict(
        timbre=dict(slope=(1.0, 1.5), even=(0.6, 1.0), attack=(0.002, 0.008), decay=(0.08, 0.18), drive=(0.0, 0.1)),
        rhythm=dict(chords=_steps(4, 12, base=0.05, p=1.0), kick=_steps(8), snare=_steps(8, p=0.8),
                    hat=_steps(2, 6, 10, 14, p=0.6), swing=(0.1, 0.25), drums=(0.3, 0.6)),
        harmony=dict(chords=[_MAJ, _MIN], degrees=[0, 5, 0, 7], keys=(9, 7, 0, 2), register=(50, 58)),
        tempo=(70, 90),
    ),
    "rock": dict(
        timbre=dict(slope=(0.8, 1.2), even=(0.7, 1.0), attack=(0.002, 0.01), decay=(0.3, 0.6), drive=(0.3, 0.7)),
        rhythm=dict(chords=_steps(0, 2, 4, 6, 8, 10, 12, 14, base=0.1, p=0.7), kick=_steps(0, 8, 10),
                    snare=_steps(4, 12), hat=_steps(0, 2, 4, 6, 8, 10, 12, 14), swing=(0.0, 0.05), drums=(0.5, 0.8)),
        harmony=dict(chords=[_POWER, _MAJ], degrees=[0, 5, 7, 5, 0, 10, 5, 0], keys=(4, 9, 2, 7), register=(43, 50)),
        tempo=(110, 150),
    ),
}

_TABLE_SIZE = 4096


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1])) if bounds[1] > bounds[0] else float(bounds[0])


def _clip_recipe(genre_index: int, n_genres: int, crossover: float, rng: np.random.Generator) -> dict:
    """Each trait from the clip's genre, or with probability ``crossover`` from another genre."""
    recipe = {}
    for trait in ("timbre", "rhythm", "harmony", "tempo"):
        source = genre_index
        if n_genres > 1 and rng.random() < crossover:
            source = int((genre_index + rng.integers(1, n_genres)) % n_genres)
        recipe[trait] = _RECIPES[GENRES[source]][trait]
    return recipe


def _impulses(onsets: np.ndarray, weights: np.ndarray, n_samples: int) -> np.ndarray:
    train = np.zeros(n_samples, dtype=np.float64)
    keep = onsets < n_samples
    np.add.at(train, onsets[keep], weights[keep])
    return train


def _decay(impulses: np.ndarray, tau: float, sample_rate: int) -> np.ndarray:
    """``impulses`` convolved with exp(-t / tau): a one-pole recursive filter."""
    pole = np.exp(-1.0 / (tau * sample_rate))
    return lfilter([1.0], [1.0, -pole], impulses)


def synthesize_clip(genre: str, rng: np.random.Generator, *, duration: float, sample_rate: int,
                    n_genres: int = len(GENRES), crossover: float = 0.0) -> np.ndarray:
    """One synthetic clip of ``genre``, float32 mono in [-1, 1], ``round(duration * sample_rate)`` samples.

    Parameters
    ----------
    genre : str
        One of the first ``n_genres`` names of `GENRES`.
    rng : np.random.Generator
        Source of every random choice.
    duration : float
        Seconds.
    sample_rate : int
        Hz.
    n_genres : int
        Genres a cross-over trait may come from.
    crossover : float
        Probability, per trait, to borrow the trait from another genre.

    Examples
    --------
    >>> y = synthesize_clip("jazz", np.random.default_rng(0), duration=1.0, sample_rate=8000)
    >>> y.shape, y.dtype, bool(np.abs(y).max() <= 1.0)
    ((8000,), dtype('float32'), True)
    """
    if genre not in GENRES[:n_genres]:
        raise ValueError(f"genre must be one of {GENRES[:n_genres]}, got {genre!r}")
    sr = sample_rate
    n = int(round(duration * sr))
    recipe = _clip_recipe(GENRES.index(genre), n_genres, crossover, rng)
    timbre, rhythm, harmony = recipe["timbre"], recipe["rhythm"], recipe["harmony"]

    # Tempo and the 16th-note grid (swing delays the odd 16ths).
    bpm = _uniform(rng, recipe["tempo"])
    step = 60.0 / bpm / 4.0
    n_steps = int(np.ceil(duration / step)) + 1
    grid = np.arange(n_steps) * step
    grid[1::2] += _uniform(rng, rhythm["swing"]) * step
    position = np.arange(n_steps) % 16

    def pattern_onsets(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        jitter = np.clip(probs + rng.normal(0, 0.1, 16), 0, 1)
        hits = rng.random(n_steps) < jitter[position]
        times = grid[hits] + rng.normal(0, 0.004, hits.sum())
        samples = np.clip(np.round(times * sr), 0, None).astype(np.int64)
        return samples, rng.uniform(0.6, 1.0, hits.sum())

    # Harmony: one chord per bar, from the progression, in a random key.
    key = int(rng.choice(harmony["keys"]))
    register = _uniform(rng, harmony["register"])
    bar_samples = int(round(16 * step * sr))
    n_bars = n // bar_samples + 1
    offset = int(rng.integers(len(harmony["degrees"])))
    n_voices = max(len(chord) for chord in harmony["chords"])
    midi = np.zeros((n_bars, n_voices))
    gain = np.zeros((n_bars, n_voices))
    for bar in range(n_bars):
        degree = harmony["degrees"][(bar + offset) % len(harmony["degrees"])]
        chord = harmony["chords"][int(rng.integers(len(harmony["chords"])))]
        root = register + ((key + degree) % 12) - 6
        for v, interval in enumerate(chord[:n_voices]):
            midi[bar, v] = root + interval
            gain[bar, v] = 1.0
    bar_of_sample = np.minimum(np.arange(n) // bar_samples, n_bars - 1)
    freqs = 440.0 * 2.0 ** ((midi - 69.0) / 12.0)

    # Timbre: one period of the harmonic waveform, read at each voice's phase.
    slope = _uniform(rng, timbre["slope"])
    even = _uniform(rng, timbre["even"])
    harmonics = np.arange(1, 21)
    amplitudes = harmonics ** -slope * np.where(harmonics % 2 == 0, even, 1.0)
    phases = rng.uniform(0, 2 * np.pi, harmonics.size)
    theta = np.linspace(0, 2 * np.pi, _TABLE_SIZE, endpoint=False)
    table = (amplitudes[:, None] * np.sin(harmonics[:, None] * theta[None, :] + phases[:, None])).sum(axis=0)
    table /= np.abs(table).max()
    tonal = np.zeros(n)
    for v in range(n_voices):
        f = freqs[bar_of_sample, v] * (1.0 + rng.normal(0, 0.002))
        phase = np.cumsum(f) / sr + rng.random()
        tonal += gain[bar_of_sample, v] * table[((phase % 1.0) * _TABLE_SIZE).astype(np.int64)]

    # Note envelopes: onsets through an attack-decay filter, impulse response
    # exp(-t / decay) - exp(-t / attack'), 1/attack' = 1/attack + 1/decay (two one-pole filters).
    attack = _uniform(rng, timbre["attack"])
    decay = _uniform(rng, timbre["decay"])
    onsets, weights = pattern_onsets(rhythm["chords"])
    chord_hits = _impulses(onsets, weights, n)
    envelope = _decay(chord_hits, decay, sr) - _decay(chord_hits, 1.0 / (1.0 / attack + 1.0 / decay), sr)
    envelope /= max(envelope.max(), 1e-9)
    tonal *= envelope
    drive = _uniform(rng, timbre["drive"])
    if drive > 0:
        tonal = np.tanh((1 + 8 * drive) * tonal / max(np.abs(tonal).max(), 1e-9))
    tonal /= max(np.abs(tonal).max(), 1e-9)

    # Bass: a sine two octaves below the chord root, struck with the kick.
    bass_phase = np.cumsum(freqs[bar_of_sample, 0] / 4.0) / sr
    kick_onsets, kick_weights = pattern_onsets(rhythm["kick"])
    kick_hits = _impulses(kick_onsets, kick_weights, n)
    bass = np.sin(2 * np.pi * bass_phase) * np.minimum(_decay(kick_hits, 0.25, sr), 1.0)

    # Drums: kick (damped 55 Hz resonator), snare (noise), hi-hat (differenced noise).
    drums = np.zeros(n)
    drum_level = _uniform(rng, rhythm["drums"])
    if drum_level > 0:
        radius, omega = np.exp(-1.0 / (0.1 * sr)), 2 * np.pi * 55.0 / sr
        drums += lfilter([0.0, radius * np.sin(omega)], [1.0, -2 * radius * np.cos(omega), radius**2], kick_hits)
        for name, tau, colour in (("snare", 0.12, 0.0), ("hat", 0.03, 1.0)):
            hits, hit_weights = pattern_onsets(rhythm[name])
            noise = rng.standard_normal(n + 1)
            drums += 0.5 * _decay(_impulses(hits, hit_weights, n), tau, sr) * (noise[1:] - colour * noise[:-1])
        drums *= drum_level / max(np.abs(drums).max(), 1e-9)

    mix = tonal + 0.5 * bass + drums + 0.01 * rng.standard_normal(n)
    mix *= 0.9 / max(np.abs(mix).max(), 1e-9)
    return mix.astype(np.float32)


def make_builtin_dataset(root: str | os.PathLike, config: BuiltinDatasetConfig | None = None) -> list[Clip]:
    """Write the built-in dataset as WAV files in GTZAN layout and return its clip list.

    Files already written with the same configuration (recorded in
    ``<root>/sae-dataset.json``) are reused, not rewritten.

    Parameters
    ----------
    root : str or path-like
        Folder to write ``<root>/<genre>/<genre>.<00000>.wav`` into.
    config : BuiltinDatasetConfig
        Genres, clips per genre, duration, sample rate, crossover and seed.

    Returns
    -------
    list of Clip
        Genre after genre, clip after clip; every clip is its own group.
    """
    config = config or BuiltinDatasetConfig()
    root = Path(root)
    marker = root / _MARKER
    wanted = config.model_dump(mode="json")
    clips = [
        Clip(f"{genre}/{genre}.{j:05d}", str(root / genre / f"{genre}.{j:05d}.wav"), genre)
        for genre in GENRES[: config.n_genres]
        for j in range(config.clips_per_genre)
    ]
    if marker.exists() and json.loads(marker.read_text()) == wanted and all(Path(c[1]).exists() for c in clips):
        logger.info("built-in dataset already in %s", root)
        return clips
    if marker.exists():
        marker.unlink()
    for g, genre in enumerate(GENRES[: config.n_genres]):
        (root / genre).mkdir(parents=True, exist_ok=True)
        for j in range(config.clips_per_genre):
            rng = np.random.default_rng([config.seed, g, j])
            y = synthesize_clip(
                genre, rng, duration=config.duration, sample_rate=config.sample_rate,
                n_genres=config.n_genres, crossover=config.crossover,
            )
            soundfile.write(str(root / genre / f"{genre}.{j:05d}.wav"), y, config.sample_rate, subtype="PCM_16")
    marker.write_text(json.dumps(wanted, sort_keys=True))
    logger.info("wrote the built-in dataset: %d clips in %s", len(clips), root)
    return clips


def scan_folder(root: str | os.PathLike) -> list[Clip]:
    """The clips of a GTZAN-style folder ``<root>/<label>/<file>``, sorted by label then name.

    Every regular file one level down is listed, audio or not (files whose
    extension is not in `sae.audio.SUPPORTED_EXTENSIONS` are logged here and rejected as
    "unsupported" at ingestion, never skipped silently); hidden files and
    files directly in ``root`` are ignored, with a log line.

    Returns
    -------
    list of Clip
        ``clip_id = "<label>/<file name without extension>"``; if two files
        of a label share a stem, the later ones keep their extension in the id.
        A folder says nothing of groups: every clip is its own (use a manifest
        with a ``group`` column to keep the clips of one recording together).
    """
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"data folder {str(root)!r} does not exist or is not a directory")
    clips = []
    seen: set[str] = set()
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for file in sorted(p for p in label_dir.iterdir() if not p.name.startswith(".")):
            if file.is_dir():
                logger.warning("ignoring folder %s (expected <root>/<label>/<file>)", file)
                continue
            if file.suffix.lower() not in SUPPORTED_EXTENSIONS:
                logger.warning("%s: extension %r is not audio; it will be recorded as unsupported", file, file.suffix)
            clip_id = f"{label_dir.name}/{file.stem}"
            if clip_id in seen:
                clip_id = f"{label_dir.name}/{file.name}"
            seen.add(clip_id)
            clips.append(Clip(clip_id, str(file), label_dir.name))
    stray = [p.name for p in root.iterdir() if p.is_file() and not p.name.startswith(".") and p.name != _MARKER]
    if stray:
        logger.warning("ignoring %d files directly in %s (expected <root>/<label>/<file>): %s", len(stray), root, stray[:5])
    if not clips:
        raise ValueError(f"data folder {str(root)!r} holds no <label>/<file> entries")
    return clips


def read_manifest(path: str | os.PathLike) -> list[Clip]:
    """The clips of a CSV manifest with columns ``path``, ``label`` and optionally ``group`` (others ignored).

    Relative paths are relative to the CSV's folder.  Files are not checked
    here: a missing one is recorded at ingestion with error kind "missing".
    ``group`` (any string: a recording, album or artist) keeps clips together
    in cross-validation; an empty cell, or no such column, makes the clip its
    own group.

    Returns
    -------
    list of Clip
        In file order; ``clip_id = "<label>/<file stem>"``, made unique with
        ``#<row>`` when two rows would share it.
    """
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"path", "label"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(
                f"manifest {str(path)!r} must have columns 'path' and 'label'; missing {sorted(missing)}, "
                f"found {reader.fieldnames}"
            )
        rows = list(reader)
    clips = []
    seen: set[str] = set()
    for row_number, row in enumerate(rows, start=2):
        file, label = (row["path"] or "").strip(), (row["label"] or "").strip()
        group = (row.get("group") or "").strip()
        if not file or not label:
            raise ValueError(f"manifest {str(path)!r}, line {row_number}: empty path or label")
        full = Path(file) if Path(file).is_absolute() else path.parent / file
        clip_id = f"{label}/{Path(file).stem}"
        if clip_id in seen:
            clip_id = f"{clip_id}#{row_number}"
        seen.add(clip_id)
        clips.append(Clip(clip_id, str(full), label, group))
    if not clips:
        raise ValueError(f"manifest {str(path)!r} lists no clips")
    return clips


def resolve_clips(data: str | os.PathLike) -> list[Clip]:
    """`read_manifest` for a ``.csv`` file, `scan_folder` for a folder."""
    data = Path(data)
    if data.is_file() and data.suffix.lower() == ".csv":
        return read_manifest(data)
    if data.is_dir():
        return scan_folder(data)
    raise ValueError(f"data must be a folder in GTZAN layout or a .csv manifest, got {str(data)!r}")
