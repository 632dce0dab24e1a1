"""The plain stages of a sweep and of the noise experiment (`sae.stages.sweep`, `sae.stages.experiment`), no Prefect.

Every expectation is computed from `sae.store.keys` directly, so that a plan that
merged distinct work, split shared work, or reordered it fails.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sae.config import ClassifyConfig, GraphConfig, ModelConfig, PipelineConfig, PreprocessConfig, TrainConfig
from sae.report import PUBLISHED_NOISE_TABLE, noise_table_markdown
from sae.stages import (
    noise_features,
    noise_keys,
    noise_stages,
    sweep_plan,
    write_experiment_outputs,
)
from sae.stages.experiment import COLUMNS, PAIRED
from sae.store.keys import (
    MODEL,
    PREPROCESS,
    experiment_paths,
    experiment_tag,
    feature_sources,
    graph_key,
    group_name,
    model_key,
    preprocess_key,
    results_key,
    stage_keys,
)
from sae.sweep import sweep_points


def first_seen(values):
    """The distinct values, in the order they first appear."""
    return list(dict.fromkeys(values))


def model_of(source: str) -> str:
    """The key of a ``model/<key>`` feature source."""
    stage, key = source.split("/")
    assert stage == MODEL
    return key


def grid(tmp_path, parameters, **base):
    return sweep_points(PipelineConfig(ingest={"store": str(tmp_path / "sweep.zarr")}, **base), parameters)


# --------------------------------------------------------------------------- the sweep's plan


def test_plan_of_a_grid_lists_each_stage_once_as_its_keys_say(tmp_path):
    points = grid(tmp_path, {"lambda_g": [0, 10, 100], "balance_lambdas": [False, True]})
    keys = [stage_keys(point.config) for point in points]
    plan = sweep_plan(points)

    assert plan.store == str(tmp_path / "sweep.zarr")
    assert plan.keys == keys and plan.points == points

    # One preprocessing, as many as the keys say, with each key's configuration.
    assert list(plan.preprocess) == first_seen(k["preprocess"] for k in keys)
    assert len(plan.preprocess) == 1
    for key, config in plan.preprocess.items():
        assert preprocess_key(config) == key

    # The graph does not depend on lambda_g: one graph, and only for the points that use one.
    with_graph = [k["graph"] for k, point in zip(keys, points) if point.config.train.model.lambda_g > 0]
    assert list(plan.graphs) == first_seen(with_graph)
    assert len(set(with_graph)) == 1 and len(plan.graphs) == 1
    for key, graph in plan.graphs.items():
        assert graph_key(graph.preprocess_key, graph.config) == key

    # One model per distinct model key, in the order of the points; no graph for lambda_g = 0.
    assert list(plan.models) == first_seen(k["model"] for k in keys)
    assert len(plan.models) <= len(points)
    for key, model in plan.models.items():
        assert model_key(model.train, model.preprocess_key, model.graph_key) == key
        assert (model.graph_key is None) == (model.train.model.lambda_g == 0)
    assert {m.train.model.lambda_g for m in plan.models.values() if m.graph_key is None} == {0}

    # One classification per distinct results key: the baseline and the codes of its model.
    assert list(plan.classifications) == first_seen(k["results"] for k in keys)
    assert len(plan.classifications) == len({k["results"] for k in keys})
    for key, classification in plan.classifications.items():
        assert results_key(classification.preprocess_key, classification.features, classification.config) == key
        assert classification.features["baseline"] == group_name(PREPROCESS, classification.preprocess_key)
        assert model_of(classification.features["sae"]) in plan.models


def test_plan_shares_what_the_points_share(tmp_path):
    # Classifier settings over one model without graph: one model, no graph, one classification per setting.
    points = grid(tmp_path, {"classify.n_windows": [2, 3]}, train=TrainConfig(model=ModelConfig(lambda_g=0)))
    keys = [stage_keys(point.config) for point in points]
    plan = sweep_plan(points)
    assert len({k["model"] for k in keys}) == 1 and list(plan.models) == [keys[0]["model"]]
    assert plan.graphs == {} and plan.models[keys[0]["model"]].graph_key is None
    assert list(plan.classifications) == [k["results"] for k in keys] and len(plan.classifications) == 2
    assert [c.config.n_windows for c in plan.classifications.values()] == [2, 3]
    assert all(c.features == feature_sources(k["preprocess"], k["model"])
               for c, k in zip(plan.classifications.values(), keys))

    # Noise levels: a preprocessing, a graph and a model each (the graph's key starts with its preprocessing's).
    points = grid(tmp_path, {"noise_std": [0.0, 0.1]}, train=TrainConfig(model=ModelConfig(lambda_g=10)))
    keys = [stage_keys(point.config) for point in points]
    plan = sweep_plan(points)
    assert list(plan.preprocess) == [k["preprocess"] for k in keys] and len(plan.preprocess) == 2
    assert list(plan.graphs) == [k["graph"] for k in keys]
    assert [g.preprocess_key for g in plan.graphs.values()] == [k["preprocess"] for k in keys]
    assert [(m.preprocess_key, m.graph_key) for m in plan.models.values()] == [
        (k["preprocess"], k["graph"]) for k in keys]


def test_trainings_go_in_waves_of_parallel_in_order(tmp_path):
    plan = sweep_plan(grid(tmp_path, {"lambda_g": [0, 10, 100], "balance_lambdas": [False, True]}))
    models = list(plan.models.items())
    for parallel in (1, 4, len(models), len(models) + 3):
        waves = plan.model_waves(parallel)
        assert [item for wave in waves for item in wave] == models
        assert all(len(wave) == parallel for wave in waves[:-1]) and 1 <= len(waves[-1]) <= parallel
    with pytest.raises(ValueError, match="parallel"):
        plan.model_waves(0)
    with pytest.raises(ValueError, match="at least one point"):
        sweep_plan([])


def test_classify_config_reaches_the_plan(tmp_path):
    points = grid(tmp_path, {"lambda_g": [0, 10]}, classify=ClassifyConfig(n_windows=2, n_splits=3))
    plan = sweep_plan(points)
    assert all(c.config == point.config.classify for c, point in zip(plan.classifications.values(), points))


# --------------------------------------------------------------------------- the noise experiment


def test_noise_stages_set_the_noise_and_both_weights(tmp_path):
    preprocess = PreprocessConfig(frames_per_clip=26, noise_std=0.5)
    train = TrainConfig(model=ModelConfig(n_atoms=8, lambda_g=3.0, max_outer=2), block_size=200)
    stages = noise_stages((0, 0.1, 0.2), 100, preprocess, train)

    assert [stage.noise_std for stage in stages] == [0.0, 0.1, 0.2]
    for stage in stages:
        assert stage.preprocess.noise_std == stage.noise_std
        assert stage.preprocess == preprocess.model_copy(update={"noise_std": stage.noise_std})
        assert list(stage.trainings) == list(COLUMNS[1:])
        off, on = stage.trainings["lambda_g_off"], stage.trainings["lambda_g_on"]
        assert off.model.lambda_g == 0 and on.model.lambda_g == 100
        # the same solver in both columns: FISTA, which 'auto' takes with the graph term (cd without it)
        assert (off.model.z_solver, on.model.z_solver) == ("fista", "auto")
        for config in (off, on):  # nothing else changed
            same = {"lambda_g": 3.0, "z_solver": "auto"}
            assert config.model_copy(update={"model": config.model.model_copy(update=same)}) == train
        pre = preprocess_key(stage.preprocess)
        graph = graph_key(pre, GraphConfig())
        models = stage.models(graph)
        assert models == {"lambda_g_off": (None, off), "lambda_g_on": (graph, on)}
        assert model_key(off, pre, None) != model_key(on, pre, graph)
    assert len({preprocess_key(stage.preprocess) for stage in stages}) == 3
    # a solver given is kept in both columns
    chosen = train.model_copy(update={"model": train.model.model_copy(update={"z_solver": "fista"})})
    assert {t.model.z_solver for t in noise_stages((0,), 100, preprocess, chosen)[0].trainings.values()} == {"fista"}

    for lambda_g, stds, needle in ((0, (0.1,), "lambda_g must be > 0"), (-1, (0.1,), "lambda_g must be > 0"),
                                   (1, (), "noise_stds"), (1, (0.1, -0.1), "noise_stds")):
        with pytest.raises(ValueError, match=needle):
            noise_stages(stds, lambda_g, preprocess, train)


def test_noise_features_and_keys_name_the_stages():
    features = noise_features("p", {"lambda_g_off": "m0", "lambda_g_on": "m1"})
    assert features == {"baseline": "preprocess/p", "lambda_g_off": "model/m0", "lambda_g_on": "model/m1"}
    assert list(features) == list(COLUMNS)
    assert noise_keys("p", "p-g", "r", features) == {"preprocess": "p", "graph": "p-g", "results": "r",
                                                    "lambda_g_off": "m0", "lambda_g_on": "m1"}


@pytest.mark.parametrize("protocol", ["grouped", "thesis"])
def test_experiment_outputs_are_written_beside_the_store(tmp_path, protocol):
    store = str(tmp_path / "noise.zarr")
    table = {
        noise_std: {name: {"accuracy_mean": 0.5 + 0.1 * i - noise_std, "accuracy_std": 0.02, "chance": 0.2,
                           "n_scores": 3, "grouping": "clip", "scores": [0.5 + 0.1 * i * k for k in range(3)]}
                    for i, name in enumerate(COLUMNS)}
        for noise_std in (0.0, 0.2)
    }
    keys = {0.0: {"results": "r0"}, 0.2: {"results": "r2"}}
    out = write_experiment_outputs(store, (0, 0.2), table, keys, lambda_g=100.0, protocol=protocol)

    markdown, png = experiment_paths(store, experiment_tag(["r0", "r2"]))
    assert out["markdown"] == str(markdown) and out["png"] == str(png)
    assert markdown.read_text() == out["report"] and Path(png).read_bytes()[:4] == b"\x89PNG"
    published = PUBLISHED_NOISE_TABLE if protocol == "thesis" else None
    assert out["text"] == noise_table_markdown(table, COLUMNS, published=published, paired=PAIRED)
    # what the graph adds, split by split: lambda_g_on (i = 2) minus lambda_g_off (i = 1), 0, 10 and 20 points
    assert "| lambda_g_on - lambda_g_off, paired (splits won) |" in out["text"]
    assert all(line.endswith("| +10.0 ± 8.2 (2 of 3) |") for line in out["text"].splitlines()[2:])
    assert f"({protocol} protocol, lambda_g = 100)" in out["report"] and out["text"] in out["report"]
    assert ("(46.9)" in out["report"]) == (protocol == "thesis")
    assert png.name in out["report"]

