"""Tests of sae.classify and sae.inductive: splits, cross-validation, the inductive protocol, reports."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix
from sklearn.svm import SVC

from flows._dask import LOOPBACK
from sae.classify import (
    Split,
    chance_level,
    check_groups_per_label,
    choose_C,
    cross_validate,
    cv_splits,
    evaluate_split,
    make_classifier,
    ridge_path_accuracies,
    run_splits,
    split_groups,
)
from sae.config import ClassifyConfig, ModelConfig
from sae.estimator import StructuredAutoEncoder
from sae.inductive import inductive_cross_validate, inductive_fold
from sae.pooling import aggregate_clips
from sae.report import noise_table_markdown, plot_noise_experiment, plot_results, results_markdown


def separable_frames(rng, n_classes=3, clips_per_class=8, n_frames=30, n_features=8, noise=1.0):
    """Frames of clips whose class sets the mean of every frame; clip c has class c % n_classes."""
    patterns = 2 * rng.random((n_classes, n_features))
    n_clips = n_classes * clips_per_class
    clip_labels = np.arange(n_clips) % n_classes
    frames = patterns[np.repeat(clip_labels, n_frames)] + rng.normal(0, noise, (n_clips * n_frames, n_features))
    row_clips = np.repeat(np.arange(n_clips), n_frames)
    return frames.astype(np.float32), row_clips, clip_labels


# --------------------------------------------------------------------------- splits


def test_grouped_folds_never_share_a_clip():
    labels = np.repeat(np.arange(20) % 4, 12)
    groups = np.repeat(np.arange(20) * 3 + 1, 12)
    splits = cv_splits(labels, groups, protocol="grouped", n_splits=5, n_repeats=3, random_state=1)
    assert len(splits) == 15
    for split in splits:
        train = np.setdiff1d(np.arange(labels.size), split.test)
        assert not set(groups[split.test]) & set(groups[train]), (split.repeat, split.fold)
        assert set(labels[split.test]) == set(labels)  # stratified: every class in every test fold
    for repeat in range(3):
        tested = np.concatenate([s.test for s in splits if s.repeat == repeat])
        assert np.array_equal(np.sort(tested), np.arange(labels.size))  # each vector tested once
    # repetitions use different shuffles
    first = [frozenset(groups[s.test]) for s in splits if s.repeat == 0]
    second = [frozenset(groups[s.test]) for s in splits if s.repeat == 1]
    assert set(first) != set(second)


def test_grouped_folds_refuse_a_label_held_by_one_group():
    labels = np.repeat([0, 1, 2], 6)
    groups = np.r_[np.arange(12), np.full(6, 12)]  # label 2: all six vectors in group 12
    with pytest.raises(ValueError, match="label 2 has only 1"):
        cv_splits(labels, groups, protocol="grouped", n_splits=3, n_repeats=1)
    with pytest.raises(ValueError, match="label 'jazz' has only 1"):
        check_groups_per_label(labels, groups, names=["rock", "pop", "jazz"])
    assert len(cv_splits(labels, groups, protocol="thesis", n_splits=3, n_repeats=1)) == 3
    groups[-1] = 13
    assert len(cv_splits(labels, groups, protocol="grouped", n_splits=3, n_repeats=1)) == 3


def test_grouped_folds_never_split_a_group(rng):
    # 60 clips of 3 labels in groups of 1 to 5 clips (a group within one label, as recordings are).
    sizes = rng.integers(1, 6, size=60)
    clip_labels = np.repeat(np.arange(sizes.size) % 3, sizes)[:60]
    clip_groups = np.repeat(np.arange(sizes.size), sizes)[:60]
    vector_clips = np.repeat(np.arange(60), 4)
    groups, grouping = split_groups(vector_clips, clip_groups)
    assert grouping == "group" and np.array_equal(groups, clip_groups[vector_clips])
    labels = clip_labels[vector_clips]
    for split in cv_splits(labels, groups, protocol="grouped", n_splits=5, n_repeats=4, random_state=2):
        train = np.setdiff1d(np.arange(labels.size), split.test)
        assert not set(clip_groups[vector_clips[split.test]]) & set(clip_groups[vector_clips[train]])
    # Through cross_validate: the summary says how the folds were grouped.
    frames, row_clips, labels_of_clips = separable_frames(rng, clips_per_class=8)
    features = aggregate_clips(frames, row_clips, clip_labels=labels_of_clips, n_windows=2)
    config = ClassifyConfig(classifier="ridge", n_splits=3, n_repeats=1)
    by_group = cross_validate(features, config, clip_groups=np.arange(24) // 2)
    assert (by_group["grouping"], by_group["n_groups"]) == ("group", 12)
    by_clip = cross_validate(features, config)
    assert (by_clip["grouping"], by_clip["n_groups"]) == ("clip", 24)
    assert cross_validate(features, config.model_copy(update={"protocol": "thesis"}))["grouping"] == "none"


def test_thesis_protocol_leaks_clips_between_train_and_test():
    labels = np.repeat(np.arange(20) % 4, 12)
    groups = np.repeat(np.arange(20), 12)
    splits = cv_splits(labels, groups, protocol="thesis", n_splits=10, n_repeats=20, test_size=0.1)
    assert len(splits) == 200
    assert all(s.test.size == 24 for s in splits)  # 10% of 240 vectors
    shared = 0
    for split in splits:
        train = np.setdiff1d(np.arange(labels.size), split.test)
        shared += bool(set(groups[split.test]) & set(groups[train]))
    assert shared > 0  # the documented leak: a clip's vectors on both sides


def test_splits_are_reproducible_and_validated():
    labels = np.repeat(np.arange(10) % 2, 4)
    groups = np.repeat(np.arange(10), 4)
    a = cv_splits(labels, groups, n_splits=5, n_repeats=2, random_state=3)
    b = cv_splits(labels, groups, n_splits=5, n_repeats=2, random_state=3)
    c = cv_splits(labels, groups, n_splits=5, n_repeats=2, random_state=4)
    assert all(np.array_equal(x.test, y.test) for x, y in zip(a, b))
    assert not all(np.array_equal(x.test, y.test) for x, y in zip(a, c))
    with pytest.raises(ValueError, match="protocol must be one of"):
        cv_splits(labels, groups, protocol="kfold")
    with pytest.raises(ValueError, match=r"n_splits must be <= the number of groups \(10\), got 11"):
        cv_splits(labels, groups, n_splits=11)


# --------------------------------------------------------------------------- evaluation


def test_evaluate_split_matches_scikit_learn_and_votes(rng):
    frames, row_clips, clip_labels = separable_frames(rng, noise=3.0)
    features = aggregate_clips(frames, row_clips, clip_labels=clip_labels, n_windows=2)
    test = np.flatnonzero(np.isin(features.groups, [0, 4, 8, 13]))
    config = ClassifyConfig(voting=True)
    result = evaluate_split(features.vectors, features.labels, features.groups, Split(0, 0, test), config)
    train = np.setdiff1d(np.arange(features.labels.size), test)
    predicted = SVC(kernel="linear", C=1).fit(features.vectors[train], features.labels[train]).predict(
        features.vectors[test]
    )
    assert result["accuracy"] == pytest.approx(np.mean(predicted == features.labels[test]))
    assert np.array_equal(result["confusion"], confusion_matrix(features.labels[test], predicted))
    votes = {}
    for clip in [0, 4, 8, 13]:
        counts = Counter(predicted[features.groups[test] == clip].tolist())
        top = max(counts.values())
        votes[clip] = min(label for label, n in counts.items() if n == top)
    truth = {clip: clip_labels[clip] for clip in votes}
    assert result["clip_accuracy"] == pytest.approx(np.mean([votes[c] == truth[c] for c in votes]))
    assert result["n_test_clips"] == 4


def test_nested_choice_of_C_equals_a_grid_search_on_the_training_vectors_only(rng):
    from sklearn.linear_model import RidgeClassifier
    from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    frames, row_clips, clip_labels = separable_frames(rng, clips_per_class=10, noise=4.0)
    features = aggregate_clips(frames, row_clips, clip_labels=clip_labels, n_windows=2)
    grid = (0.001, 0.01, 0.1, 1.0, 10.0)
    config = ClassifyConfig(classifier="ridge", scaling="standard", C_grid=grid, random_state=5, n_splits=3,
                            n_repeats=1)
    chosen = choose_C(features.vectors, features.labels, features.groups, config)
    search = GridSearchCV(
        make_pipeline(StandardScaler(), RidgeClassifier()), {"ridgeclassifier__alpha": [1 / c for c in grid]},
        cv=StratifiedGroupKFold(3, shuffle=True, random_state=5),
    ).fit(features.vectors, features.labels, groups=features.groups)
    assert chosen == pytest.approx(1 / search.best_params_["ridgeclassifier__alpha"])
    summary = cross_validate(features, config)
    assert sum(summary["C_chosen"].values()) == 3 and set(summary["C_chosen"]) <= {f"{c:g}" for c in grid}
    assert choose_C(features.vectors, features.labels, features.groups, config.model_copy(update={"C_grid": ()})) == 1.0
    with pytest.raises(ValueError, match="C_grid must hold values > 0"):
        ClassifyConfig(C_grid=(1.0, 0.0))


@pytest.mark.parametrize("scaling", ["none", "standard", "minmax"])
@pytest.mark.parametrize("n_classes, n_train, n_features", [(2, 60, 8), (5, 200, 30), (4, 40, 90)])
def test_the_ridge_path_predicts_as_scikit_learn_s_ridge_classifier_at_every_C(rng, scaling, n_classes, n_train,
                                                                               n_features):
    """One eigendecomposition for every C of the grid: the same test accuracy as a RidgeClassifier fitted per C
    (binary and multi-class, more vectors than features and fewer)."""
    centres = rng.normal(size=(n_classes, n_features))
    labels = rng.integers(0, n_classes, size=n_train + 50) * 3 + 1  # not 0..k-1: classes are kept by value
    vectors = centres[(labels - 1) // 3] * rng.uniform(0.1, 1.0, size=n_features) + rng.normal(
        scale=3.0, size=(labels.size, n_features)) + rng.uniform(-3, 3, size=n_features)
    grid = (1e-4, 0.01, 0.1, 1.0, 100.0)
    train, test = slice(0, n_train), slice(n_train, None)
    expected = [np.mean(make_classifier("ridge", C=C, scaling=scaling).fit(vectors[train], labels[train])
                        .predict(vectors[test]) == labels[test]) for C in grid]
    before = vectors.copy()
    got = ridge_path_accuracies(vectors[train], labels[train], vectors[test], labels[test], grid, scaling)
    assert got.tolist() == expected
    assert np.array_equal(vectors, before)  # slices of the caller's array, left unchanged
    assert len(set(expected)) > 1  # the grid matters on these data, so the comparison can tell Cs apart


def test_chance_level():
    assert chance_level(np.array([1, 1, 1, 2])) == 0.75


def test_features_beat_chance_and_dask_equals_serial(rng):
    frames, row_clips, clip_labels = separable_frames(rng, noise=1.5)
    config = ClassifyConfig(n_windows=2, n_splits=4, n_repeats=2, voting=True)
    baseline = aggregate_clips(frames, row_clips, clip_labels=clip_labels, n_windows=2)
    codes = StructuredAutoEncoder(n_atoms=12, max_outer=5, random_state=0).fit_transform(frames - frames.min())
    coded = aggregate_clips(codes, row_clips, clip_labels=clip_labels, n_windows=2)
    serial = {name: cross_validate(f, config) for name, f in (("cqt", baseline), ("sae", coded))}
    for summary in serial.values():
        assert summary["n_scores"] == 8
        assert summary["accuracy_mean"] > summary["chance"] + 0.3
        assert summary["chance"] == pytest.approx(1 / 3)
        assert np.sum(summary["confusion"]) == baseline.labels.size * config.n_repeats
    from distributed import Client, LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=False, **LOOPBACK
    ) as cluster:
        with Client(cluster) as client:
            parallel = {name: cross_validate(f, config, client=client) for name, f in (("cqt", baseline),
                                                                                        ("sae", coded))}
    assert parallel == serial


def test_scaling_and_classifiers_are_selectable(rng):
    frames, row_clips, clip_labels = separable_frames(rng, noise=2.0)
    features = aggregate_clips(frames, row_clips, clip_labels=clip_labels, n_windows=2)
    for classifier in ("linear_svc", "logistic_regression", "ridge"):
        config = ClassifyConfig(classifier=classifier, scaling="standard", n_splits=3, n_repeats=1)
        summary = cross_validate(features, config)
        assert summary["classifier"] == classifier
        assert summary["accuracy_mean"] > summary["chance"] + 0.3


# --------------------------------------------------------------------------- inductive protocol


def test_inductive_fold_never_sees_the_test_clips(rng):
    frames, row_clips, clip_labels = separable_frames(rng, clips_per_class=3, n_frames=20)
    test_clips = np.array([1, 5])
    is_test = np.isin(row_clips, test_clips)
    config = ClassifyConfig(
        protocol="inductive", model=ModelConfig(n_atoms=6, max_outer=4, lambda_e=1.0, random_state=0),
        encode_methods=("exact", "encoder"),
    )
    # The model of the fold is the one fitted on the training clips alone ...
    reference = StructuredAutoEncoder(**config.model.model_dump())
    reference_codes = reference.fit_transform(frames[~is_test])
    fold = inductive_fold(frames, row_clips, test_clips, config)
    np.testing.assert_array_equal(fold.model.components_, reference.components_)
    np.testing.assert_array_equal(fold.model.encoder_, reference.encoder_)
    np.testing.assert_array_equal(fold.train_codes, reference_codes)
    # ... and both sides are coded as new music: each clip alone (lambda_g = 0 and coordinate descent per frame
    # here, so the estimator's transform of all rows at once is the same thing), for the classifier too.
    for method in ("exact", "encoder"):
        np.testing.assert_allclose(fold.test_codes[method], reference.transform(frames[is_test], method=method),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(fold.classifier_codes[method], reference.transform(frames[~is_test], method=method),
                                   rtol=1e-5, atol=1e-6)
    # ... and whatever the test clips hold, the fit does not change: only their codes do.
    poisoned = frames.copy()
    poisoned[is_test] = 1e4 * rng.random((int(is_test.sum()), frames.shape[1]))
    fold_b = inductive_fold(poisoned, row_clips, test_clips, config)
    np.testing.assert_array_equal(fold_b.model.components_, fold.model.components_)
    np.testing.assert_array_equal(fold_b.train_codes, fold.train_codes)
    for method in ("exact", "encoder"):
        np.testing.assert_array_equal(fold_b.classifier_codes[method], fold.classifier_codes[method])
    assert not np.allclose(fold_b.test_codes["encoder"], fold.test_codes["encoder"])
    # NaN test frames: the fold fits (it never reads them) and fails only when encoding them.
    poisoned[is_test] = np.nan
    with pytest.raises(ValueError, match="NaN") as excinfo:
        inductive_fold(poisoned, row_clips, test_clips, config)
    assert [entry.name for entry in excinfo.traceback if entry.name in ("fit_transform", "encode_frames")] == [
        "encode_frames"
    ]
    with pytest.raises(ValueError, match="NaN"):
        StructuredAutoEncoder(**config.model.model_dump()).fit(poisoned)


def test_inductive_fold_codes_clips_with_graph_as_a_model_folder_does(rng):
    """With the graph term: "exact" codes every clip alone without it (so the clips do not interact), and
    "exact_graph" joins every test clip to the fold's training graph, its classifier fitted on the training codes."""
    from sae.inference import TrainingGraph, encode_frames
    from sae.inductive import _fold_graph

    frames, row_clips, _ = separable_frames(rng, clips_per_class=3, n_frames=12)
    frames = frames - frames.min()
    test_clips = np.array([0, 4])
    is_test = np.isin(row_clips, test_clips)
    config = ClassifyConfig(protocol="inductive", encode_methods=("exact", "exact_graph"),
                            model=ModelConfig(n_atoms=6, max_outer=3, max_inner=60, lambda_g=1.0, random_state=0))
    fold = inductive_fold(frames, row_clips, test_clips, config)
    weights = fold.model.config_
    laplacian, degrees, sigma = _fold_graph(frames[~is_test], config)
    # The degrees are the graph's: with self-loops of weight 1, the normalised Laplacian's diagonal is 1 - 1 / d.
    np.testing.assert_allclose(1 / (1 - laplacian.diagonal().astype(np.float64)), degrees, rtol=1e-4)
    graph = TrainingGraph(frames[~is_test], fold.train_codes, degrees, sigma, config.graph)
    np.testing.assert_array_equal(fold.classifier_codes["exact_graph"], fold.train_codes)
    assert not np.allclose(fold.classifier_codes["exact"], fold.train_codes, atol=1e-3)
    for clips, rows, codes in ((test_clips, is_test, fold.test_codes), (None, ~is_test, fold.classifier_codes)):
        for clip in np.unique(row_clips[rows]):
            own = row_clips[rows] == clip
            for method in ("exact", "exact_graph") if clips is not None else ("exact",):
                alone = encode_frames(frames[row_clips == clip], fold.model.components_, None, weights, method, graph)
                np.testing.assert_array_equal(codes[method][own], alone)
    # The bit-exact comparisons above tell a clip coded alone from clips coded together: FISTA stops on the
    # batch's objective, so the codes of a batch differ (here by about the solver's tolerance, 1e-5).
    together = encode_frames(frames[is_test], fold.model.components_, None, weights, "exact_graph", graph)
    assert not np.array_equal(together, fold.test_codes["exact_graph"])
    with pytest.raises(ValueError, match="exact_graph.*lambda_g must be > 0"):
        ClassifyConfig(protocol="inductive", encode_methods=("exact_graph",))


