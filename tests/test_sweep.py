"""Hyper-parameter sweeps: the grid, the rows, the plots, the ``sae sweep`` command and the flow end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from matplotlib.image import imread
from typer.testing import CliRunner

from flows.cli import USAGE_ERROR, app
from flows.pipeline import resolve_paths
from sae import store as sae_store
from sae.config import ModelConfig, PipelineConfig
from sae.distributed import open_model
from sae.model import fit_sae
from sae.report import plot_atoms, plot_convergence, plot_sweep_metrics
from sae.store.keys import stage_keys
from sae.sweep import ROW_COLUMNS, parse_values, point_row, resolve_parameter, sweep_points
from test_pipeline import N_GENRES, tiny_config


def assert_png(path: str | Path, min_pixels: int = 200) -> None:
    """A real PNG: the signature, a sensible file size, an image of sensible size that is not blank."""
    path = Path(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    assert 5_000 < path.stat().st_size < 5_000_000, (path, path.stat().st_size)
    image = imread(path)
    assert image.shape[0] >= min_pixels and image.shape[1] >= min_pixels, image.shape
    assert float(image[..., :3].std()) > 0.01  # something is drawn


# --------------------------------------------------------------------------- the grid


def test_parameters_resolve_to_paths_of_the_configuration():
    assert resolve_parameter("lambda_g") == "train.model.lambda_g"
    assert resolve_parameter("classify.model.lambda_g") == "classify.model.lambda_g"
    assert resolve_parameter("balance_lambdas") == "train.model.balance_lambdas"
    assert resolve_parameter("noise_std") == "preprocess.noise_std"
    for name, needle in (("ingest.cqt.n_bins", "one store holds one ingestion"), ("max_outer", "rtol instead"),
                         ("cluster", "cannot be swept"), ("lambda_x", "train.model.lambda_g")):
        with pytest.raises(ValueError, match=needle):
            resolve_parameter(name)


def test_values_are_typed_and_checked():
    assert parse_values("0,1e-3,100") == [0, 0.001, 100]
    assert parse_values("true,false") == [True, False]
    assert parse_values("exact, approximate") == ["exact", "approximate"]
    for bad in ("", "1,,2", "1,1"):
        with pytest.raises(ValueError, match="--values"):
            parse_values(bad)


def test_points_are_the_validated_grid(tmp_path):
    base = tiny_config(tmp_path / "a.zarr")
    points = sweep_points(base, {"lambda_g": "0,100", "graph.n_neighbors": [5, 8, 12]})
    assert len(points) == 6
    assert [p.values for p in points[:2]] == [{"train.model.lambda_g": 0, "graph.n_neighbors": 5},
                                              {"train.model.lambda_g": 0, "graph.n_neighbors": 8}]
    for point in points:  # each point is the base with its values, nothing else
        assert point.config.train.model.lambda_g == point.values["train.model.lambda_g"]
        assert point.config.graph.n_neighbors == point.values["graph.n_neighbors"]
        assert point.config.train.model.n_atoms == base.train.model.n_atoms
        assert point.config.ingest == base.ingest
        assert point.config.classify.model == point.config.train.model  # the inductive protocol follows
    with pytest.raises(ValueError, match=r"lambda_g.*greater than or equal to 0"):
        sweep_points(base, {"lambda_g": "1,-1"})
    with pytest.raises(ValueError, match="given twice"):
        sweep_points(base, {"lambda_g": "1", "train.model.lambda_g": "2"})


def test_a_row_records_the_history_and_the_results(rng):
    X = rng.random((60, 8)).astype(np.float32)
    fit = fit_sae(X, ModelConfig(n_atoms=4, max_outer=3, rtol=1e-9, max_inner=20, random_state=0))
    point = sweep_points(PipelineConfig(), {"lambda_d": "10"})[0]
    results = {"sae": {"accuracy_mean": 0.6, "accuracy_std": 0.1, "chance": 0.25},
               "baseline": {"accuracy_mean": 0.5, "accuracy_std": 0.05, "chance": 0.25}}
    row = point_row(point, fit.history, results, {"graph": "g", "model": "m", "results": "r"}, stop_reason="max_outer")
    assert list(row) == ["train.model.lambda_d", *ROW_COLUMNS]
    last = fit.history[-1]
    assert row["outer_iterations"] == fit.n_iter == 3
    assert row["inner_codes"] == sum(r["inner_codes"] for r in fit.history) > 0
    assert row["train_seconds"] == pytest.approx(sum(r["seconds"] for r in fit.history))
    for name in ("total", "reconstruction", "sparsity_weighted", "sparsity_percent"):
        assert row[name] == last[name]
    assert (row["accuracy_mean"], row["baseline_mean"], row["chance"]) == (0.6, 0.5, 0.25)
    assert (row["lambda_d"], row["model_key"], row["stop_reason"]) == (10.0, "m", "max_outer")


def test_plots_are_valid_pngs(rng, tmp_path):
    X = rng.random((80, 12)).astype(np.float32)
    histories, atoms, rows = {}, {}, []
    for lambda_d in (5.0, 20.0):
        fit = fit_sae(X, ModelConfig(n_atoms=6, lambda_d=lambda_d, max_outer=3, rtol=1e-9, max_inner=20,
                                     random_state=0))
        label = f"lambda_d={lambda_d}"
        histories[label], atoms[label] = fit.history, fit.components
        point = sweep_points(PipelineConfig(), {"lambda_d": [lambda_d]})[0]
        rows.append(point_row(point, fit.history, {
            "sae": {"accuracy_mean": rng.random(), "accuracy_std": 0.1, "chance": 0.2},
            "baseline": {"accuracy_mean": rng.random(), "accuracy_std": 0.1, "chance": 0.2}}, {}))
    for path in (plot_sweep_metrics(rows, "train.model.lambda_d", tmp_path / "metrics.png"),
                 plot_atoms(atoms, tmp_path / "atoms.png"),
                 plot_convergence(histories, tmp_path / "convergence.png")):
        assert_png(path)


# --------------------------------------------------------------------------- the command


@pytest.mark.parametrize("args, needles", [
    (["--param", "lambda_g"], ["Missing option", "--values"]),
    (["--param", "lambda_g", "--param", "lambda_d", "--values", "1,2"], ["one --values", "2 --param and 1 --values"]),
    (["--param", "lambda_q", "--values", "1,2"], ["lambda_q", "not a field"]),
    (["--param", "max_outer", "--values", "1,2"], ["cannot be swept"]),
    (["--param", "lambda_g", "--values", "1,-2"], ["lambda_g", "greater than or equal to 0"]),
])
def test_sweep_command_fails_before_work(tmp_path, args, needles):
    store = tmp_path / "never.zarr"
    result = CliRunner().invoke(app, ["sweep", *args, "--store", str(store)])
    assert result.exit_code == USAGE_ERROR, result.output
    for needle in needles:
        assert needle in result.output
    assert not store.exists()


def test_sweep_command_help():
    result = CliRunner().invoke(app, ["sweep", "--help"])
    assert result.exit_code == 0
    for option in ("--param", "--values", "--parallel", "--config", "--store", "--cluster", "--set"):
        assert option in result.output


# --------------------------------------------------------------------------- end to end


def completed(store: str, stage: str) -> dict[str, str]:
    """Every group of a stage in the store -> when it was marked complete."""
    root = sae_store.open_store(store)
    if stage not in root:
        return {}
    return {key: dict(root[stage][key].attrs).get("completed", "") for key in root[stage].group_keys()}


@pytest.mark.slow
def test_sweep_reuses_the_cqt_and_the_graph_and_writes_one_row_per_value(prefect_harness, tmp_path):
    from flows.sweep import sweep_flow

    config = tiny_config(tmp_path / "sweep.zarr")
    store = resolve_paths(config).ingest.store
    out = sweep_flow(config, {"lambda_g": [50, 100]})

    # The CQT, the preprocessing and the graph were computed once, the two models and their results each.
    keys = [stage_keys(point.config) for point in sweep_points(resolve_paths(config), {"lambda_g": [50, 100]})]
    assert out["computed"]["ingest"] == [keys[0]["ingest"]]
    assert out["computed"]["preprocess"] == [keys[0]["preprocess"]]
    assert out["computed"]["graph"] == [keys[0]["graph"]] and keys[0]["graph"] == keys[1]["graph"]
    assert sorted(out["computed"]["model"]) == sorted(k["model"] for k in keys)
    assert len(completed(store, "preprocess")) == len(completed(store, "graph")) == 1
    assert len(completed(store, "model")) == 2

    # One row per value, every metric, consistent with the store.
    rows = out["rows"]
    assert [row["train.model.lambda_g"] for row in rows] == [50, 100]
    for row, k in zip(rows, keys):
        assert set(ROW_COLUMNS) <= set(row)
        history = open_model(store, k["model"])["history"]
        assert row["total"] == history[-1]["total"] and row["outer_iterations"] == 3
        assert row["lambda_g"] == row["train.model.lambda_g"]
        assert 0 <= row["accuracy_mean"] <= 1 and 0 <= row["baseline_mean"] <= 1
        assert row["chance"] == pytest.approx(1 / N_GENRES)
        assert row["graph_weighted"] > 0 and row["train_seconds"] > 0 and row["inner_codes"] > 0
    assert rows[0]["baseline_mean"] == rows[1]["baseline_mean"]  # one baseline: the same frames
    with open(out["csv"], newline="") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 2 and list(table[0]) == list(rows[0])
    assert float(table[1]["accuracy_mean"]) == pytest.approx(rows[1]["accuracy_mean"])
    for name in ("metrics_png", "atoms_png", "convergence_png"):
        assert_png(out[name])
    group = sae_store.stage_group(store, "sweep", out["key"], mode="r")
    assert sae_store.is_complete(store, "sweep", out["key"]) and len(group.attrs["rows"]) == 2
    assert "| 50 |" in Path(out["markdown"]).read_text()

    # A second sweep on the same store, from the command line: only what changed is computed.
    before = {stage: completed(store, stage) for stage in ("ingest", "preprocess", "graph")}
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    result = CliRunner().invoke(app, ["sweep", "--config", str(config_file), "--param", "lambda_d",
                                      "--values", "5,10", "--param", "lambda_g", "--values", "100", "--json"])
    assert result.exit_code == 0, result.output
    second = json.loads(result.stdout)
    assert second["computed"]["ingest"] == second["computed"]["preprocess"] == second["computed"]["graph"] == []
    assert len(second["computed"]["model"]) == 1  # lambda_d = 10, lambda_g = 100 is the first sweep's model
    assert {stage: completed(store, stage) for stage in before} == before
    assert second["rows"][1]["total"] == rows[1]["total"]
