"""The labels of the development set (`sae.devset`): which works of the music21 corpus, grouped how.

A style lists its works as ``(group, pieces)``: the group is a stable work
identifier (corpus path, mass or chorale title), the pieces are corpus files
(or tunes of an ABC file) in playing order.  Every listing reads the corpus
folder only (no parsing), so it is fast and deterministic.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

Piece = tuple[str, "int | None"]  # a file relative to the corpus folder, and the ABC tune number (X:) or None
Works = list[tuple[str, list[Piece]]]  # (group, its pieces in playing order)


@dataclass(frozen=True)
class Style:
    """A label: a repertory of the corpus, how to play it and where its encodings come from."""

    description: str
    bpm: float  # quarter notes per minute when a score has no tempo marking at its start
    list_works: Callable[[Path], Works]
    source: str
    join: bool = False
    repeats: bool = False


def _files(root: Path, pattern: str) -> list[Path]:
    return sorted(root.glob(pattern))


def _rel(root: Path, file: Path) -> str:
    return file.relative_to(root).as_posix()


def _abc_tunes(file: Path) -> list[int]:
    return [int(n) for n in re.findall(r"^X:\s*(\d+)", file.read_text(encoding="utf-8", errors="replace"), re.MULTILINE)]


def _grouped(pairs, order=sorted) -> Works:
    works: dict[str, list[Piece]] = {}
    for work, piece in pairs:
        works.setdefault(work, []).append(piece)
    return sorted((work, order(pieces)) for work, pieces in works.items())


def _bach_chorales(root: Path) -> Works:
    """Harmonisations of one chorale melody (one title in music21's chorale list) form one work."""
    from music21.corpus import chorales

    titles = {bwv: entry["title"] for bwv, entry in chorales.ChoraleListRKBWV().byBWV.items()}
    bwvs = [(f, re.match(r"bwv(\d+(?:\.\d+)?)", f.stem).group(1)) for f in _files(root, "bach/bwv*.mxl")]
    return _grouped((f"bach/chorale:{titles[b]}" if b in titles else f"bach/bwv{b}", (_rel(root, f), None))
                    for f, b in bwvs)


_MASS_ORDER = ("Kyrie", "Gloria", "Credo", "Sanctus", "Benedictus", "Agnus")


def _palestrina_masses(root: Path) -> Works:
    """The movements of one mass (the ``!!!OPR`` title of the Humdrum files) form one work, in liturgical order."""
    def mass(file: Path) -> str:
        match = re.search(r"^!!!OPR:\s*(.+?)\s*$", file.read_bytes()[:4000].decode("latin-1"), re.MULTILINE)
        return f"palestrina:{match.group(1) if match else file.stem}"

    def liturgical(pieces: list[Piece]) -> list[Piece]:
        return sorted(pieces, key=lambda p: (next((i for i, m in enumerate(_MASS_ORDER)
                                                   if Path(p[0]).stem.startswith(m)), 9), p[0]))

    return _grouped(((mass(f), (_rel(root, f), None)) for f in _files(root, "palestrina/*.krn")), liturgical)


def _monteverdi_madrigals(root: Path) -> Works:
    files = [f for f in _files(root, "monteverdi/madrigal.*.mxl") if not f.stem.endswith("_old")]
    return [(f"monteverdi/{f.stem}", [(_rel(root, f), None)]) for f in files]


def _trecento(root: Path) -> Works:
    """One work per piece; versions a/b of a piece are one work, a .mxl beside its .xml is left out."""
    files = _files(root, "trecento/*.xml")
    files += [f for f in _files(root, "trecento/*.mxl") if not f.with_suffix(".xml").exists()]
    def work(file: Path) -> str:
        return "trecento/" + re.sub(r" [ab]$", "", re.sub(r"(\d)[ab](?=[-_ .]|$)", r"\1", file.stem))

    return _grouped((work(f), (_rel(root, f), None)) for f in files if not f.stem.endswith("_bak"))


def _classical_quartets(root: Path) -> Works:
    """String quartets of Haydn, Mozart and Beethoven: the movements of one quartet form one work."""
    files = [f for c in ("haydn", "mozart", "beethoven") for f in _files(root, f"{c}/**/*.mxl")
             if f.parent.name != "k545"]  # k545 is a piano sonata
    return _grouped((_rel(root, f.parent if f.stem.startswith("movement") else f.with_suffix("")),
                     (_rel(root, f), None)) for f in files)


_NINETEENTH = ("schumann_robert/opus41no1/movement?.mxl", "schumann_clara/opus17/movement3.xml",
               "schumann_clara/polonaise_op1n?.mxl", "chopin/mazurka06-2.krn", "schubert/Lindenbaum.xml",
               "weber/concertino_clarinet.mxl", "verdi/laDonnaEMobile.mxl", "liliuokalani/aloha_oe.mxl",
               "leadSheet/fosterBrownHair.mxl", "johnson_j_r/lift_every_voice.mxl", "joplin/maple_leaf_rag.mxl",
               "beach/prayer_of_a_tired_child.musicxml")


def _nineteenth_century(root: Path) -> Works:
    """Lieder, piano and chamber music of 1800-1915 (no quartet of the quartets style); one work per piece or opus."""
    files = [f for pattern in _NINETEENTH for f in _files(root, pattern)]
    return _grouped((_rel(root, f.parent if f.stem.startswith("movement") else f.with_suffix("")),
                     (_rel(root, f), None)) for f in files)


_GERMAN_ESSEN = ("altdeu", "ballad", "boehme", "dva", "erk1", "erk2", "erk3", "fink", "kinder", "lot", "lux", "zuccal")


def _essen_german(root: Path) -> Works:
    """The German-language collections of the Essen folk-song database: one collection (file), one work."""
    files = [f for f in _files(root, "essenFolksong/*.abc") if f.stem.startswith(_GERMAN_ESSEN)]
    return [(f"essenFolksong/{f.stem}", [(_rel(root, f), n) for n in _abc_tunes(f)]) for f in files]


def _ryans_mammoth(root: Path, size: int = 6) -> Works:
    """Fiddle tunes, one per file: sets of 6 consecutive files (by name) form one work, no tune in two sets."""
    files = _files(root, "ryansMammoth/*.abc")
    return [(f"ryansMammoth/set{i // size:03d}", [(_rel(root, f), None) for f in files[i:i + size]])
            for i in range(0, len(files), size)]


def _oneills(root: Path) -> Works:
    """O'Neill's 1850 melodies: one file, one work; a tune number already in an earlier file is left out."""
    def key(file: Path) -> tuple[int, int, str]:
        start, end = (int(n) for n in re.match(r"(\d+)-(\d+)", file.stem).groups())
        return start, -end, file.name

    works, claimed = [], set()
    for file in sorted(_files(root, "oneills1850/*.abc"), key=key):
        tunes = [n for n in _abc_tunes(file) if n not in claimed]
        claimed.update(tunes)
        if tunes:
            works.append((f"oneills1850/{file.stem}", [(_rel(root, file), n) for n in tunes]))
    return sorted(works)


STYLES: dict[str, Style] = {
    "bach-chorales": Style("J. S. Bach, four-part chorales", 80, _bach_chorales, repeats=True, source=(
        "MusicXML encodings of the music21 corpus; the music is in the public domain.")),
    "palestrina-masses": Style("G. P. da Palestrina, mass movements", 144, _palestrina_masses, source=(
        "Humdrum encodings by John Miller (converted by Bret Aarden); every file says \"Copyright 2000, John Miller. "
        "Rights to all derivative electronic formats reserved. Refer to licensing agreement for further details.\" "
        "The agreement is not shipped in the wheel.")),
    "monteverdi-madrigals": Style("C. Monteverdi, madrigals (books 3-5)", 110, _monteverdi_madrigals, source=(
        "MusicXML encodings of the music21 corpus (some name the Ut Orpheus 2003 edition).")),
    "trecento": Style("Italian 14th-century polyphony (PMFC editions)", 100, _trecento, source=(
        "Encodings of the PMFC editions made for music21's trecento work (M. S. A. Cuthbert and others).")),
    "classical-quartets": Style("string quartets of Haydn, Mozart, Beethoven", 120, _classical_quartets, source=(
        "MusicXML encodings of the music21 corpus (some derived from CCARH / C. S. Sapp Humdrum files).")),
    "nineteenth-century": Style("lieder, piano and chamber music, 1800-1915", 100, _nineteenth_century, source=(
        "Various encoders; see the statements below (CC0, CC-BY-SA, public domain).")),
    "german-folksongs": Style("Essen database, German-language folk songs", 100, _essen_german, join=True,
                              repeats=True, source=(
        "Essen folk-song database (EsAC: H. Schaffrath, E. Dahlig-Turek), ABC by Seymour Schlien, distributed for "
        "non-commercial use (corpus/essenFolksong/license.txt, quoted below).")),
    "ryans-mammoth": Style("Ryan's Mammoth Collection (1883), fiddle tunes", 100, _ryans_mammoth, join=True,
                           repeats=True, source="ABC transcriptions of a public-domain book (Boston, 1883)."),
    "oneills-irish": Style("O'Neill's Music of Ireland, 1850 melodies", 90, _oneills, join=True, repeats=True,
                           source="ABC transcriptions of a public-domain book (Chicago, 1903)."),
}
"""The labels: repertories of the music21 corpus (the default build uses them all)."""
