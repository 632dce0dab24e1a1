"""The music21 / fluidsynth development set: layout, WAV format, groups, idempotent rebuilds."""

import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile

from sae import devset
from sae.datasets import read_manifest

pytest.importorskip("music21")
needs_synth = pytest.mark.skipif(
    shutil.which("fluidsynth") is None or not Path(devset.DEFAULT_SOUNDFONT).is_file(),
    reason="needs fluidsynth and fluid-soundfont-gm (Debian packages)",
)

LABELS = ("bach-chorales", "german-folksongs")  # one work per piece, and short tunes joined per collection


def _build(out: Path) -> list[tuple[str, str, str, str]]:
    return devset.build_devset(out, labels=LABELS, clips_per_label=2, max_clips_per_work=1, seed=0)


def _digests(out: Path) -> dict[str, str]:
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.glob("*/*.wav"))}


@pytest.mark.slow
@needs_synth
def test_build_layout_format_groups_and_idempotent_rebuild(tmp_path, monkeypatch):
    out = tmp_path / "devset"
    clips = _build(out)

    # Two works of each label, one clip each; clip ids, paths and labels as the manifest says.
    assert [c[2] for c in clips] == [label for label in LABELS for _ in range(2)]
    with open(out / "manifest.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["path", "label", "group"]
    assert [(r["path"], r["label"], r["group"]) for r in rows] == [
        (Path(path).relative_to(out).as_posix(), label, group) for _, path, label, group in clips]
    assert [c[:3] for c in read_manifest(out / "manifest.csv")] == [c[:3] for c in clips]
    for clip_id, path, label, group in clips:
        relative = Path(path).relative_to(out)
        assert relative.parent.name == label and relative.name.startswith(f"{label}.")
        assert clip_id == f"{label}/{relative.stem}"

        info = soundfile.info(path)
        assert (info.channels, info.samplerate, info.frames) == (1, 22050, devset.CLIP_SAMPLES)
        assert info.subtype == "PCM_16"
        y, _ = soundfile.read(path, dtype="float32")
        assert np.isfinite(y).all() and 0.05 < np.sqrt(np.mean(y**2)) < 0.2 and np.abs(y).max() <= 0.99

    # Groups are works: distinct per label here, and no group is in two labels.
    groups = {}
    for _, _, label, group in clips:
        assert groups.setdefault(group, label) == label
    assert len(groups) == 4
    assert all(g.startswith("bach/") for g, label in groups.items() if label == "bach-chorales")
    assert all(g.startswith("essenFolksong/") for g, label in groups.items() if label == "german-folksongs")

    summary = json.loads((out / "devset.json").read_text())
    assert summary["parameters"]["seed"] == 0 and summary["clips"] == 4
    assert summary["sha256"] == _digests(out)
    assert {label: s["groups"] for label, s in summary["labels"].items()} == {label: 2 for label in LABELS}
    licences = (out / "LICENSES.md").read_text()
    assert "BSD" in licences and "MIT license" in licences and "non-commercial" in licences

    # A rebuild renders nothing and changes no byte.
    before = _digests(out)
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*/*.wav")}

    def no_render(*args, **kwargs):
        raise AssertionError("a work was rendered again")

    with monkeypatch.context() as patch:
        patch.setattr(devset, "render_score", no_render)
        assert _build(out) == clips
    assert _digests(out) == before
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/*.wav")} == mtimes

    # Rendering is deterministic: a work whose files and record are deleted comes back byte for byte.
    _, path, label, _ = clips[0]
    record = out / ".works" / label / (Path(path).stem.split(".")[1] + ".json")
    assert record.exists()
    record.unlink()
    Path(path).unlink()
    assert _build(out) == clips
    assert _digests(out) == before


@needs_synth
def test_missing_fluidsynth_says_which_package(monkeypatch, tmp_path):
    monkeypatch.setattr(devset.shutil, "which", lambda name: None)
    with pytest.raises(devset.MissingDependency, match="apt-get install fluidsynth"):
        devset.build_devset(tmp_path, labels=LABELS[:1], clips_per_label=1)
    monkeypatch.undo()
    with pytest.raises(devset.MissingDependency, match="fluid-soundfont-gm"):
        devset.build_devset(tmp_path, labels=LABELS[:1], soundfont=tmp_path / "none.sf2")
    assert devset.main(["--out", str(tmp_path / "x"), "--labels", "no-such-style"]) == 2


def test_every_style_lists_many_works_with_distinct_slugs():
    root = devset.corpus_root()
    for label, style in devset.STYLES.items():
        works = style.list_works(root)
        assert len(works) >= 12, label
        assert len({w for w, _ in works}) == len(works), label
        assert all(pieces and all((root / p).is_file() for p, _ in pieces) for _, pieces in works), label
