"""The ``sae`` command: configuration checks before any work, help texts."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from typer.testing import CliRunner

from flows._cli_config import build_config
from flows.cli import USAGE_ERROR, app
from sae.config import PIPELINE_DEFAULTS, ModelConfig, PipelineConfig

COMMANDS = ("run", "ingest", "graph", "train", "classify")


@pytest.fixture
def runner():
    return CliRunner()


def _fails_before_work(runner, args, tmp_path, *needles):
    """The command exits with USAGE_ERROR, names the problem, and leaves no store behind."""
    store = tmp_path / "never.zarr"
    result = runner.invoke(app, [*args, "--store", str(store)])
    assert result.exit_code == USAGE_ERROR, result.output
    for needle in needles:
        assert needle in result.output
    assert not store.exists() and not (tmp_path / "never-data").exists()
    return result


@pytest.mark.parametrize("command", COMMANDS)
def test_unknown_key_in_config_file_fails_before_work(runner, tmp_path, command):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"train": {"model": {"n_atom": 16}}}))
    _fails_before_work(runner, [command, "--config", str(path)], tmp_path, "train.model.n_atom", "unknown key")


def test_negative_lambda_fails_before_work_in_toml_and_set(runner, tmp_path):
    path = tmp_path / "config.toml"
    path.write_text("[train.model]\nlambda_g = -1.0\n")
    _fails_before_work(runner, ["run", "--config", str(path)], tmp_path, "train.model.lambda_g", "greater than or equal to 0")
    _fails_before_work(runner, ["train", "--set", "train.model.lambda_z=-0.5"], tmp_path, "train.model.lambda_z")


def test_missing_data_folder_fails_before_work(runner, tmp_path):
    missing = tmp_path / "no-such-gtzan"
    result = _fails_before_work(runner, ["run", "--data", str(missing)], tmp_path, "ingest.data", str(missing))
    assert "no such path" in result.output


def test_more_frames_than_a_clip_has_fails_before_work(runner, tmp_path):
    _fails_before_work(runner, ["run", "--set", "ingest.cqt.clip_samples=44100", "--set", "ingest.dataset.duration=2"],
                       tmp_path, "preprocess.frames_per_clip", "got 298")


def test_other_configuration_errors_name_the_option(runner, tmp_path):
    _fails_before_work(runner, ["run", "--cluster", "8786"], tmp_path, "cluster", "'8786'")
    _fails_before_work(runner, ["run", "--config", str(tmp_path / "absent.yaml")], tmp_path, "--config", "absent.yaml")
    _fails_before_work(runner, ["run", "--set", "train.model.n_atoms"], tmp_path, "--set", "section.field=value")
    bad = tmp_path / "bad.ini"
    bad.write_text("[train]\n")
    _fails_before_work(runner, ["run", "--config", str(bad)], tmp_path, ".yaml", ".toml")


def test_experiment_arguments_fail_before_work(runner, tmp_path):
    _fails_before_work(runner, ["experiment", "--noise", "0,-0.1"], tmp_path, "--noise", "'0,-0.1'")
    _fails_before_work(runner, ["experiment", "--noise", "a,b"], tmp_path, "--noise")
    _fails_before_work(runner, ["experiment", "--lambda-g", "0"], tmp_path, "--lambda-g", "> 0")
    _fails_before_work(runner, ["experiment", "--set", "train.model.n_atom=3"], tmp_path, "unknown key")


@pytest.mark.parametrize("command", (None, *COMMANDS, "config"))
def test_help(runner, command):
    result = runner.invoke(app, ["--help"] if command is None else [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output
    if command is not None and command != "config":
        for option in ("--config", "--data", "--store", "--cluster", "--set"):
            assert option in result.output
    # Flags are flags: no value shown after them.
    assert "<bool>" not in result.output and "BOOLEAN" not in result.output
    flags = re.findall(r"^\s+(--(?:force|strict|no-wait|json|help))\b(.*)$", result.output, re.MULTILINE)
    assert flags and all(not rest.strip().startswith("<") for _, rest in flags), flags


def test_config_command_round_trips_and_layers_sources(runner, tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"train": {"model": {"n_atoms": 16}}, "classify": {"n_repeats": 2}}))
    result = runner.invoke(
        app, ["config", "--json", "--config", str(path), "--set", "classify.n_repeats=3", "--store", "x.zarr"]
    )
    assert result.exit_code == 0, result.output
    config = PipelineConfig.model_validate(json.loads(result.output))
    assert config.train.model.n_atoms == 16  # from the file
    assert config.classify.n_repeats == 3  # --set wins over the file
    assert config.ingest.store == "x.zarr"  # the option wins over both
    # Fields the file does not give keep the pipeline's defaults, then the model's.
    assert config.train.model.lambda_g == PIPELINE_DEFAULTS["train"]["model"]["lambda_g"]
    assert config.train.model.lambda_d == ModelConfig().lambda_d
    # The printed YAML is itself a valid --config giving the same configuration.
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(runner.invoke(app, ["config", "--config", str(path)]).output)
    assert build_config(dumped) == build_config(path)
    # ... in which the model of the inductive protocol follows train.model when it is edited.
    edited = yaml.safe_load(dumped.read_text())
    edited["train"]["model"]["n_atoms"] = 24
    dumped.write_text(yaml.safe_dump(edited))
    assert build_config(dumped).classify.model.n_atoms == 24


def test_presets_and_the_built_in_sizing(tmp_path):
    from sae.config import BUILTIN_SIZING, PRESETS

    builtin = build_config()
    assert builtin.preset == "default"
    assert builtin.preprocess.frames_per_clip == BUILTIN_SIZING["preprocess"]["frames_per_clip"]
    assert builtin.ingest.cqt.clip_samples == BUILTIN_SIZING["ingest"]["cqt"]["clip_samples"]
    assert builtin.preprocess.compression == PRESETS["default"]["preprocess"]["compression"]
    # A user's folder: no demo sizing, every clip whole, the preset's recipe.
    (tmp_path / "music" / "rock").mkdir(parents=True)
    user = build_config(data=str(tmp_path / "music"))
    assert user.preprocess.frames_per_clip is None and user.ingest.cqt.clip_samples == 660000
    assert user.train.model.n_atoms == PRESETS["default"]["train"]["model"]["n_atoms"]
    # The sparsity measured best differs: nearly dense codes on real music, lambda_z = 1 on the built-in data.
    assert (user.train.model.lambda_z, builtin.train.model.lambda_z) == (0.03, 1.0)
    assert user.train.model.rtol == builtin.train.model.rtol == 1e-3
    assert user.classify.classifier == builtin.classify.classifier == "ridge"
    # The thesis's settings, its protocol and its classifier; anything given still wins.
    thesis = build_config(preset="thesis", data=str(tmp_path / "music"), overrides=["classify.n_repeats=2"])
    assert (thesis.classify.protocol, thesis.classify.classifier, thesis.classify.pooling) == ("thesis", "svc",
                                                                                               ("sum_abs",))
    assert (thesis.train.model.fista_restart, thesis.train.model.rtol, thesis.preprocess.frames_per_clip) == (
        False, 1e-5, 298)
    assert thesis.preprocess.compression == "none" and thesis.classify.n_repeats == 2
    assert PipelineConfig.model_validate(thesis.model_dump(mode="json")) == thesis  # a dumped preset round-trips


def test_an_unreachable_cluster_fails_at_once_before_any_work(runner, tmp_path):
    import time

    start = time.monotonic()
    result = _fails_before_work(runner, ["run", "--cluster", "tcp://127.0.0.1:1"], tmp_path,
                                "error: cannot reach the Dask scheduler at tcp://127.0.0.1:1")
    assert time.monotonic() - start < 30
    assert len(result.output.strip().splitlines()) == 1  # one line, no traceback


@pytest.mark.parametrize("command", ["graph", "train", "classify"])
def test_a_stage_without_its_store_or_inputs_fails_before_work(runner, tmp_path, command):
    from sae import store as sae_store
    from sae.config import CQTConfig

    _fails_before_work(runner, [command], tmp_path, f"error: no store at '{tmp_path / 'never.zarr'}'")
    (tmp_path / "file.zarr").write_text("not a store")
    result = runner.invoke(app, [command, "--store", str(tmp_path / "file.zarr")])
    assert result.exit_code == USAGE_ERROR and "is a file, not a store directory" in result.output
    # A store whose ingestion never ran: the stage names what to run first.
    sae_store.create_store(tmp_path / "empty.zarr", CQTConfig(clip_samples=22050), [("a/x", "x.wav", "a")], 1)
    result = runner.invoke(app, [command, "--store", str(tmp_path / "empty.zarr")])
    assert result.exit_code == USAGE_ERROR, result.output
    assert "holds no complete ingestion: run the ingest stage first" in result.output


def test_a_store_of_another_layout_fails_before_work(runner, tmp_path):
    import zarr

    old = zarr.open_group(str(tmp_path / "old.zarr"), mode="w", zarr_format=3)
    old.attrs["sae_layout"] = 1
    result = runner.invoke(app, ["run", "--store", str(tmp_path / "old.zarr")])
    assert result.exit_code == USAGE_ERROR
    assert "has layout version 1" in result.output and "sae run --force" in result.output


def test_verify_of_no_store_is_a_usage_error(runner, tmp_path):
    result = runner.invoke(app, ["verify", "--store", str(tmp_path / "none.zarr")])
    assert result.exit_code == USAGE_ERROR and "no sae store at" in result.output
