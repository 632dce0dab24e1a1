"""The deployments: their parameters, and every one of them run on real local services.

The integration test starts, on 127.0.0.1 and through ``deploy/cluster.py``, a Prefect
server, a Dask scheduler with 2 workers and a Prefect process worker; registers
``deploy/prefect.yaml``; starts every deployment with ``prefect deployment run`` as a user
would (the pipeline on one store; the four stages, one after the other, on another; then a
sweep on the first), polls each to Completed, and checks through the Prefect API what a user
sees in the UI: the run names and tags, figures inside the artifacts, progress artifacts
at 100 %, also for the steps that ran on the Dask workers.  Between the pipeline and the
sweep, ``sae classify --cluster`` shows the workers' progress and the address of the Dask
dashboard, whose pages answer.  A deployment is added to the test by a line of ``plan``.
"""

from __future__ import annotations

import base64
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

from sae import store as sae_store
from sae.config import PipelineConfig
from sae.preprocess import open_preprocessed
from sae.stages import STAGES
from sae.store.keys import stage_keys
from sae.sweep import sweep_points

REPOSITORY = Path(__file__).resolve().parents[1]
PREFECT_FILE = REPOSITORY / "deploy" / "prefect.yaml"
TERMINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
PNG = re.compile(r"!\[[^\]]*\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)")


def deployments() -> list[dict]:
    return yaml.safe_load(PREFECT_FILE.read_text())["deployments"]


def _flow_of(entrypoint: str):
    """The module of a module-path entrypoint and the object it names."""
    import importlib

    module_name, name = entrypoint.split(":")
    module = importlib.import_module(module_name)
    return module, getattr(module, name)


def test_deployments_are_importable_flows_whose_form_starts_from_the_defaults_of_sae_run():
    from prefect import Flow
    from prefect.utilities.callables import parameter_schema

    for deployment in deployments():
        parameters = deployment.get("parameters", {})
        if deployment["flow_name"] == "predict":  # paths only, relative; the model folder is the run's to give
            assert set(parameters) < set(inspect.signature(_flow_of(deployment["entrypoint"])[1].fn).parameters)
            assert "model" not in parameters
            assert not any(Path(path).is_absolute() for path in parameters.values())
        assert deployment["work_pool"]["name"] == "sae-process"
        # A module path, so that Dask workers import the flow under the same name as the flow run.
        assert re.fullmatch(r"[a-z_]+(\.[a-z_]+)+:[a-z_]+", deployment["entrypoint"]), deployment["entrypoint"]
        module, flow = _flow_of(deployment["entrypoint"])
        assert isinstance(flow, Flow) and flow.name == deployment["flow_name"]
        assert flow.fn.__module__ == module.__name__
        # No deployment overrides `config`: the form starts from the flow's default, `sae run`'s own.
        assert "config" not in parameters
        schema = parameter_schema(flow).model_dump()
        if "config" in schema["properties"]:
            assert schema["properties"]["config"]["default"] == PipelineConfig().model_dump(mode="json")
        for definition in schema.get("definitions", {}).values():
            assert ">>>" not in definition.get("description", "") and len(definition["description"]) < 120
        if "parameters" in parameters:  # a sweep: every point of its grid is a valid configuration
            assert len(sweep_points(PipelineConfig(), parameters["parameters"])) >= 2
        if flow.name == "pipeline-stage":
            assert parameters["stage"] in STAGES and parameters["stage"] in deployment["tags"]
    names = {(d["flow_name"], d["name"]) for d in deployments()}
    assert {("pipeline", "sae"), ("sweep", "sweep"), ("predict", "predict"),
            *(("pipeline-stage", stage) for stage in STAGES)} <= names


