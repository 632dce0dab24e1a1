"""Audio loading, the interleaved CQT frames, bad-input classification and the ingestion batch."""

import librosa
import numpy as np
import pytest
import soundfile

from sae import store
from sae.audio import ClipError, clip_cqt, clip_frames, frames_per_clip, load_clip, process_batch, warm_up
from sae.config import CQTConfig

SR = 22050
CQT = CQTConfig(clip_samples=SR * 2)


@pytest.fixture(scope="module", autouse=True)
def _warm():
    warm_up(CQT)


def tone(freq, seconds=2.5, sr=SR, channels=1):
    t = np.arange(int(seconds * sr)) / sr
    y = 0.5 * np.sin(2 * np.pi * freq * t)
    return np.stack([y] * channels, axis=1) if channels > 1 else y


def test_frames_per_clip_defaults_and_rule():
    assert frames_per_clip(CQTConfig()) == 1288
    for cfg in (CQTConfig(), CQT, CQTConfig(clip_samples=30000, hop_length=768, n_shifts=3)):
        delta = cfg.hop_length // cfg.n_shifts
        shifted = np.zeros(cfg.clip_samples - (cfg.n_shifts - 1) * delta, dtype=np.float32)
        n_librosa = librosa.feature.rms(y=shifted, hop_length=cfg.hop_length, frame_length=2048).shape[1]
        assert frames_per_clip(cfg) == cfg.n_shifts * (n_librosa - 1)


@pytest.mark.parametrize("bin_index", [12, 40, 75])
def test_pure_tone_lands_in_its_bin(bin_index):
    freq = CQT.fmin * 2 ** (bin_index / CQT.bins_per_octave)
    X = clip_cqt(tone(freq)[: CQT.clip_samples].astype(np.float32), CQT)
    assert X.shape == (frames_per_clip(CQT), CQT.n_bins) and X.dtype == np.float32
    assert np.all(np.argmax(X[10:-10], axis=1) == bin_index)


