"""The ``sae`` command used as a hostile user would: concurrent runs, damaged stores, absurd audio, kills.

Every test runs the real command in its own process against real services on
127.0.0.1: a Prefect server started by ``deploy/cluster.py`` (or, where the
test is about it, the command's own temporary server) and Zarr stores on disk.
A tiny configuration of the built-in generator keeps each run to seconds.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import soundfile
import yaml

from sae import store as sae_store
from sae.config import BuiltinDatasetConfig
from sae.datasets import make_builtin_dataset

REPOSITORY = Path(__file__).resolve().parents[1]
TINY = {
    "ingest": {"chunk_clips": 4, "cqt": {"clip_samples": 66150}},
    "preprocess": {"frames_per_clip": 64},
    "graph": {"method": "exact", "n_neighbors": 5},
    "train": {"model": {"n_atoms": 8, "max_outer": 2, "max_inner": 30, "lambda_g": 10.0}, "block_size": 200},
    "classify": {"n_splits": 3, "n_repeats": 1},
}

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def sae_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", *args]


def run(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def accuracy_table(stdout: str) -> str:
    return stdout[stdout.index("| features"):].strip()


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    """A Prefect server on 127.0.0.1 from deploy/cluster.py; the environment for commands that use it."""
    state = tmp_path_factory.mktemp("services")
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPOSITORY), env.get("PYTHONPATH")]))
    started = run([sys.executable, "deploy/cluster.py", "start", "--state", str(state), "--ports", "auto",
                   "--workers", "0", "--owner-pid", str(os.getpid())], env, REPOSITORY)
    assert started.returncode == 0, started.stdout + started.stderr
    info = json.loads(started.stdout[: started.stdout.rindex("}") + 1])
    try:
        yield {**env, "PREFECT_API_URL": info["prefect_api_url"], "PREFECT_HOME": str(state / "client-home")}
    finally:
        run([sys.executable, "deploy/cluster.py", "stop", "--state", str(state)], env, REPOSITORY, timeout=120)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, services):
    """The tiny dataset, its configuration file and one undisturbed run's store and accuracy table."""
    root = tmp_path_factory.mktemp("hostile")
    make_builtin_dataset(root / "data", BuiltinDatasetConfig(n_genres=2, clips_per_genre=6, duration=3.0))
    (root / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    reference = run(sae_command("run", "-c", "tiny.yaml", "--data", "data", "--store", "reference.zarr"),
                    services, root)
    assert reference.returncode == 0, reference.stderr
    # Not a terminal: progress as plain log lines, no bars; the accuracy table once, at the end.
    assert "ingest: 12/12 clips" in reference.stderr and "classify sae: 3/3 splits" in reference.stderr
    assert "━" not in reference.stderr
    assert (reference.stdout + reference.stderr).count("| features |") == 1
    return root, accuracy_table(reference.stdout)


def test_two_concurrent_runs_on_one_new_store_both_end_well_listening_on_loopback_only(workdir, services):
    root, reference = workdir
    # Without PREFECT_API_URL: each run starts its own temporary Prefect server, whose sockets are watched too.
    env = {key: value for key, value in services.items() if key != "PREFECT_API_URL"}
    command = sae_command("run", "-c", "tiny.yaml", "--data", "data", "--store", "shared.zarr")
    runs = [psutil.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    seen: set[tuple[str, int]] = set()
    while any(process.poll() is None for process in runs):
        for process in runs:
            seen |= _listening(process)
        time.sleep(0.2)
    outputs = [process.communicate(timeout=60) for process in runs]
    assert [process.returncode for process in runs] == [0, 0], outputs
    assert sum("in use by another sae run" in err for _, err in outputs) == 1  # one waited for the other
    for out, _ in outputs:
        assert accuracy_table(out) == reference
    # the temporary Prefect servers, the Dask scheduler's and worker's HTTP servers: on 127.0.0.1 only
    assert len(seen) >= 4 and all(_loopback(ip) for ip, _ in seen), seen
    third = run(command, services, root)
    assert third.returncode == 0 and accuracy_table(third.stdout) == reference
    assert "skipped: ingest=True, graph=True, train=True, classify=True" in third.stdout
    verified = run(sae_command("verify", "--store", "shared.zarr", "--json"), services, root)
    assert verified.returncode == 0 and json.loads(verified.stdout)["intact"]


def test_a_deleted_chunk_is_reported_then_repaired_to_the_same_results(workdir, services):
    root, reference = workdir
    shutil.copytree(root / "reference.zarr", root / "damaged.zarr")
    (root / "damaged.zarr" / "frames" / "c" / "1" / "0").unlink()  # clips 4 to 7
    keys = sae_store.stages(root / "damaged.zarr")
    graph = root / "damaged.zarr" / "graph" / keys["graph"][0] / "laplacian" / "data" / "c" / "0"
    graph.unlink()  # and a chunk of the graph's Laplacian

    verified = run(sae_command("verify", "--store", "damaged.zarr"), services, root)
    assert verified.returncode == 1, verified.stdout + verified.stderr
    assert "damaged clips: 4" in verified.stdout and "chunk 1 of frames is missing from disk" in verified.stdout
    assert "classical/classical.00000" in verified.stdout  # clips 4, 5 are blues 4, 5; 6, 7 classical 0, 1
    assert "laplacian/data' has 1 of its 1 chunks missing" in verified.stdout
    report = json.loads(run(sae_command("verify", "--store", "damaged.zarr", "--json"), services, root).stdout)
    assert sorted(report["damaged"]) == ["blues/blues.00004", "blues/blues.00005", "classical/classical.00000",
                                         "classical/classical.00001"]

    repaired = run(sae_command("run", "-c", "tiny.yaml", "--data", "data", "--store", "damaged.zarr"), services, root)
    assert repaired.returncode == 0, repaired.stderr
    assert "the frames of 4 clip(s) are missing or damaged" in repaired.stderr
    assert "re-ingested, chunk 1 of frames is missing from disk: 4 clip(s): blues/blues.00004" in repaired.stdout
    assert accuracy_table(repaired.stdout) == reference
    assert run(sae_command("verify", "--store", "damaged.zarr"), services, root).returncode == 0
    for stage in ("preprocess", "model"):  # the same arrays, to the bit, as the undamaged store's
        key = keys[stage][0]
        a, b = (sae_store.stage_group(root / name, stage, key, mode="r") for name in ("reference.zarr", "damaged.zarr"))
        name = "X" if stage == "preprocess" else f"checkpoint_{a.attrs['checkpoint_slot']}/codes"
        np.testing.assert_array_equal(a[name][:], b[name][:])


def test_out_of_range_files_are_errors_and_leave_the_other_clips_alone(workdir, services):
    root, reference = workdir
    shutil.copytree(root / "data", root / "noisy-data")
    tone = 0.5 * np.sin(2 * np.pi * 220.0 * np.arange(3 * 22050) / 22050)
    soundfile.write(root / "noisy-data" / "blues" / "huge.wav", 2e30 * tone, 22050, subtype="FLOAT")
    soundfile.write(root / "noisy-data" / "classical" / "int16-scale.wav", 19600 * tone, 22050, subtype="FLOAT")
    (root / "noisy-data" / "licenses").mkdir()
    (root / "noisy-data" / "licenses" / "LICENSE.txt").write_text("CC BY 4.0\n")

    result = run(sae_command("run", "-c", "tiny.yaml", "--data", "noisy-data", "--store", "noisy.zarr"), services,
                 root)
    assert result.returncode == 0, result.stderr
    assert "label 'licenses' has no valid audio file" in result.stderr
    assert "ingest_errors: 3" in result.stdout
    group = sae_store.open_store(root / "noisy.zarr")
    table = sae_store.clip_table(group)
    kinds = {clip_id: kind for clip_id, kind in zip(table["clip_id"], table["error_kind"]) if kind}
    assert kinds == {"blues/huge": "out_of_range", "classical/int16-scale": "out_of_range",
                     "licenses/LICENSE": "unsupported"}
    keys = sae_store.stages(group)
    reference_group = sae_store.open_store(root / "reference.zarr")
    np.testing.assert_array_equal(sae_store.stage_group(group, "preprocess", keys["preprocess"][0], mode="r")["X"][:],
                                  sae_store.stage_group(reference_group, "preprocess", keys["preprocess"][0],
                                                        mode="r")["X"][:])
    summaries = [sae_store.stage_group(group, "results", key, mode="r").attrs["summaries"] for key in keys["results"]]
    baselines = [s["baseline"] for s in summaries if "baseline" in s]
    assert baselines and all(b == baselines[0] for b in baselines)
    summary = baselines[0]
    assert summary["class_names"] == ["blues", "classical"] and summary["chance"] == 0.5  # licenses is no class

    # --strict judges the clip table, also when every stage is skipped
    strict = run(sae_command("run", "-c", "tiny.yaml", "--data", "noisy-data", "--store", "noisy.zarr", "--strict"),
                 services, root)
    assert strict.returncode == 1
    assert "error: strict ingestion: 3 clip(s) in error (kinds: out_of_range, unsupported)" in strict.stderr


def _listening(process: psutil.Process) -> set[tuple[str, int]]:
    found = set()
    try:
        members = [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:  # a process of the tree ended while it was listed
        return found
    for member in members:
        try:
            found |= {(c.laddr.ip, c.laddr.port) for c in member.net_connections(kind="inet")
                      if c.status == psutil.CONN_LISTEN}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def _loopback(ip: str) -> bool:
    return ipaddress.ip_address(ip.split("%")[0]).is_loopback


def _cmdline(process: psutil.Process) -> str:
    """A process's command line; "" for one that has just ended (a zombie until its parent reaps it)."""
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def _run_into_its_work(root: Path, services: dict[str, str], store: str) -> tuple[psutil.Popen, list]:
    """`sae run` on the tiny configuration with its temporary Prefect server, 3 s into the work; the process and
    its descendants then."""
    env = {key: value for key, value in services.items() if key != "PREFECT_API_URL"}
    process = psutil.Popen(sae_command("run", "-c", "tiny.yaml", "--data", "data", "--store", store),
                           cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    started = False
    while time.monotonic() < deadline and process.poll() is None and not started:
        started = any("uvicorn" in _cmdline(child) for child in process.children(recursive=True))
        time.sleep(0.2)
    assert started, "the run started no temporary Prefect server"
    time.sleep(3)  # into the work
    assert process.poll() is None, "the run ended before it could be stopped"
    return process, process.children(recursive=True)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_or_ctrl_c_ends_a_run_at_once_with_a_message(workdir, services, signum):
    """`kill` (or Ctrl-C) stops the command within seconds, though its stage runs in threads that cannot be told
    to stop; nothing is left running and the store is free."""
    root, _ = workdir
    process, descendants = _run_into_its_work(root, services, "stopped.zarr")
    sent = time.monotonic()
    process.send_signal(signum)
    code = process.wait(30)
    stopped_after = time.monotonic() - sent
    stderr = process.stderr.read()
    expected = (143, "terminated") if signum == signal.SIGTERM else (130, "interrupted")
    assert code == expected[0], stderr
    assert f"{expected[1]}: the store keeps every completed stage; run again to resume" in stderr
    # What the stop waits for: the flow engines' reports of the crash to the server (3-8 s measured at a load
    # average of 5, 15 s at 8); an ordinary exit would wait for the running stage to end.
    assert stopped_after < 30, stopped_after
    gone, alive = psutil.wait_procs(descendants, timeout=30)
    assert not alive, [p.cmdline() for p in alive]
    with sae_store.store_lock(root / "stopped.zarr", wait=5):
        pass


def test_sigkill_of_a_run_leaves_no_process_behind(workdir, services):
    root, _ = workdir
    process, descendants = _run_into_its_work(root, services, "killed.zarr")
    os.kill(process.pid, signal.SIGKILL)
    process.wait(30)
    gone, alive = psutil.wait_procs(descendants, timeout=30)
    assert not alive, [p.cmdline() for p in alive]
    with sae_store.store_lock(root / "killed.zarr", wait=5):  # and the store is free again
        pass


def _last_checkpoint(store: Path) -> tuple[str, int | None, str | None]:
    """The model group of a store (its key), the outer iteration of its last complete checkpoint and its stop
    reason; ("", None, None) before the training wrote one."""
    import zarr

    try:
        models = zarr.open_group(store / "model", mode="r")
        key = next(iter(sorted(models.group_keys())))
        attrs = models[key].attrs.asdict()
    except (FileNotFoundError, KeyError, StopIteration, ValueError):
        return "", None, None
    return key, attrs.get("last_complete_outer"), attrs.get("stop_reason")


def _long_run_into_its_training(data: Path, store: Path, services: dict[str, str], *options: str
                                ) -> tuple[psutil.Popen, tuple[str, ...]]:
    """`sae run` of the tiny configuration with a training of 500 outer iterations, two checkpoints into its
    training; the process and the command's arguments (without ``run``)."""
    long = {**TINY, "train": {**TINY["train"], "model": {**TINY["train"]["model"], "max_outer": 500, "rtol": 1e-12}}}
    config = store.parent / f"{store.stem}.yaml"
    config.write_text(yaml.safe_dump(long))
    command = ("-c", str(config), "--data", str(data), "--store", str(store))
    process = psutil.Popen(sae_command("run", *command, *options), cwd=store.parent, env=services,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while (_last_checkpoint(store)[1] or 0) < 2:  # two outer iterations into the training
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"the training wrote no second checkpoint in time: {process.stderr.read()}")
        time.sleep(0.2)
    return process, command


def _resumes_from_its_checkpoint(command: tuple[str, ...], store: Path, outer: int, services: dict[str, str]) -> None:
    """`sae train` of the same configuration, one outer iteration more than kept, resumes from the checkpoint."""
    resumed = run(sae_command("train", *command, "--set", f"train.model.max_outer={outer + 1}"), services,
                  store.parent)
    assert resumed.returncode == 0, resumed.stderr
    assert _last_checkpoint(store)[1:] == (outer + 1, "max_outer")  # resumed from the kept checkpoint


@pytest.fixture(scope="module")
def dask_cluster(services, tmp_path_factory):
    """A Dask scheduler and one worker of two threads from deploy/cluster.py, on 127.0.0.1; (address, log folder)."""
    state = tmp_path_factory.mktemp("cluster")
    started = run([sys.executable, "deploy/cluster.py", "start", "--state", str(state), "--ports", "auto",
                   "--no-prefect", "--workers", "1", "--threads", "2", "--owner-pid", str(os.getpid())], services,
                  REPOSITORY)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield json.loads(started.stdout[: started.stdout.rindex("}") + 1])["dask_address"], state / "logs"
    finally:
        run([sys.executable, "deploy/cluster.py", "stop", "--state", str(state)], services, REPOSITORY, timeout=120)


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_stopped_run_s_training_stops_on_the_cluster_and_writes_no_more_checkpoints(workdir, services, dask_cluster,
                                                                                      tmp_path, signum):
    """The training runs on a Dask worker with a client of its own: it must not outlive the command that started
    it (whose process held the store's lock), writing checkpoints into a store another run may have taken."""
    from distributed import Client

    root, _ = workdir
    address, logs = dask_cluster
    store = tmp_path / "orphan.zarr"
    process, command = _long_run_into_its_training(root / "data", store, services, "--cluster", address)
    try:
        process.send_signal(signum)
        process.wait(60)
    finally:
        if process.poll() is None:
            process.kill()
    key = _last_checkpoint(store)[0]
    stopped = time.monotonic()
    said = f"the training of model/{key}: the run that started it is gone"
    while said not in (logs / "dask-worker-0.log").read_text():  # in the worker's log, with where it stopped
        assert time.monotonic() - stopped < 60, "the training did not stop on the cluster"
        time.sleep(0.5)
    outer, reason = _last_checkpoint(store)[1:]
    time.sleep(3)
    assert _last_checkpoint(store)[1:] == (outer, reason)  # no checkpoint written any more
    assert outer < 500 and reason == ""  # stopped, not run to its end
    with Client(address, timeout=30) as client:  # and nothing of it is left running
        while any(client.processing().values()):
            assert time.monotonic() - stopped < 60, f"still running on the cluster: {client.processing()}"
            time.sleep(0.5)
    with sae_store.store_lock(store, wait=5):
        pass
    _resumes_from_its_checkpoint(command, store, outer, services)


def test_sigterm_during_a_local_training_ends_the_command_at_once_and_it_resumes(workdir, services, tmp_path):
    """On local threads the training runs in a task thread of the command: a SIGTERM must stop it at its next
    iteration, not when it has run its 500 outer iterations, and leave the last checkpoint to resume from."""
    root, _ = workdir
    store = tmp_path / "local.zarr"
    process, command = _long_run_into_its_training(root / "data", store, services)
    try:
        descendants = process.children(recursive=True)
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = process.wait(120)
        stopped_after = time.monotonic() - sent
    finally:
        if process.poll() is None:
            process.kill()
    stderr = process.stderr.read()
    assert code == 143, stderr
    assert "terminated: the store keeps every completed stage; run again to resume" in stderr
    # The flow engine's report of the crash to the server takes seconds; the training's own stop, one iteration.
    assert stopped_after < 30, stopped_after
    outer, reason = _last_checkpoint(store)[1:]
    assert outer < 500 and reason == ""  # stopped, not run to its end
    gone, alive = psutil.wait_procs(descendants, timeout=30)
    assert not alive, [p.cmdline() for p in alive]
    time.sleep(2)
    assert _last_checkpoint(store)[1:] == (outer, reason)  # nothing writes any more
    _resumes_from_its_checkpoint(command, store, outer, services)


def test_ctrl_c_inside_an_event_loop_that_absorbs_cancellation_still_stops_the_command():
    """While the default handler is installed, asyncio.run turns Ctrl-C into a cancellation of its task; a task
    that absorbs it would let the command run on. Under the command's handlers, Ctrl-C is KeyboardInterrupt."""
    import asyncio

    from flows._cli_run import _terminated_as_exception

    async def absorbing() -> str:
        os.kill(os.getpid(), signal.SIGINT)
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            return "absorbed"
        return "slept"

    outer = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own (a test runner may have another)
    try:
        assert asyncio.run(absorbing()) == "absorbed"  # what Python's default handler allows: the Ctrl-C is lost
        with pytest.raises(KeyboardInterrupt), _terminated_as_exception():
            asyncio.run(absorbing())
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    finally:
        signal.signal(signal.SIGINT, outer)