def _run(argv: list[str], env: dict[str, str], timeout: float = 180) -> str:
    result = subprocess.run(argv, cwd=REPOSITORY, env=env, capture_output=True, text=True, timeout=timeout,
                            check=False)
    assert result.returncode == 0, f"{argv} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _tiny(store: Path) -> dict:
    """8 clips of 2 s, 4 atoms, 2 outer iterations, 2 folds: what a user would type in the form."""
    return {
        "ingest": {"store": str(store), "chunk_clips": 4, "cqt": {"clip_samples": 44100},
                   "dataset": {"n_genres": 2, "clips_per_genre": 4, "duration": 2.0}},
        "preprocess": {"frames_per_clip": None},
        "graph": {"n_neighbors": 5, "block_size": 256},
        "train": {"model": {"n_atoms": 4, "max_outer": 2, "max_inner": 20}, "block_size": 256},
        "classify": {"n_windows": 2, "n_splits": 2, "n_repeats": 1, "classifier": "ridge"},
    }


class Runs:
    """Deployment runs started with ``prefect deployment run`` (and commands), each once the one it waits for is done."""

    def __init__(self, client, env: dict[str, str]):
        self.client, self.env = client, env
        self.ids: dict[str, str] = {}
        self.commands: dict[str, subprocess.Popen] = {}
        self.done_after: dict[str, float] = {}

    def start(self, label: str, deployment: str | list[str], parameters: dict | Path) -> None:
        """A deployment run with these parameters, or a command (``deployment``) writing to ``parameters``."""
        if isinstance(deployment, list):
            with open(parameters, "w") as output:
                self.commands[label] = subprocess.Popen(deployment, cwd=REPOSITORY, env=self.env, stdout=output,
                                                        stderr=subprocess.STDOUT, text=True)
            return
        output = _run([sys.executable, "-m", "prefect", "deployment", "run", deployment,
                       "--params", json.dumps(parameters)], self.env)
        self.ids[label] = re.search(r"UUID:\s*([0-9a-f-]{36})", output).group(1)

    def state(self, label: str) -> str:
        if label in self.commands:
            code = self.commands[label].poll()
            return "RUNNING" if code is None else "COMPLETED" if code == 0 else "FAILED"
        return self.client.read_flow_run(self.ids[label]).state.type.value

    def drive(self, plan: list[tuple[str, str | None, str | list[str], dict | Path]], timeout: float) -> None:
        """Start every ``(label, after, deployment, parameters)`` once ``after`` is Completed; wait for them all."""
        pending = list(plan)
        began = time.monotonic()
        while True:
            for item in list(pending):
                label, after, deployment, parameters = item
                if after is None or after in self.done_after:
                    self.start(label, deployment, parameters)
                    pending.remove(item)
            states = {label: self.state(label) for label in [*self.ids, *self.commands]}
            for label, state in states.items():
                if state == "COMPLETED":
                    self.done_after.setdefault(label, time.monotonic() - began)
            failed = {label: state for label, state in states.items() if state in TERMINAL_STATES - {"COMPLETED"}}
            assert not failed, f"{failed}:\n" + "\n".join(self.logs(label) for label in failed if label in self.ids)
            if not pending and all(state == "COMPLETED" for state in states.values()):
                return
            assert time.monotonic() - began < timeout, f"not done in {timeout:.0f} s: {states}, waiting: {pending}"
            time.sleep(1)

    def tree(self, label: str) -> list:
        """The flow run and its sub-flow runs, recursively."""
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

        found, parents = [self.client.read_flow_run(self.ids[label])], [self.ids[label]]
        while parents:
            children = self.client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=parents)))
            found += children
            parents = [child.id for child in children]
        return found

    def artifacts(self, label: str) -> list:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        runs = [run.id for run in self.tree(label)]
        return self.client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=runs)))

    def logs(self, label: str) -> str:
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

        runs = [run.id for run in self.tree(label)]
        messages: list[str] = []
        while True:  # 200 at a time, the API's most
            page = self.client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=runs)),
                                         limit=200, offset=len(messages))
            messages += [entry.message for entry in page]
            if len(page) < 200:
                return "\n".join(messages)


def _images(markdown: str) -> list[bytes]:
    """The PNGs inside a markdown artifact (data URIs), decoded."""
    images = [base64.b64decode(data) for data in PNG.findall(markdown)]
    assert all(image.startswith(b"\x89PNG\r\n\x1a\n") and len(image) > 5000 for image in images)
    return images


