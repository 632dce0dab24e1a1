"""A development set of real music, rebuilt offline from package registries.

Scores of the music21 corpus (inside the ``music21`` wheel) are rendered with
fluidsynth and the FluidR3 General MIDI sound font (Debian packages
``fluidsynth``, ``fluid-soundfont-gm``) and cut into 30 s clips, 22050 Hz mono.
A clip's label is its *style* (a repertory of the corpus: `STYLES`, defined
in `sae.devset_styles`), its group the *work* it comes from, so that grouped
cross-validation keeps a work on one side.  ``python -m sae.devset --out DIR``
writes ``DIR/<label>/<label>.<work>.<k>.wav`` (16-bit PCM, `CLIP_SAMPLES` =
661500 samples), ``DIR/manifest.csv`` (columns ``path,label,group``, paths
relative to it), ``DIR/devset.json`` (parameters, versions, counts, SHA-256 of
every clip), ``DIR/LICENSES.md`` and the resume records
``DIR/.works/<label>/<work>.json``.

Works
    Visited in an order shuffled by the seed until the style has
    ``clips_per_label`` clips; a work gives at most ``max_clips_per_work``.
Clips
    Consecutive non-overlapping 30 s windows from the start of a piece; the
    incomplete tail is dropped, and so is a clip more than 20 % of whose 100 ms
    frames are silent.  Pieces shorter than 30 s give nothing, except in the
    styles of short tunes (``join``): there the consecutive pieces of one work
    (one source collection, or one fixed set of consecutive tunes) are
    concatenated, 0.5 s apart, before cutting.  A multi-movement work gives its
    clips in turn from its movements (first clip of each, then the second...).
Timbre
    Declared instruments are *not* used, as they give the style away (quartets
    declare strings, chorales voices): every work is played by one ensemble of
    `ENSEMBLES`, a style's works taking them in turn in an order shuffled by the
    seed, so every style is heard in every timbre.  A part plays the ensemble's
    high, middle or low instrument by its position in the score.
Tempo
    The score's marking at its start (30-300 quarters per minute, a number or a
    tempo word such as "Allegro", 132 in music21's table), else the style's
    ``bpm``; later markings are kept.
Repeats
    Played in the styles with ``repeats`` (tunes, chorales: music21 expands
    them); long works are played once through, repeat signs removed.  Only the
    beginning a work needs (``max_clips_per_work`` clips) is rendered.
Level
    Each clip is scaled to an RMS of -20 dBFS, less if its peak would pass 0.99.
    Reverb and chorus are off: the same parameters give the same bytes.
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import unicodedata
import zlib
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import soundfile

from sae.devset_styles import STYLES, Piece, Style

logger = logging.getLogger(__name__)

SAMPLE_RATE = 22050
CLIP_SECONDS = 30
CLIP_SAMPLES = SAMPLE_RATE * CLIP_SECONDS
DEFAULT_SOUNDFONT = "/usr/share/sounds/sf2/FluidR3_GM.sf2"
RENDER_VERSION = 1  # bumped when rendering changes, so that resumed builds render every work again
_TARGET_RMS, _PEAK, _GAIN, _GAP_SECONDS, _SILENT_FRACTION = 0.1, 0.99, 0.2, 0.5, 0.2

ENSEMBLES: dict[str, tuple[int, int, int]] = {
    "piano": (0, 0, 0),  # Acoustic Grand Piano
    "organ": (19, 19, 19),  # Church Organ
    "strings": (40, 41, 42),  # Violin, Viola, Cello
    "choir": (52, 52, 52),  # Choir Aahs
    "winds": (73, 71, 70),  # Flute (Oboe, 68, for every second high part), Clarinet, Bassoon
}
"""General MIDI programs (0-based) of the high, middle and low parts of each ensemble."""


class MissingDependency(RuntimeError):
    """fluidsynth, the sound font or music21 is not installed."""


def slugify(text: str, limit: int = 60) -> str:
    """Lower-case ASCII letters and digits joined by hyphens.

    >>> slugify("bach/chorale:Jesu, meine Freude"), slugify("Läßt walten")
    ('bach-chorale-jesu-meine-freude', 'lasst-walten')
    """
    text = unicodedata.normalize("NFKD", text.replace("ß", "ss")).encode("ascii", "ignore").decode().lower()
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")[:limit].strip("-")


# --------------------------------------------------------------------------- tools


def check_dependencies(soundfont: str | os.PathLike = DEFAULT_SOUNDFONT) -> dict[str, str]:
    """Versions of music21, fluidsynth and the sound font; `MissingDependency` says what to install."""
    try:
        import music21
    except ImportError as error:
        raise MissingDependency("music21 is not installed: pip install music21 (or pip install -e '.[devset]')") \
            from error
    exe = shutil.which("fluidsynth")
    if exe is None:
        raise MissingDependency("fluidsynth is not on PATH: apt-get install fluidsynth (Debian package 'fluidsynth')")
    if not Path(soundfont).is_file():
        raise MissingDependency(f"sound font {str(soundfont)!r} not found: apt-get install fluid-soundfont-gm")
    version = re.search(r"runtime version (\S+)", subprocess.run([exe, "--version"], check=False,
                                                                capture_output=True, text=True).stdout)
    package = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "fluid-soundfont-gm"], check=False,
                             capture_output=True, text=True) if shutil.which("dpkg-query") else None
    digest = hashlib.sha256()
    with open(soundfont, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return {"music21": music21.__version__, "fluidsynth": version.group(1) if version else "unknown",
            "soundfont": str(soundfont), "soundfont_sha256": digest.hexdigest(),
            "fluid-soundfont-gm": package.stdout.strip() if package and package.returncode == 0 else "unknown"}


def corpus_root() -> Path:
    """The folder of the music21 corpus."""
    import music21.corpus

    return Path(music21.corpus.__file__).parent


# --------------------------------------------------------------------------- rendering


def _load(root: Path, piece: Piece) -> list:
    """The scores of a piece (an ABC file without tune number may hold several)."""
    from music21 import converter, stream

    path, number = piece
    parsed = converter.parse(root / path, forceSource=True, **({} if number is None else {"number": number}))
    return list(parsed.scores) if isinstance(parsed, stream.Opus) else [parsed]


def _unshare(score) -> None:
    """Give each measure its own copy of an object (a time signature of an ABC tune) it shares with another one,
    which music21's MIDI export rejects ("already found in this Stream")."""
    from music21 import stream

    seen: set[int] = set()
    for site, element in [(e.activeSite, e) for e in score.recurse() if not isinstance(e, stream.Stream)]:
        if id(element) in seen:
            site.replace(element, copy.deepcopy(element))
        seen.add(id(element))


