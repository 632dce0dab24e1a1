"""The deployments: their default parameters, and a pipeline run triggered on real local services.

The integration test starts, on 127.0.0.1 and through ``deploy/cluster.py``, a Prefect
server, a Dask scheduler with 2 workers and a Prefect process worker; registers
``deploy/prefect.yaml``; triggers the pipeline deployment as the UI would (a flow run
with parameters, through the API); waits for it; checks the store; stops everything.
"""

from __future__ import annotations

import inspect
import ipaddress
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from flows.pipeline import STAGES, stage_keys
from flows.predict import predict_flow
from sae import store as sae_store
from sae.config import PipelineConfig
from sae.sweep import sweep_points

REPOSITORY = Path(__file__).resolve().parents[1]
PREFECT_FILE = REPOSITORY / "deploy" / "prefect.yaml"
TERMINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def deployments() -> list[dict]:
    return yaml.safe_load(PREFECT_FILE.read_text())["deployments"]


def test_deployment_parameters_validate_against_the_config_models():
    found = {}
    for deployment in deployments():
        parameters = deployment["parameters"]
        if deployment["flow_name"] == "predict":  # paths only; the model folder is the run's to give
            assert set(parameters) < set(inspect.signature(predict_flow.fn).parameters) - {"model"}
            assert not any(Path(path).is_absolute() for path in parameters.values())
            found[("predict", None)] = deployment["entrypoint"]
            continue
        config = PipelineConfig.model_validate(parameters["config"])
        assert not Path(config.ingest.store).is_absolute()  # relative to the repository
        found[(deployment["flow_name"], parameters.get("stage"))] = deployment["entrypoint"]
        assert deployment["work_pool"]["name"] == "sae-process"
        if "parameters" in parameters:  # a sweep: every point of its grid is a valid configuration
            assert len(sweep_points(config, parameters["parameters"])) >= 2
    assert found == {("pipeline", None): "flows/pipeline.py:pipeline_flow",
                     **{("pipeline-stage", stage): "flows/pipeline.py:stage_flow" for stage in STAGES},
                     ("sweep", None): "flows/sweep.py:sweep_flow", ("predict", None): "flows/predict.py:predict_flow"}
    for entrypoint in set(found.values()):
        path, name = entrypoint.split(":")
        assert f"def {name}(" in (REPOSITORY / path).read_text()


