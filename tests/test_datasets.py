"""The built-in dataset (deterministic, labelled, GTZAN layout, not trivially separable), folders, manifests."""

import numpy as np
import pytest
import soundfile
from sklearn.model_selection import GroupKFold, cross_val_score
from sklearn.svm import SVC

from sae.audio import ClipError, clip_frames, load_clip
from sae.config import BuiltinDatasetConfig, CQTConfig
from sae.datasets import GENRES, make_builtin_dataset, read_manifest, resolve_clips, scan_folder

SMALL = BuiltinDatasetConfig(n_genres=3, clips_per_genre=2, duration=1.0, seed=3)


def test_deterministic_labelled_gtzan_layout(tmp_path):
    first = make_builtin_dataset(tmp_path / "a", SMALL)
    second = make_builtin_dataset(tmp_path / "b", SMALL)
    assert [c[0] for c in first] == [f"{g}/{g}.{j:05d}" for g in GENRES[:3] for j in range(2)]
    assert [c[2] for c in first] == [g for g in GENRES[:3] for _ in range(2)]
    for (_, path_a, label, _), (_, path_b, _, _) in zip(first, second):
        assert path_a.endswith(f"{label}/{label}.{path_a[-9:-4]}.wav")
        assert open(path_a, "rb").read() == open(path_b, "rb").read()
        info = soundfile.info(path_a)
        assert info.samplerate == SMALL.sample_rate and info.frames == SMALL.sample_rate
    other = make_builtin_dataset(tmp_path / "c", SMALL.model_copy(update={"seed": 4}))
    assert open(other[0][1], "rb").read() != open(first[0][1], "rb").read()
    # More clips per genre: the first ones are unchanged (one generator per clip).
    more = make_builtin_dataset(tmp_path / "d", SMALL.model_copy(update={"clips_per_genre": 3}))
    assert open(more[0][1], "rb").read() == open(first[0][1], "rb").read()
    # Regeneration into the same folder with the same configuration reuses the files.
    mtime = (tmp_path / "a" / GENRES[0] / f"{GENRES[0]}.00000.wav").stat().st_mtime_ns
    assert make_builtin_dataset(tmp_path / "a", SMALL) == first
    assert (tmp_path / "a" / GENRES[0] / f"{GENRES[0]}.00000.wav").stat().st_mtime_ns == mtime
    assert scan_folder(tmp_path / "a") == first


@pytest.mark.slow
def test_cqt_baseline_above_chance_below_perfect(tmp_path):
    config = BuiltinDatasetConfig(n_genres=4, clips_per_genre=8, duration=3.0, seed=0)
    clips = make_builtin_dataset(tmp_path, config)
    cqt = CQTConfig(clip_samples=3 * 22050)
    frames = np.stack([clip_frames(clip.path, cqt) for clip in clips])  # (clips, F, bins)
    labels = np.array([clip.label for clip in clips])
    low, high = frames.min(axis=(0, 1)), frames.max(axis=(0, 1))
    scaled = (frames - low) / (high - low)
    n_windows = 4
    usable = scaled[:, : scaled.shape[1] - scaled.shape[1] % n_windows]
    windows = np.abs(usable).reshape(len(clips), n_windows, -1, cqt.n_bins).sum(axis=2)
    X = windows.reshape(-1, cqt.n_bins)
    y = np.repeat(labels, n_windows)
    groups = np.repeat(np.arange(len(clips)), n_windows)
    accuracy = cross_val_score(SVC(kernel="linear", C=1), X, y, groups=groups, cv=GroupKFold(5)).mean()
    chance = 1 / config.n_genres
    assert chance + 0.15 < accuracy < 1.0, accuracy


def test_scan_folder_lists_non_audio_files(tmp_path):
    (tmp_path / "rock").mkdir()
    (tmp_path / "jazz").mkdir()
    soundfile.write(tmp_path / "rock" / "rock.00001.au", np.zeros(100), 22050, format="AU", subtype="PCM_16")
    soundfile.write(tmp_path / "jazz" / "b.flac", np.zeros(100), 22050)
    (tmp_path / "jazz" / "readme.md").write_text("notes")
    (tmp_path / "jazz" / ".hidden").write_text("x")
    (tmp_path / "stray.wav").write_text("x")
    clips = scan_folder(tmp_path)
    assert clips == [
        ("jazz/b", str(tmp_path / "jazz" / "b.flac"), "jazz", ""),
        ("jazz/readme", str(tmp_path / "jazz" / "readme.md"), "jazz", ""),
        ("rock/rock.00001", str(tmp_path / "rock" / "rock.00001.au"), "rock", ""),
    ]
    with pytest.raises(ClipError) as info:
        load_clip(clips[1][1], CQTConfig(clip_samples=4096))
    assert info.value.kind == "unsupported"
    with pytest.raises(NotADirectoryError):
        scan_folder(tmp_path / "nope")
    assert resolve_clips(tmp_path) == clips


def test_read_manifest(tmp_path):
    (tmp_path / "audio").mkdir()
    soundfile.write(tmp_path / "audio" / "x.wav", np.zeros(100), 22050)
    absolute = tmp_path / "audio" / "y.wav"
    manifest = tmp_path / "list.csv"
    manifest.write_text(f"path,label,extra\naudio/x.wav,pop,1\n{absolute},rock,2\ngone.wav,pop,3\n")
    clips = read_manifest(manifest)
    assert clips == [
        ("pop/x", str(tmp_path / "audio" / "x.wav"), "pop", ""),
        ("rock/y", str(absolute), "rock", ""),
        ("pop/gone", str(tmp_path / "gone.wav"), "pop", ""),
    ]
    assert resolve_clips(manifest) == clips
    with pytest.raises(ClipError) as info:
        load_clip(clips[2][1], CQTConfig(clip_samples=4096))
    assert info.value.kind == "missing"
    bad = tmp_path / "bad.csv"
    bad.write_text("file,genre\na.wav,pop\n")
    with pytest.raises(ValueError, match="'path' and 'label'"):
        read_manifest(bad)


def test_read_manifest_groups(tmp_path):
    manifest = tmp_path / "list.csv"
    manifest.write_text("label,group,path\npop,album 1,a.wav\npop, album 1 ,b.wav\nrock,,c.wav\n")
    clips = read_manifest(manifest)
    assert [clip.group for clip in clips] == ["album 1", "album 1", ""]
    assert [clip.clip_id for clip in clips] == ["pop/a", "pop/b", "rock/c"]