def _strip_repeats(score) -> None:
    """Remove repeat barlines, repeat expressions (da capo, segno...) and endings: the score plays once through."""
    from music21 import bar, repeat, spanner, stream

    for measure in score.recurse().getElementsByClass(stream.Measure):
        if isinstance(measure.leftBarline, bar.Repeat):
            measure.leftBarline = None
        if isinstance(measure.rightBarline, bar.Repeat):
            measure.rightBarline = bar.Barline("regular")
    for mark in list(score.recurse().getElementsByClass((repeat.RepeatExpression, spanner.RepeatBracket))):
        mark.activeSite.remove(mark)


def _set_ensemble(score, ensemble: str) -> list[str]:
    """Replace the declared instruments by the ensemble's (top parts high, lowest part low); returns the declared."""
    from music21 import instrument

    high, middle, low = ENSEMBLES[ensemble]
    parts, declared = list(score.parts), []
    for i, part in enumerate(parts):
        for old in list(part.recurse().getElementsByClass(instrument.Instrument)):
            declared.append(str(old.instrumentName or old.partName or ""))
            old.activeSite.remove(old)
        new = instrument.Instrument()
        if len(parts) > 1 and i == len(parts) - 1:
            new.midiProgram = low
        elif len(parts) == 1 or i < len(parts) // 2:
            new.midiProgram = 68 if ensemble == "winds" and i % 2 else high
        else:
            new.midiProgram = middle
        part.insert(0, new)
    return declared