@pytest.mark.slow
def test_inductive_protocol_with_graph_beats_chance(rng):
    frames, row_clips, clip_labels = separable_frames(rng, clips_per_class=4, n_frames=16, noise=1.5)
    frames = frames - frames.min()
    config = ClassifyConfig(
        protocol="inductive", n_windows=2, n_splits=2, n_repeats=1,
        model=ModelConfig(n_atoms=8, max_outer=3, max_inner=50, lambda_g=1.0, lambda_e=1.0, random_state=0),
        encode_methods=("exact", "encoder", "exact_graph"),
    )
    results = inductive_cross_validate(frames, row_clips, clip_labels, config)
    assert set(results) == {"exact", "encoder", "exact_graph"}
    for summary in results.values():
        assert summary["protocol"] == "inductive" and summary["n_scores"] == 2
        assert summary["accuracy_mean"] > summary["chance"] + 0.2
    # Poisoning the test frames of a fold does not change that fold's model.
    test_clips = np.unique(row_clips)[::3]
    poisoned = frames.copy()
    poisoned[np.isin(row_clips, test_clips)] = 1e6
    a = inductive_fold(frames, row_clips, test_clips, config)
    b = inductive_fold(poisoned, row_clips, test_clips, config)
    np.testing.assert_array_equal(a.model.components_, b.model.components_)


