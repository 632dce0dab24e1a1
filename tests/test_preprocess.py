"""Preprocessed frames (sae.preprocess) against an in-memory numpy computation."""

import dask.array as da
import numpy as np
import pytest

from sae import store
from sae.config import CQTConfig, PreprocessConfig
from sae.preprocess import (
    noise_rows,
    open_preprocessed,
    preprocess_key,
    run_preprocess,
    scale_and_perturb,
    scaling_statistics,
)

LABELS = ["blues", "disco", "jazz"]


def make_store(path, rng, n_clips=9, chunk_clips=2, failed=(4,)):
    """A store of synthetic CQT-like frames: every clip ok except ``failed``."""
    cqt = CQTConfig(clip_samples=22050, n_bins=12)
    clips = [(f"{LABELS[i % 3]}/c{i}", f"c{i}.wav", LABELS[i % 3]) for i in range(n_clips)]
    group = store.create_store(path, cqt, clips, chunk_clips=chunk_clips)
    n_frames = store.store_frames_per_clip(group)
    for chunk in range(store.n_chunks(group)):
        clip_range = store.chunk_clips_range(group, chunk)
        frames = np.abs(rng.standard_normal((len(clip_range) * n_frames, cqt.n_bins))).astype(np.float32)
        frames[:, 3] *= 10  # features of different ranges
        frames[:, 5] = 0.5  # a constant feature
        store.write_chunk_frames(group, chunk, frames)
    records = [
        {"index": i, "status": "error" if i in failed else "ok", "n_frames": 0 if i in failed else n_frames,
         "error_kind": "corrupt" if i in failed else "", "error": "bad" if i in failed else ""}
        for i in range(n_clips)
    ]
    store.update_clips(group, records)
    return group