def _set_tempo(score, default_bpm: float) -> tuple[float, bool]:
    """Keep a usable tempo marking at the start, else play a tempo word found there (music21's table: "Allegro"
    is 132) or ``default_bpm``; returns (quarter notes per minute, taken from the score)."""
    from music21 import expressions, tempo

    def at_start(kind):
        return [e for e in score.recurse().getElementsByClass(kind) if e.getOffsetInHierarchy(score) == 0]

    starting = at_start(tempo.MetronomeMark)
    words = [tempo.MetronomeMark(text=str(e.content)) for e in at_start(expressions.TextExpression) if e.content]
    bpm = next((b for b in (m.getQuarterBPM() for m in starting + words) if b is not None and 30 <= b <= 300), None)
    for mark in starting:
        mark.activeSite.remove(mark)
    (score.parts[0] if score.parts else score).insert(0, tempo.MetronomeMark(number=bpm or default_bpm))
    return float(bpm or default_bpm), bpm is not None


def _truncate(score, seconds: float) -> None:
    """Drop the measures that start after ``seconds`` even at the fastest tempo marked in the score."""
    from music21 import stream, tempo

    bpm = [m.getQuarterBPM() for m in score.recurse().getElementsByClass(tempo.MetronomeMark)]
    limit = seconds * max([b for b in bpm if b] + [1.0]) / 60
    for part in score.parts:
        part.remove([m for m in part.getElementsByClass(stream.Measure) if m.offset >= limit])


def _write_midi(score, path: Path) -> float:
    """Write ``score`` as MIDI ending with "all notes off" on every channel; returns its length in seconds.

    Without that last event, a sustained program (organ, choir) with a note that
    music21 leaves hanging keeps fluidsynth rendering for ever.
    """
    from music21 import midi

    mf = midi.translate.streamToMidiFile(score)
    tempi, end = [], 0
    for track in mf.tracks:
        tick = 0
        for event in track.events:
            if isinstance(event, midi.DeltaTime):
                tick += event.time
            elif event.type == midi.MetaEvents.SET_TEMPO:
                tempi.append((tick, int.from_bytes(event.data, "big")))
        end = max(end, tick)
        for channel in sorted({e.channel for e in track.events if isinstance(e, midi.MidiEvent) and e.isNoteOn()}):
            off = midi.MidiEvent(track, type=midi.ChannelVoiceMessages.CONTROLLER_CHANGE, channel=channel)
            off.parameter1, off.parameter2 = 123, 0
            track.events[-1:-1] = [off, midi.DeltaTime(track, time=0)]  # before the end of the track
    seconds, last, usec = 0.0, 0, 500000
    for tick, value in sorted(tempi) + [(end, None)]:
        seconds, last, usec = seconds + (tick - last) * usec / 1e6 / mf.ticksPerQuarterNote, tick, value or usec
    mf.open(str(path), "wb")
    try:
        mf.write()
    finally:
        mf.close()
    return seconds