@pytest.mark.integration
@pytest.mark.slow
def test_every_deployment_runs_on_the_cluster_and_shows_figures_and_progress(tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    state = tmp_path / "state"
    env = dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
               PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT="false",
               PREFECT_WORKER_QUERY_SECONDS="1")  # the process worker looks for new runs every second
    env.pop("PREFECT_API_URL", None)
    start = [sys.executable, "deploy/cluster.py", "start", "--state", str(state), "--ports", "auto",
             "--workers", "2", "--prefect-worker", "--pool", "sae-process", "--owner-pid", str(os.getpid())]
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
        # The UI asks the server it is served by for its data, whatever the port.
        assert _get(api.removesuffix("/api") + "/ui-settings")["api_url"] == api
        # The Dask dashboard works (bokeh is installed), on 127.0.0.1.
        dashboard = info["dask_dashboard_url"]
        assert dashboard.startswith("http://127.0.0.1:") and "Bokeh" in _text(dashboard)
        assert "Bokeh" in _text(dashboard.replace("/status", "/tasks"))
        # The workers allocate arrays up to 32 MiB on the heap, beside Dask's trim threshold (HEAP_ARRAYS).
        from distributed import Client

        with Client(dask_address, timeout=30) as client:
            environments = client.run(lambda: {key: os.environ.get(key) for key in
                                               ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")})
        assert len(environments) == 2 and all(found == {"MALLOC_MMAP_THRESHOLD_": "33554432",
                                                        "MALLOC_TRIM_THRESHOLD_": "65536"}
                                              for found in environments.values()), environments

        _run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all", "--prefect-file",
              str(PREFECT_FILE.relative_to(REPOSITORY))], env)
        a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
        config_a, config_b = _tiny(a), _tiny(b)  # no `cluster`: the worker's SAE_DASK_ADDRESS is the default
        sweep = {"train.model.n_atoms": [4, 3]}  # 4 is the pipeline's model, reused
        model, new = Path(f"{a}-models") / stage_keys(PipelineConfig.model_validate(config_a))["model"], tmp_path / "new.zarr"
        # The command on the cluster, not a terminal: a classification of store a with 3 folds (one writer per
        # store: between the pipeline and the sweep, while the stages of store b run).
        command_config = tmp_path / "classify.yaml"
        command_config.write_text(yaml.safe_dump({**config_a, "classify": {**config_a["classify"], "n_splits": 3}}))
        command = [sys.executable, "-m", "flows.cli", "classify", "--config", str(command_config),
                   "--cluster", dask_address]
        plan = [("pipeline", None, "pipeline/sae", {"config": config_a}),
                *((stage, previous, f"pipeline-stage/{stage}", {"stage": stage, "config": config_b})
                  for previous, stage in zip((None, *STAGES), STAGES)),
                ("command", "pipeline", command, tmp_path / "command.txt"),
                ("sweep", "command", "sweep/sweep", {"config": config_a, "parameters": sweep}),
                # The model the pipeline exported, on the clips it was trained on, through the predict deployment.
                ("predict", "pipeline", "predict/predict", {"model": str(model), "data": str(tmp_path / "a-data"),
                                                            "out": str(new), "cluster": dask_address})]
        with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            runs = Runs(client, env)
            runs.drive(plan, timeout=480)
            print("completed after (s):", {label: round(seconds) for label, seconds in runs.done_after.items()})
            for label in runs.ids:
                assert f"tasks on {dask_address}" in runs.logs(label) or label == "sweep", label
            check_pipeline_run(runs, PipelineConfig.model_validate(config_a), dask_address)
            check_stage_runs(runs, PipelineConfig.model_validate(config_b))
            check_sweep_run(runs, PipelineConfig.model_validate(config_a), dask_address)
            check_predict_run(runs, new)
        # The command showed the workers' progress as plain lines, the dashboard's address, one accuracy table.
        output = (tmp_path / "command.txt").read_text()
        assert f"Dask dashboard: {dashboard}" in output
        for name in ("baseline", "sae"):
            assert f"classify {name}: 3/3 splits" in output, output
        assert output.count("| features |") == 1 and "━" not in output
        assert "| INFO    | sae.classify - " in output and "protocol (grouped by " in output, output  # from a worker
    finally:
        subprocess.run([sys.executable, "deploy/cluster.py", "stop", "--state", str(state)], cwd=REPOSITORY,
                       env=env, capture_output=True, timeout=120, check=False)
    # Prefect server, scheduler, 2 workers, Prefect worker, and the watcher of --owner-pid: all stopped.
    assert len(started) == 6 and not any(_alive(pid) for pid in started)