def _gaussian_smooth(frames, sigma):
    """Each row convolved with a normalised Gaussian of std sigma (radius int(4 sigma + 0.5)), edges mirrored."""
    radius = int(4 * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    weights /= weights.sum()
    padded = np.pad(frames, ((0, 0), (radius, radius)), mode="symmetric")
    return sum(w * padded[:, radius + k : radius + k + frames.shape[1]] for k, w in zip(offsets, weights))


def _clip_reference(clip, config):
    """The per-clip steps, written out: compression, local contrast, context."""
    if config.compression == "log":
        clip = np.log(1 + config.log_gain * clip)
    elif config.compression == "power":
        clip = clip**config.power
    if config.contrast == "local":
        centred = clip - _gaussian_smooth(clip, config.contrast_width)
        spread = np.sqrt(_gaussian_smooth(centred**2, config.contrast_width))
        clip = centred / np.maximum(spread, spread.mean(axis=1, keepdims=True))
    out = np.empty((clip.shape[0], clip.shape[1] * config.context))
    for t in range(clip.shape[0]):
        for j in range(config.context):
            source = max(t - j * config.context_stride, 0)
            out[t, j * clip.shape[1] : (j + 1) * clip.shape[1]] = clip[source]
    return out


def _in_memory(group, config):
    """Independent numpy reference of the documented computation."""
    frames = store.frames_array(group)[:].astype(np.float64)
    table = store.clip_table(group)
    n_frames = store.store_frames_per_clip(group)
    keep = config.frames_per_clip or n_frames
    rows = []
    for clip in range(len(table["status"])):
        if table["status"][clip] != "ok":
            continue
        if config.labels is not None and table["label"][clip] not in config.labels:
            continue
        rows.extend(range(clip * n_frames, clip * n_frames + keep))
    F = np.concatenate([_clip_reference(frames[rows[i : i + keep]], config) for i in range(0, len(rows), keep)])
    if config.scaling == "minmax":
        low, high = F.min(axis=0), F.max(axis=0)
        span = np.where(high - low > 0, high - low, 1.0)
        X = (F - low) / span
    elif config.scaling == "standard":
        std = F.std(axis=0)
        X = (F - F.mean(axis=0)) / np.where(std > 0, std, 1.0)
    else:
        X = F.copy()
    if config.noise_std > 0:
        # the documented definition: fixed blocks of 8192 rows, one generator per (seed, block)
        n_blocks = -(-len(rows) // 8192)
        noise = np.concatenate(
            [np.random.default_rng([config.noise_seed, b]).standard_normal((8192, F.shape[1])) for b in range(n_blocks)]
        )
        X = X + config.noise_std * noise[: len(rows)]
    return X.astype(np.float32), np.array(rows)


@pytest.mark.parametrize(
    "config",
    [
        PreprocessConfig(),
        PreprocessConfig(frames_per_clip=7, labels=("blues", "jazz")),
        PreprocessConfig(scaling="standard", frames_per_clip=10),
        PreprocessConfig(scaling="none", noise_std=0.2, noise_seed=3),
        PreprocessConfig(noise_std=0.1, frames_per_clip=5),
        PreprocessConfig(compression="log", log_gain=3.0, frames_per_clip=9),
        PreprocessConfig(compression="power", power=0.3, contrast="local", contrast_width=1.5),
        PreprocessConfig(compression="log", contrast="local", context=3, context_stride=2, frames_per_clip=11,
                         scaling="standard"),
        PreprocessConfig(context=4, noise_std=0.1, labels=("disco",)),
    ],
)
def test_stored_equals_in_memory(tmp_path, rng, config):
    group = make_store(tmp_path / "s.zarr", rng)
    info = run_preprocess(tmp_path / "s.zarr", config, chunk_rows=50)
    assert info["skipped"] is False and info["key"] == preprocess_key(config)
    out = open_preprocessed(tmp_path / "s.zarr", info["key"])
    expected, rows = _in_memory(group, config)
    X = out["X"][:]
    assert X.dtype == np.float32 and X.shape == expected.shape == (info["n_rows"], info["n_bins"])
    np.testing.assert_allclose(X, expected, rtol=1e-5, atol=1e-6)
    n_frames = store.store_frames_per_clip(group)
    np.testing.assert_array_equal(out["clip_index"][:], rows // n_frames)
    np.testing.assert_array_equal(out["frame_index"][:], rows % n_frames)
    assert 4 not in set(out["clip_index"][:].tolist())  # the failed clip
    if config.scaling == "minmax" and config.noise_std == 0 and config.contrast == "none":
        assert X.min() == 0 and X.max() == pytest.approx(1)
        assert np.all(X[:, 5] == 0)  # the constant feature
    assert info["n_bins"] == 12 * config.context


def test_skips_when_complete_and_recomputes_on_overwrite(tmp_path, rng):
    make_store(tmp_path / "s.zarr", rng)
    config = PreprocessConfig(frames_per_clip=4)
    first = run_preprocess(tmp_path / "s.zarr", config)
    again = run_preprocess(tmp_path / "s.zarr", config)
    assert again["skipped"] is True and again["n_rows"] == first["n_rows"] == 8 * 4
    forced = run_preprocess(tmp_path / "s.zarr", config, overwrite=True)
    assert forced["skipped"] is False


@pytest.mark.parametrize("chunks", [1000, 37, 8, 5])
def test_noise_same_for_any_chunking(rng, chunks):
    frames = rng.random((120, 6))
    offset, scale = scaling_statistics(frames, "minmax")
    reference = scale_and_perturb(frames, offset, scale, noise_std=0.3, noise_seed=11, noise_block_rows=16).compute()
    got = scale_and_perturb(
        da.from_array(frames, chunks=(chunks, 3)), offset, scale, noise_std=0.3, noise_seed=11, noise_block_rows=16
    ).compute()
    np.testing.assert_array_equal(got, reference)
    # and the noise is the documented one, seeded by (seed, block)
    clean = ((frames - offset) / scale).astype(np.float32)
    noise = np.concatenate([np.random.default_rng([11, b]).standard_normal((16, 6)) for b in range(8)])[:120]
    np.testing.assert_allclose(reference, clean + 0.3 * noise, atol=1e-6)
    other_seed = scale_and_perturb(frames, offset, scale, noise_std=0.3, noise_seed=12, noise_block_rows=16).compute()
    assert not np.allclose(other_seed, reference)


def test_noise_rows_statistics():
    noise = noise_rows(0, 20000, 4, 0, noise_block_rows=1000)
    assert abs(noise.mean()) < 0.03 and abs(noise.std() - 1) < 0.03


@pytest.mark.parametrize("chunks", [200, 33])
def test_scaling_statistics_dask_equals_numpy(rng, chunks):
    frames = rng.random((200, 5)) * np.arange(1, 6)
    for scaling in ("minmax", "standard", "none"):
        a = scaling_statistics(frames, scaling)
        b = scaling_statistics(da.from_array(frames, chunks=(chunks, 5)), scaling)
        np.testing.assert_allclose(a[0], b[0], rtol=1e-12)
        np.testing.assert_allclose(a[1], b[1], rtol=1e-12)


def test_errors_name_the_parameter(tmp_path, rng):
    make_store(tmp_path / "s.zarr", rng)
    with pytest.raises(ValueError, match="labels must be among"):
        run_preprocess(tmp_path / "s.zarr", PreprocessConfig(labels=("metal",)))
    with pytest.raises(ValueError, match="frames_per_clip must be <="):
        run_preprocess(tmp_path / "s.zarr", PreprocessConfig(frames_per_clip=10_000))
    with pytest.raises(ValueError, match="scaling must be one of"):
        scaling_statistics(np.ones((3, 2)), "robust")
    with pytest.raises(ValueError, match="no complete preprocessed frames"):
        open_preprocessed(tmp_path / "s.zarr", "0123456789ab")