def render_score(score, ensemble: str, default_bpm: float, *, soundfont: str | os.PathLike = DEFAULT_SOUNDFONT,
                 repeats: bool = False, max_seconds: float | None = None,
                 sample_rate: int = SAMPLE_RATE) -> tuple[np.ndarray, dict]:
    """One music21 score (modified) as mono float32 audio, silence at both ends trimmed.

    ``ensemble`` is a key of `ENSEMBLES`, ``default_bpm`` the tempo (quarters per
    minute) if the score has no usable marking at its start; ``repeats`` plays
    the repeats (else the score plays once through), ``max_seconds`` renders the
    beginning only (at least that long).  Returns the audio and ``{"bpm",
    "marked" (tempo from the score), "declared" (instruments), "rights"}``.
    """
    _unshare(score)
    if repeats and score.recurse().getElementsByClass("Measure").first() is not None:
        score = score.expandRepeats()  # raises on malformed repeats, as music21's MIDI export would
    _strip_repeats(score)
    declared = _set_ensemble(score, ensemble)
    bpm, marked = _set_tempo(score, default_bpm)
    if max_seconds is not None:
        _truncate(score, max_seconds)
    metadata = getattr(score, "metadata", None)
    rights = str(metadata.copyright) if metadata is not None and metadata.copyright else ""
    with tempfile.TemporaryDirectory(prefix="sae-devset-") as tmp:
        midi_path, wav = Path(tmp) / "in.mid", Path(tmp) / "out.wav"
        seconds = _write_midi(score, midi_path)
        command = ["fluidsynth", "-ni", "-q", "-R", "0", "-C", "0", "-r", str(sample_rate), "-g", str(_GAIN),
                   "-T", "wav", "-O", "float", "-F", str(wav), str(soundfont), str(midi_path)]
        limit = (seconds + 60) * sample_rate * 8  # bytes of float stereo: the score's length and a minute
        with open(Path(tmp) / "err.txt", "w+") as err, subprocess.Popen(command, stdout=err, stderr=err) as process:
            while process.poll() is None:
                if wav.exists() and wav.stat().st_size > limit:
                    process.kill()
                    raise RuntimeError(f"fluidsynth rendered past the end of the score ({seconds:.0f} s)")
                time.sleep(0.05)
            err.seek(0)
            if process.returncode != 0 or not wav.exists():
                raise RuntimeError(f"fluidsynth failed ({process.returncode}): {err.read().strip()[-300:]}")
        audio, rate = soundfile.read(str(wav), dtype="float32", always_2d=True)
    if rate != sample_rate:
        raise RuntimeError(f"fluidsynth wrote {rate} Hz, expected {sample_rate}")
    audio = audio.mean(axis=1)
    loud = np.flatnonzero(np.abs(audio) > 1e-3 * max(float(np.abs(audio).max(initial=0.0)), 1e-12))
    audio = np.ascontiguousarray(audio[loud[0]:loud[-1] + 1] if loud.size else audio[:0])
    return audio, {"bpm": bpm, "marked": marked, "declared": sorted(set(declared)), "rights": rights}