def _run(argv: list[str], env: dict[str, str], timeout: float = 180) -> str:
    result = subprocess.run(argv, cwd=REPOSITORY, env=env, capture_output=True, text=True, timeout=timeout,
                            check=False)
    assert result.returncode == 0, f"{argv} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _api(url: str, payload: dict | None = None) -> object:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _wait(api: str, flow_run_id: str, seconds: float) -> dict:
    """The flow run once it is in a terminal state, or after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        run = _api(f"{api}/flow_runs/{flow_run_id}")
        if run["state_type"] in TERMINAL_STATES or time.monotonic() > deadline:
            return run
        time.sleep(2)


def _flow_run_logs(api: str, flow_run_id: str) -> str:
    logs = _api(f"{api}/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200})
    return "\n".join(entry["message"] for entry in logs)


@pytest.mark.integration
@pytest.mark.slow
def test_pipeline_deployment_runs_on_local_services(tmp_path):
    state = tmp_path / "state"
    env = dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
               PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT="false")
    env.pop("PREFECT_API_URL", None)
    start = [sys.executable, "deploy/cluster.py", "start", "--state", str(state), "--ports", "auto",
             "--workers", "2", "--prefect-worker", "--pool", "sae-process"]
    started: list[int] = []
    try:
        output = _run(start, env, timeout=300)
        started = _pids(state)
        listening = _listening(started)
        assert listening and all(ipaddress.ip_address(ip).is_loopback for ip, _ in listening), listening
        info = json.loads(output[: output.rindex("}") + 1])
        api, dask_address = info["prefect_api_url"], info["dask_address"]
        assert api.startswith("http://127.0.0.1:") and dask_address.startswith("tcp://127.0.0.1:")
        env["PREFECT_API_URL"] = api
        env["PREFECT_HOME"] = str(state / "client-home")

        _run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all", "--prefect-file",
              str(PREFECT_FILE.relative_to(REPOSITORY))], env)
        names = {d["name"] for d in _api(f"{api}/deployments/filter", {})}
        assert {"sae", *STAGES, "predict"} <= names

        # What the UI sends: the deployment's parameters with the form's changes.
        store = tmp_path / "tiny.zarr"
        config = {
            "ingest": {"store": str(store), "chunk_clips": 4, "cqt": {"clip_samples": 44100},
                       "dataset": {"n_genres": 2, "clips_per_genre": 4, "duration": 2.0}},
            "preprocess": {"frames_per_clip": None},
            "graph": {"n_neighbors": 5, "block_size": 256},
            "train": {"model": {"n_atoms": 4, "max_outer": 2, "max_inner": 20}, "block_size": 256},
            "classify": {"n_windows": 2, "n_splits": 2, "n_repeats": 1, "classifier": "ridge"},
            "cluster": dask_address,
        }
        output = _run([sys.executable, "-m", "prefect", "deployment", "run", "pipeline/sae",
                       "--params", json.dumps({"config": config})], env)
        flow_run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", output).group(1)

        run = _wait(api, flow_run_id, 420)
        logs = _flow_run_logs(api, flow_run_id)
        assert run["state_type"] == "COMPLETED", f"flow run {run['state_type']}:\n{logs}"
        assert f"tasks on {dask_address}" in logs

        # The store holds every stage's complete result for this configuration.
        keys = stage_keys(PipelineConfig.model_validate(config))
        for stage, key in (("ingest", "ingest"), ("preprocess", "preprocess"), ("graph", "graph"),
                           ("model", "model"), ("results", "results")):
            assert sae_store.is_complete(str(store), stage, keys[key]), stage
        assert len(sae_store.ok_clips(sae_store.open_store(str(store)))) == 8
        assert list(Path(f"{store}-reports").glob("classify-*.md"))

        # The model the pipeline exported classifies a folder through the predict deployment, on the cluster.
        model = Path(f"{store}-models") / keys["model"]
        out = tmp_path / "new.zarr"
        params = {"model": str(model), "data": str(tmp_path / "tiny-data"), "out": str(out), "cluster": dask_address}
        output = _run([sys.executable, "-m", "prefect", "deployment", "run", "predict/predict",
                       "--params", json.dumps(params)], env)
        predict_run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", output).group(1)
        run = _wait(api, predict_run_id, 300)
        assert run["state_type"] == "COMPLETED", f"flow run {run['state_type']}:\n{_flow_run_logs(api, predict_run_id)}"
        artifacts = _api(f"{api}/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [predict_run_id]}}})
        table = next(a for a in artifacts if (a.get("key") or "").startswith("predict-"))
        assert table["type"] == "markdown" and "8 of 8 clips classified" in table["data"]
        assert list(Path(f"{out}-reports").glob("predict-*.csv"))
    finally:
        subprocess.run([sys.executable, "deploy/cluster.py", "stop", "--state", str(state)], cwd=REPOSITORY,
                       env=env, capture_output=True, timeout=120, check=False)
    assert len(started) == 5 and not any(_alive(pid) for pid in started)


def _listening(pids: list[int]) -> set[tuple[str, int]]:
    """The addresses every process of these process trees listens on."""
    import psutil

    found = set()
    for pid in pids:
        root = psutil.Process(pid)
        for member in [root, *root.children(recursive=True)]:
            found |= {(c.laddr.ip, c.laddr.port) for c in member.net_connections(kind="inet")
                      if c.status == psutil.CONN_LISTEN}
    return found


def _pids(state: Path) -> list[int]:
    return [int(path.read_text()) for path in (state / "pids").glob("*.pid")] if (state / "pids").exists() else []


def _alive(pid: int) -> bool:
    """Whether a process runs (a zombie, exited but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