def test_interleaved_sets_equal_separate_cqts(rng):
    y = rng.standard_normal(CQT.clip_samples).astype(np.float32)
    X = clip_cqt(y, CQT)
    kw = dict(sr=SR, fmin=CQT.fmin, n_bins=CQT.n_bins, bins_per_octave=CQT.bins_per_octave, hop_length=CQT.hop_length)
    set0 = np.abs(librosa.cqt(y, **kw)).T
    set1 = np.abs(librosa.cqt(y[CQT.hop_length // 2 :], **kw)).T
    T = frames_per_clip(CQT) // 2
    np.testing.assert_allclose(X[0::2], set0[:T], rtol=1e-4, atol=1e-5 * set0.max())
    # The separately shifted signal is zero-padded at its start: compare away from it.
    np.testing.assert_allclose(X[1::2][12:], set1[12:T], rtol=1e-3, atol=1e-4 * set1.max())


def test_load_converts_stereo_rate_and_truncates(tmp_path):
    soundfile.write(tmp_path / "stereo.wav", tone(440.0, channels=2) * [1.0, 0.5], SR)
    y = load_clip(tmp_path / "stereo.wav", CQT)
    assert y.shape == (CQT.clip_samples,) and y.dtype == np.float32
    expected = tone(440.0)[: CQT.clip_samples] * 0.75
    np.testing.assert_allclose(y, expected, atol=1e-4)
    soundfile.write(tmp_path / "rate.flac", tone(440.0, sr=44100), 44100)
    y44 = load_clip(tmp_path / "rate.flac", CQT)
    assert y44.shape == (CQT.clip_samples,)
    spectrum = np.abs(np.fft.rfft(y44))
    assert abs(np.argmax(spectrum) * SR / CQT.clip_samples - 440.0) < 1.0


def test_pad_short(tmp_path):
    soundfile.write(tmp_path / "short.wav", tone(440.0, seconds=1.0), SR)
    with pytest.raises(ClipError, match="pad_short") as info:
        load_clip(tmp_path / "short.wav", CQT)
    assert info.value.kind == "too_short"
    y = load_clip(tmp_path / "short.wav", CQT.model_copy(update={"pad_short": True}))
    assert y.shape == (CQT.clip_samples,) and np.all(y[SR:] == 0) and np.abs(y[:SR]).max() > 0.4


def make_bad_inputs(folder):
    """One file per kind of bad input; returns {kind: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    paths["missing"] = folder / "missing.wav"
    paths["unreadable"] = folder / "adir.wav"
    paths["unreadable"].mkdir()
    paths["empty"] = folder / "empty.wav"
    paths["empty"].write_bytes(b"")
    paths["unsupported"] = folder / "notes.txt"
    paths["unsupported"].write_text("not audio")
    paths["corrupt"] = folder / "text.wav"
    paths["corrupt"].write_text("this is a text file, not a RIFF/WAVE file\n" * 20)
    soundfile.write(folder / "full.wav", tone(300.0, seconds=3.0), SR, subtype="PCM_16")
    data = (folder / "full.wav").read_bytes()
    paths["truncated"] = folder / "truncated.wav"
    paths["truncated"].write_bytes(data[: len(data) // 3])
    (folder / "full.wav").unlink()
    paths["too_short"] = folder / "short.ogg"
    soundfile.write(paths["too_short"], tone(300.0, seconds=0.5), SR)
    paths["silent"] = folder / "silent.wav"
    soundfile.write(paths["silent"], np.zeros(SR * 3), SR)
    paths["out_of_range"] = folder / "huge.wav"  # a float WAV written at a wrong scale
    soundfile.write(paths["out_of_range"], 1e30 * tone(300.0, seconds=3.0), SR, subtype="FLOAT")
    return paths


def test_every_bad_input_is_classified(tmp_path):
    for kind, path in make_bad_inputs(tmp_path / "bad").items():
        with pytest.raises(ClipError) as info:
            load_clip(path, CQT)
        assert info.value.kind == kind, (kind, info.value.message)
        assert str(path) in info.value.message
    soundfile.write(tmp_path / "header_only.wav", np.zeros(0), SR)
    with pytest.raises(ClipError, match="no audio samples"):
        load_clip(tmp_path / "header_only.wav", CQT)


@pytest.mark.parametrize("scale", [32768.0 * 0.3, 5.0])
def test_float_files_far_outside_the_audio_range_are_errors(tmp_path, scale):
    path = tmp_path / "int16-scale.wav"
    soundfile.write(path, scale * tone(300.0, seconds=3.0) / 0.5, SR, subtype="FLOAT")  # peak = scale
    with pytest.raises(ClipError, match="outside the audio range") as info:
        load_clip(path, CQT)
    assert info.value.kind == "out_of_range"
    soundfile.write(path, 1.5 * tone(300.0, seconds=3.0) / 0.5, SR, subtype="FLOAT")  # an over, accepted
    assert np.abs(load_clip(path, CQT)).max() == pytest.approx(1.5, rel=1e-3)


def test_process_batch_writes_its_chunk_and_keeps_ok_clips(tmp_path):
    good = []
    for i, freq in enumerate((220.0, 330.0, 495.0)):
        path = tmp_path / f"good{i}.wav"
        soundfile.write(path, tone(freq), SR)
        good.append(path)
    bad = make_bad_inputs(tmp_path / "bad")
    clips = [("g/0", str(good[0]), "g"), ("b/silent", str(bad["silent"]), "b"),
             ("g/1", str(good[1]), "g"), ("g/2", str(good[2]), "g")]
    group = store.create_store(tmp_path / "s.zarr", CQT, clips, chunk_clips=2)
    n_frames = frames_per_clip(CQT)
    records = process_batch(str(tmp_path / "s.zarr"), 0)
    assert [(r["index"], r["status"], r["error_kind"]) for r in records] == [(0, "ok", ""), (1, "error", "silent")]
    assert set(store.clip_table(group)["status"]) == {"pending"}  # the caller writes the table
    store.update_clips(group, records)
    frames = store.frames_array(group)
    np.testing.assert_array_equal(frames[:n_frames], clip_frames(good[0], CQT))
    assert not frames[n_frames : 2 * n_frames].any()
    assert records[0]["checksum"] == store.frames_checksum(frames[:n_frames]) and records[1]["checksum"] == 0
    # Recompute only clip 3 of chunk 1, then clip 2: clip 3's frames survive, not recomputed.
    store.update_clips(group, process_batch(str(tmp_path / "s.zarr"), 1, [3]))
    assert [r["index"] for r in process_batch(str(tmp_path / "s.zarr"), 1, [2])] == [2]
    np.testing.assert_array_equal(frames[2 * n_frames : 3 * n_frames], clip_frames(good[1], CQT))
    np.testing.assert_array_equal(frames[3 * n_frames :], clip_frames(good[2], CQT))
    with pytest.raises(ValueError, match="must lie in chunk 1"):
        process_batch(str(tmp_path / "s.zarr"), 1, [0])


def test_process_batch_recomputes_kept_clips_whose_frames_are_damaged(tmp_path):
    paths = []
    for i, freq in enumerate((220.0, 330.0)):
        paths.append(tmp_path / f"good{i}.wav")
        soundfile.write(paths[-1], tone(freq), SR)
    group = store.create_store(tmp_path / "s.zarr", CQT, [("g/0", str(paths[0]), "g"), ("g/1", str(paths[1]), "g")],
                               chunk_clips=2)
    store.update_clips(group, process_batch(str(tmp_path / "s.zarr"), 0))
    n_frames = frames_per_clip(CQT)
    frames = store.frames_array(group)
    frames[:n_frames] = 0.0  # clip 0 damaged behind the store's back (its checksum no longer matches)
    assert store.frames_problems(group) == {0: "frames differ from those ingested (CRC-32 mismatch, chunk 0)"}
    records = process_batch(str(tmp_path / "s.zarr"), 0, [1])  # asked for clip 1 only: clip 0 is repaired too
    assert [r["index"] for r in records] == [0, 1]
    store.update_clips(group, records)
    np.testing.assert_array_equal(frames[:n_frames], clip_frames(paths[0], CQT))
    assert store.frames_problems(group) == {}