def cut_clips(audio: np.ndarray, clip_samples: int = CLIP_SAMPLES) -> list[np.ndarray]:
    """Consecutive non-overlapping clips, level-normalised; the tail and mostly silent clips are dropped.

    >>> t = np.arange(25000) / 1000.0
    >>> [c.shape for c in cut_clips(np.sin(2 * np.pi * 3 * t).astype(np.float32), 10000)]
    [(10000,), (10000,)]
    """
    frame = max(clip_samples // 300, 1)
    reference = float(np.sqrt(np.mean(audio.astype(np.float64) ** 2))) if audio.size else 0.0
    clips = []
    for start in range(0, audio.size - clip_samples + 1, clip_samples):
        clip = audio[start:start + clip_samples].astype(np.float64)
        frames = np.sqrt(np.mean(clip[: clip.size // frame * frame].reshape(-1, frame) ** 2, axis=1))
        if reference == 0.0 or np.mean(frames < 1e-3 * reference) > _SILENT_FRACTION:
            continue
        scale = min(_TARGET_RMS / float(np.sqrt(np.mean(clip**2))), _PEAK / float(np.abs(clip).max()))
        clips.append((clip * scale).astype(np.float32))
    return clips


# --------------------------------------------------------------------------- works and build


def _render_work(root: Path, style: Style, pieces: list[Piece], ensemble: str, need: int,
                 soundfont: str) -> tuple[list[np.ndarray], list[dict]]:
    """Up to ``need`` clips of one work, and what each rendered piece gave."""
    log, per_piece, joined = [], [], []
    gap = np.zeros(int(_GAP_SECONDS * SAMPLE_RATE), dtype=np.float32)
    for piece in pieces:
        entry = {"path": piece[0], "number": piece[1]}
        log.append(entry)
        try:
            rendered = [render_score(s, ensemble, style.bpm, soundfont=soundfont, repeats=style.repeats,
                                     max_seconds=need * CLIP_SECONDS + 5) for s in _load(root, piece)]
        except Exception as error:  # a score music21 or fluidsynth cannot handle: skip it, say so
            logger.warning("%s %s: skipped (%s: %s)", piece[0], piece[1] or "", type(error).__name__, error)
            entry["error"] = f"{type(error).__name__}: {error}"[:300]
            continue
        audio = [a for a, _ in rendered]
        entry.update(rendered[0][1] if rendered else {}, seconds=round(sum(a.size for a in audio) / SAMPLE_RATE, 2))
        if style.join:
            joined += [x for a in audio for x in (a, gap)]
            if sum(a.size for a in joined) >= need * CLIP_SAMPLES + gap.size:
                break
        else:
            per_piece.append(cut_clips(np.concatenate(audio) if audio else np.zeros(0, np.float32)))
            entry["clips"] = len(per_piece[-1])
            if sum(1 for c in per_piece if c) >= need:
                break
    if style.join:
        return cut_clips(np.concatenate(joined) if joined else np.zeros(0, np.float32))[:need], log
    clips = [c[k] for k in range(max(map(len, per_piece), default=0)) for c in per_piece if k < len(c)]
    return clips[:need], log


def _build_style(out: Path, label: str, clips_per_label: int, max_clips_per_work: int, seed: int,
                 versions: dict) -> tuple[list[tuple[str, str, str, str]], dict]:
    """Render (or reuse) the works of one style; returns its rows and a summary."""
    style, root = STYLES[label], corpus_root()
    works = style.list_works(root)
    slugs = [slugify(work) for work, _ in works]
    twice = {s for s, n in Counter(slugs).items() if n > 1}
    slugs = [f"{s}-{zlib.crc32(w.encode()):08x}" if s in twice else s for s, (w, _) in zip(slugs, works)]
    rng = np.random.default_rng([seed, zlib.crc32(label.encode())])
    order, timbres = rng.permutation(len(works)), [list(ENSEMBLES)[i] for i in rng.permutation(len(ENSEMBLES))]
    for folder in (out / label, out / ".works" / label):
        folder.mkdir(parents=True, exist_ok=True)
    rows, used, rendered = [], Counter(), 0
    for position, index in enumerate(order):
        if len(rows) >= clips_per_label:
            break
        (work, pieces), slug = works[index], slugs[index]
        ensemble, need = timbres[position % len(timbres)], min(max_clips_per_work, clips_per_label - len(rows))
        key = {"render_version": RENDER_VERSION, "work": work, "ensemble": ensemble, "need": need, "bpm": style.bpm,
               "join": style.join, "repeats": style.repeats, "sample_rate": SAMPLE_RATE, "clip_samples": CLIP_SAMPLES,
               "pieces_sha256": hashlib.sha256(json.dumps(pieces).encode()).hexdigest(),
               **{k: versions[k] for k in ("music21", "fluidsynth", "soundfont_sha256")}}
        record_path = out / ".works" / label / f"{slug}.json"
        record = json.loads(record_path.read_text()) if record_path.exists() else None
        if not (record and record["key"] == key and all((out / label / f).exists() for f in record["clips"])):
            for stale in (out / label).glob(f"{label}.{slug}.*.wav"):
                stale.unlink()
            clips, log = _render_work(root, style, pieces, ensemble, need, versions["soundfont"])
            names = [f"{label}.{slug}.{k:02d}.wav" for k in range(len(clips))]
            for name, clip in zip(names, clips):
                partial = out / label / f".{name}.partial"
                soundfile.write(str(partial), clip, SAMPLE_RATE, subtype="PCM_16", format="WAV")
                os.replace(partial, out / label / name)
            record = {"key": key, "clips": names, "pieces": log}
            record_path.write_text(json.dumps(record, ensure_ascii=False))
            rendered += 1
            logger.info("%s: %s -> %d clips (%s)", label, work, len(names), ensemble)
        rows += [(f"{label}/{Path(name).stem}", f"{label}/{name}", label, work) for name in record["clips"]]
        used[ensemble] += bool(record["clips"])
    groups = Counter(row[3] for row in rows)
    if len(rows) < clips_per_label:
        logger.warning("%s: only %d clips (asked for %d): the corpus holds no more", label, len(rows), clips_per_label)
    return rows, {"description": style.description, "clips": len(rows), "groups": len(groups),
                  "max_clips_in_a_group": max(groups.values(), default=0), "works_available": len(works),
                  "works_rendered_now": rendered, "ensembles": {k: v for k, v in sorted(used.items()) if v}}


def build_devset(out: str | os.PathLike, *, labels: tuple[str, ...] | list[str] | None = None,
                 clips_per_label: int = 50, max_clips_per_work: int = 4, seed: int = 0,
                 soundfont: str | os.PathLike = DEFAULT_SOUNDFONT, jobs: int = 1) -> list[tuple[str, str, str, str]]:
    """Render the development set into ``out`` (resumable) and return its clip list.

    Works already rendered with the same parameters (records in ``<out>/.works``)
    are reused; clips of earlier builds that this one does not list are deleted.

    Parameters
    ----------
    out : str or path-like
        Output folder.
    labels : sequence of str, optional
        Keys of `STYLES` (default: all).
    clips_per_label, max_clips_per_work : int
        Caps on the clips of a label (fewer if the corpus has fewer) and of a work (group).
    seed : int
        Order of the works and of the ensembles.
    soundfont : str or path-like
        General MIDI sound font.
    jobs : int
        Labels rendered in parallel (processes).

    Returns
    -------
    list of (clip_id, path, label, group)
        ``clip_id = "<label>/<file stem>"``, path absolute, group the work.
    """
    labels = list(STYLES) if labels is None else list(labels)
    unknown = [label for label in labels if label not in STYLES]
    if unknown:
        raise ValueError(f"unknown labels {unknown}; choose from {list(STYLES)}")
    if clips_per_label < 1 or max_clips_per_work < 1:
        raise ValueError("clips_per_label and max_clips_per_work must be at least 1")
    versions = check_dependencies(soundfont)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    arguments = [(out, label, clips_per_label, max_clips_per_work, seed, versions) for label in labels]
    if jobs > 1 and len(labels) > 1:
        with ProcessPoolExecutor(max_workers=min(jobs, len(labels))) as pool:
            results = list(pool.map(_build_style, *zip(*arguments)))
    else:
        results = [_build_style(*a) for a in arguments]
    rows = [row for style_rows, _ in results for row in style_rows]
    wanted = {row[1] for row in rows}
    for stale in (f for label in STYLES for f in sorted(out.glob(f"{label}/{label}.*.wav"))):
        if stale.relative_to(out).as_posix() not in wanted:
            logger.info("removing %s (not in this build)", stale)
            stale.unlink()
    with open(out / "manifest.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["path", "label", "group"])
        writer.writerows((path, label, group) for _, path, label, group in rows)
    summary = {"parameters": {"labels": labels, "clips_per_label": clips_per_label,
                              "max_clips_per_work": max_clips_per_work, "seed": seed, "sample_rate": SAMPLE_RATE,
                              "clip_samples": CLIP_SAMPLES, "render_version": RENDER_VERSION},
               "versions": versions, "clips": len(rows), "groups": len({row[3] for row in rows}),
               "labels": {label: s for label, (_, s) in zip(labels, results)},
               "sha256": {path: hashlib.sha256((out / path).read_bytes()).hexdigest() for _, path, _, _ in rows}}
    (out / "devset.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    write_licenses(out, labels, versions)
    logger.info("dev set: %d clips, %d labels, in %s", len(rows), len(labels), out)
    return [(clip_id, str(out / path), label, group) for clip_id, path, label, group in rows]


# --------------------------------------------------------------------------- licences and command line


def write_licenses(out: Path, labels: list[str], versions: dict) -> None:
    """``<out>/LICENSES.md``: sources, the rights statements of the scores used, the licence texts."""
    from importlib.metadata import distribution

    root = corpus_root()
    tools = (f"music21 {versions['music21']} (PyPI), fluidsynth {versions['fluidsynth']} (Debian package fluidsynth), "
             f"FluidR3_GM from Debian package fluid-soundfont-gm {versions['fluid-soundfont-gm']} "
             f"(`{versions['soundfont']}`, sha256 {versions['soundfont_sha256']})")
    use = ("**Use:** research and development, non-commercial (the Essen songs are distributed for non-commercial use, "
           "the Palestrina encodings reserve derivative electronic formats). Do not redistribute the audio: rebuild it "
           "with `python -m sae.devset`.")
    lines = ["# Licences of this development set", "", f"Audio rendered from scores of the music21 corpus: {tools}.",
             "", use, "", "## Sources per label", ""]
    lines += [f"- **{label}** ({STYLES[label].description}): {STYLES[label].source}" for label in labels]
    lines += ["", "## Rights statements in the scores used (pieces per statement)", ""]
    for label in labels:
        counter: Counter = Counter()
        for record in sorted((out / ".works" / label).glob("*.json")):
            data = json.loads(record.read_text())
            if data["clips"] and (out / label / data["clips"][0]).exists():
                counter.update(" ".join((p.get("rights") or "(none)").split())[:300]
                               for p in data["pieces"] if "error" not in p)
        lines += [f"- {label}: {count} x {text}" for text, count in counter.most_common()]
    licence = next((f for f in distribution("music21").files or () if f.name in ("LICENSE", "LICENSE.txt")), None)
    for title, path in (("music21 corpus", root / "license.txt"),
                        ("Essen folk songs", root / "essenFolksong" / "license.txt"),
                        ("music21 software, BSD 3-clause", Path(licence.locate()) if licence else Path("LICENSE")),
                        ("FluidR3_GM sound font", Path("/usr/share/doc/fluid-soundfont-gm/copyright"))):
        text = path.read_text(encoding="utf-8", errors="replace").strip() if path.is_file() else "(not found)"
        shown = path.relative_to(root.parent.parent) if path.is_relative_to(root.parent.parent) else path
        lines += ["", f"## {title} (`{shown}`)", "", "```", text, "```"]
    lines += ["", "fluidsynth (LGPL-2.1+) is used as a tool; it is not part of the output.", ""]
    (out / "LICENSES.md").write_text("\n".join(lines), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """``python -m sae.devset --out DIR [--seed N] [--clips-per-label N] [--labels a,b] [--jobs N]``."""
    parser = argparse.ArgumentParser(prog="python -m sae.devset", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="sae-devset", help="output folder (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="order of works and ensembles (default: %(default)s)")
    parser.add_argument("--clips-per-label", type=int, default=50, help="at most (default: %(default)s)")
    parser.add_argument("--labels", default=None, help=f"comma-separated subset of: {','.join(STYLES)}")
    parser.add_argument("--jobs", type=int, default=1, help="labels rendered in parallel (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    labels = [s.strip() for s in args.labels.split(",") if s.strip()] if args.labels else None
    try:
        clips = build_devset(args.out, labels=labels, clips_per_label=args.clips_per_label, seed=args.seed,
                             jobs=args.jobs)
    except (MissingDependency, ValueError) as error:
        logger.error("%s", error)
        return 2
    logger.info("wrote %d clips and %s", len(clips), Path(args.out) / "manifest.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