# --------------------------------------------------------------------------- reports


def test_reports_render(tmp_path, rng):
    frames, row_clips, clip_labels = separable_frames(rng)
    features = aggregate_clips(frames, row_clips, clip_labels=clip_labels, n_windows=2)
    summary = cross_validate(features, ClassifyConfig(n_splits=3, n_repeats=1, voting=True))
    summary["class_names"] = ["a", "b", "c"]
    text = results_markdown({"cqt": summary, "sae": summary})
    assert f"{100 * summary['accuracy_mean']:.1f} ± {100 * summary['accuracy_std']:.1f}" in text
    assert "| a |" in text and "clip accuracy" in text
    png = plot_results({"cqt": summary, "sae": summary}, tmp_path / "results.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    table = {0.0: {"baseline": summary}, 0.1: {"baseline": summary, "lambda_g_on": summary}}
    text = noise_table_markdown(table)
    assert "(69.7)" in text and "(65.9)" in text and "—" in text
    png = plot_noise_experiment(table, tmp_path / "noise.png")
    assert open(png, "rb").read(4) == b"\x89PNG"


@pytest.mark.slow
@pytest.mark.integration
def test_splits_whose_data_was_lost_with_a_worker_run_again_and_give_the_same_results(caplog):
    """The data of the splits is scattered (no task can make it again): when the workers that hold it are
    restarted mid-run, the splits not run yet are scattered again and run, and the results are those of a
    run without a cluster."""
    import logging
    import time

    from distributed import Client, LocalCluster

    def evaluate(split, data, config):
        time.sleep(0.2)
        return split, float(data[split].sum())

    data = np.arange(60.0).reshape(12, 5)
    splits = list(range(12))
    expected = run_splits(evaluate, splits, data, ClassifyConfig(), None)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, **LOOPBACK) as cluster, \
            Client(cluster) as client, caplog.at_level(logging.WARNING, logger="sae.classify"):
        restarted = []

        def progress(done, total):
            if done == 2 and not restarted:
                holders = {address for key, addresses in client.who_has().items()
                           if str(key).startswith("ndarray-") for address in addresses}
                assert holders  # one worker, or both once the other fetched it: every copy goes
                client.restart_workers(list(holders))
                restarted.extend(holders)

        results = run_splits(evaluate, splits, data, ClassifyConfig(), client, progress)
    assert restarted and results == expected
    assert "the classification lost its data with a worker" in caplog.text