def check_predict_run(runs: Runs, out: Path) -> None:
    """The predict deployment's run: every clip classified, its table an artifact of the run, the CSV beside the store."""
    table = next(a for a in runs.artifacts("predict") if (a.key or "").startswith("predict-"))
    assert table.type == "markdown" and "8 of 8 clips classified" in table.data, table.data
    assert list(Path(f"{out}-reports").glob("predict-*.csv"))


def check_pipeline_run(runs: Runs, config: PipelineConfig, dask_address: str) -> None:
    """Names, tags, figures and progress of the pipeline's run and its stages' sub-flow runs."""
    keys = stage_keys(config)
    store = config.ingest.store
    for stage, key in (("ingest", "ingest"), ("preprocess", "preprocess"), ("graph", "graph"),
                       ("model", "model"), ("results", "results")):
        assert sae_store.is_complete(store, stage, keys[key]), stage
    assert len(sae_store.ok_clips(sae_store.open_store(store))) == 8

    tree = {run.name: run for run in runs.tree("pipeline")}
    assert {"pipeline-a.zarr", "ingest-a.zarr", f"graph-{keys['graph']}", f"train-{keys['model']}",
            f"classify-{keys['results']}"} == set(tree)
    for name, run in tree.items():
        stage = name.split("-")[0]
        assert stage == "pipeline" or {"sae", stage} <= set(run.tags), (name, run.tags)
    logs = runs.logs("pipeline")
    assert f"kNN (exact, euclidean) on distributed {dask_address}" in logs  # the steps below ran on the workers
    assert f"training on {dask_address}" in logs
    # The library's own lines from the tasks on the workers: the training's and the classification's.
    assert "||L||_2 = " in logs and "trained in " in logs and "protocol (grouped by " in logs, logs

    artifacts = {artifact.key: artifact for artifact in runs.artifacts("pipeline")}
    # Figures: the classification report holds its figure, whose file is beside the store too.
    report = artifacts[f"classify-{keys['results']}"]
    assert report.flow_run_id == tree[f"classify-{keys['results']}"].id
    (figure,) = _images(report.data)
    png = Path(f"{store}-reports") / f"classify-{keys['results']}.png"
    assert figure == png.read_bytes()
    assert f"]({png.name})" in (png.parent / f"classify-{keys['results']}.md").read_text()
    assert len(_images(artifacts[f"model-{keys['model']}"].data)) == 2  # convergence, atoms
    assert len(_images(artifacts["pipeline-summary"].data)) == 1
    # Progress: every step reached 100 %; the kNN, the training and the splits ran on Dask workers.
    progress = {key: artifact for key, artifact in artifacts.items() if artifact.type == "progress"}
    assert set(progress) == {"progress-ingest", "progress-knn", f"progress-train-{keys['model']}",
                             "progress-classify-baseline", "progress-classify-sae"}, [
        line for line in logs.splitlines() if "progress artifact" in line]  # why one is missing, if one is
    for key, artifact in progress.items():
        assert float(artifact.data) == 100.0, (key, artifact.data, artifact.description)
    assert progress["progress-ingest"].description.startswith("ingest: 8/8 clips (batch ")
    assert progress[f"progress-train-{keys['model']}"].description.startswith(
        f"train {keys['model']}: 2/2 outer iterations (objective ")
    n_rows = open_preprocessed(store, keys["preprocess"])["X"].shape[0]
    n_blocks = -(-n_rows // config.graph.block_size)
    n_steps = n_blocks * (n_blocks + 1)  # blocked search: B builds (or B^2 tiles), B own lists (or merges), B(B-1) folds
    assert n_blocks > 1 and progress["progress-knn"].description == f"knn: {n_steps}/{n_steps} steps"
    assert progress["progress-classify-sae"].description == "classify sae: 2/2 splits"
    for key in ("progress-knn", f"progress-train-{keys['model']}", "progress-classify-sae"):
        assert progress[key].task_run_id is not None  # written by the task, on its Dask worker


def check_stage_runs(runs: Runs, config: PipelineConfig) -> None:
    """Each stage deployment computed its stage of store b, in its own tagged run."""
    keys = stage_keys(config)
    for stage, (group, key) in zip(STAGES, (("ingest", "ingest"), ("graph", "graph"), ("model", "model"),
                                           ("results", "results"))):
        assert sae_store.is_complete(config.ingest.store, group, keys[key]), stage
        run = runs.client.read_flow_run(runs.ids[stage])
        assert run.name == f"stage-{stage}-b.zarr" and stage in run.tags
        assert not [s for s in runs.logs(stage).splitlines() if ": skipped" in s], stage  # it did the work


def check_sweep_run(runs: Runs, config: PipelineConfig, dask_address: str) -> None:
    """The sweep ran its trainings on the cluster; its report holds its three figures, its table is rounded."""
    run = runs.client.read_flow_run(runs.ids["sweep"])
    assert run.name == "sweep-n_atoms"
    tree = runs.tree("sweep")
    assert {"sweep-stages-n_atoms"} <= {child.name for child in tree}
    logs = runs.logs("sweep")
    assert f"on {dask_address}" in logs and f"training on {dask_address}" in logs
    artifacts = runs.artifacts("sweep")
    (report,) = [artifact for artifact in artifacts if artifact.type == "markdown"]
    assert len(_images(report.data)) == 3  # metrics, convergence, atoms
    (table,) = [artifact for artifact in artifacts if artifact.type == "table"]
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert [row["n_atoms"] for row in rows] == [4, 3]
    for row in rows:
        for name in ("accuracy (%)", "baseline (%)", "chance (%)"):
            assert row[name] == round(row[name], 1)
    trained = {a.key.removeprefix("progress-train-"): a for a in artifacts if a.key.startswith("progress-train-")}
    keys = [stage_keys(point.config)["model"] for point in sweep_points(config, {"n_atoms": [4, 3]})]
    every = [(a.key, a.data, a.description, str(a.created), str(a.task_run_id)) for a in artifacts
             if a.key and a.key.startswith("progress-train-")]  # said when it fails: which one, and any duplicate
    assert set(trained) == set(keys) and all(float(a.data) == 100.0 for a in trained.values()), every
    assert trained[keys[0]].description.endswith("(trained before)")  # the pipeline's model
    assert "2/2 outer iterations (objective" in trained[keys[1]].description


@pytest.mark.integration
def test_services_stop_themselves_when_their_owner_process_is_killed(tmp_path):
    """`start --owner-pid`: a test run (or a script) killed before its teardown leaves no service behind."""
    state = tmp_path / "state"
    env = dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    env.pop("PREFECT_API_URL", None)
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        output = _run([sys.executable, "deploy/cluster.py", "start", "--state", str(state), "--ports", "auto",
                       "--workers", "1", "--owner-pid", str(owner.pid)], env)
        info = json.loads(output[: output.rindex("}") + 1])
        names = {path.stem for path in (state / "pids").glob("*.pid")}
        assert info["owner_pid"] == owner.pid
        assert names == {"owner-watch", "prefect-server", "dask-scheduler", "dask-worker-0"}, names
        pids = _pids(state)
        time.sleep(2.0)
        assert all(_alive(pid) for pid in pids)  # the owner lives: everything keeps running
        owner.kill()
        owner.wait()
        deadline = time.monotonic() + 60
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not [pid for pid in pids if _alive(pid)], (state / "logs" / "owner-watch.log").read_text()
        assert "owner process" in (state / "logs" / "owner-watch.log").read_text()
        assert _run([sys.executable, "deploy/cluster.py", "status", "--state", str(state)], env).strip() == (
            "nothing running")
    finally:
        owner.kill()
        _run([sys.executable, "deploy/cluster.py", "stop", "--state", str(state)], env)


def _get(url: str) -> object:
    return json.loads(_text(url))


def _text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200, url
        return response.read().decode(errors="replace")


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
