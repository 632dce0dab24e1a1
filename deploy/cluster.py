#!/usr/bin/env python3
"""Start and stop a local Prefect server, Dask cluster and Prefect worker on 127.0.0.1.

Every service runs in its own process group, with its log and PID under a state
folder, so that ``stop`` ends exactly what ``start`` started::

    <state>/
      env               shell lines to source: PREFECT_API_URL, SAE_DASK_ADDRESS, ...
      ports.json        the ports in use
      pids/<name>.pid   one per service (prefect-server, dask-scheduler,
                        dask-worker-<i>, prefect-worker; owner-watch with --owner-pid)
      logs/<name>.log
      prefect-home/     PREFECT_HOME of the server (SQLite database)
      dask/             worker spill directories

Usage::

    python deploy/cluster.py start --workers 2 --prefect-worker
    source .sae/cluster/env          # PREFECT_API_URL, SAE_DASK_ADDRESS
    python deploy/cluster.py status
    python deploy/cluster.py stop

With ``start --owner-pid PID`` the services stop themselves when process PID
ends, however it ends (SIGKILL included): a watcher (``owner-watch``) checks it
every second.  The tests pass their own PID, so a killed test run leaves no
server behind.

Nothing binds to another address than 127.0.0.1 unless ``--host`` says so.
Ports default to Prefect's and Dask's usual ones; ``--ports auto`` picks free
ones (what the tests use).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_STATE = Path(".sae") / "cluster"
DEFAULT_PORTS = {"prefect": 4200, "scheduler": 8786, "dashboard": 8787}
# Prefect only contacts 127.0.0.1 with these (no analytics, no promotions).
OFFLINE_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
}


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _wait(predicate, what: str, timeout: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.25)
    tail = ""
    if log is not None and log.exists():
        tail = "\n--- last lines of " + str(log) + " ---\n" + "\n".join(log.read_text().splitlines()[-20:])
    raise TimeoutError(f"{what} did not become ready within {timeout:.0f} s{tail}")


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


class State:
    """The state folder: PIDs, logs, ports and the environment file."""

    def __init__(self, root: Path):
        self.root = root.resolve()
        self.pids = self.root / "pids"
        self.logs = self.root / "logs"

    def prepare(self) -> None:
        for folder in (self.pids, self.logs, self.root / "prefect-home", self.root / "dask"):
            folder.mkdir(parents=True, exist_ok=True)

    def pid_file(self, name: str) -> Path:
        return self.pids / f"{name}.pid"

    def running(self) -> dict[str, int]:
        alive = {}
        if not self.pids.exists():
            return alive
        for path in sorted(self.pids.glob("*.pid")):
            pid = int(path.read_text().strip())
            if _alive(pid):
                alive[path.stem] = pid
        return alive

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> int:
        log = open(self.logs / f"{name}.log", "ab")
        process = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # own process group: stop ends its children too
        )
        log.close()
        self.pid_file(name).write_text(str(process.pid))
        return process.pid


def _start_time(pid: int) -> str | None:
    """The start time of process ``pid`` (field 22 of ``/proc/<pid>/stat``), None when there is no such process:
    with the PID it names one process, even after the PID is reused."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[19]
    except (OSError, IndexError):
        return None


def watch(args: argparse.Namespace) -> None:
    """Stop the services of the state folder once process ``args.pid`` (started at ``args.started``) is gone."""
    while _alive(args.pid) and _start_time(args.pid) == args.started:
        time.sleep(1.0)
    print(f"owner process {args.pid} is gone: stopping the services", flush=True)
    stop(args)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


NO_WORKER_PROFILER = {"DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED": "False"}
"""The workers' statistical profiler samples every thread's stack (``sys._current_frames``) every 10 ms: on
Python 3.11 that call was seen to deadlock against the training's compiled kernels, so it is off (distributed
already turns its event-loop profiler off on 3.11); the dashboard's Profile page stays empty."""

HEAP_ARRAYS = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20)}
"""Dask's nanny starts its workers with ``MALLOC_TRIM_THRESHOLD_=65536`` (``distributed.nanny.pre-spawn-environ``:
freed memory goes back to the system).  Setting any of glibc's malloc thresholds also fixes its mmap threshold
at 128 KiB, so every larger temporary array (one clip's codes, 1283 x 512 float32, is 2.6 MB) becomes a mapping
of its own, whose pages the kernel zeroes and faults in at every use: numpy code ran 2.2x slower on a worker than
in a plain process.  Arrays up to 32 MiB come from the heap again (the trim threshold still returns its free top);
bigger ones, the training's iterates, stay mappings (and the trainer recycles them: `sae.distributed.memory`).
Measured: `sae export` of 348 clips on 2 workers 167-170 s -> 80-85 s; a training at 1.29 M frames 3-14 % faster
for 0.37 GiB more summed peak (README, Benchmarks)."""

NO_SPILLING = {"DASK_DISTRIBUTED__WORKER__MEMORY__TARGET": "False", "DASK_DISTRIBUTED__WORKER__MEMORY__SPILL": "False"}
"""``--no-spill``: the workers keep every result in memory (Dask's pause at 80 % and the nanny's kill at 95 % of
the limit stay).  A training bounds its own memory (`sae.distributed.budget`); with spilling on it must stay under
60 % of the limit, because block states that spill can stall it."""


def _bin(name: str) -> str:
    """The console script ``name`` next to this Python, or on PATH."""
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


def start(args: argparse.Namespace) -> dict:
    state = State(Path(args.state))
    if state.running():
        raise SystemExit(f"services already running from {state.root}: {state.running()}; stop them first")
    state.prepare()
    host = args.host
    ports = dict(DEFAULT_PORTS)
    if args.ports == "auto":
        ports = {key: _free_port(host) for key in ports}
    for key in ("prefect", "scheduler", "dashboard"):
        value = getattr(args, f"{key}_port")
        if value is not None:
            ports[key] = value

    env = dict(os.environ, **OFFLINE_ENV)
    env["PREFECT_HOME"] = str(state.root / "prefect-home")
    api_url = f"http://{host}:{ports['prefect']}/api"
    dask_address = f"tcp://{host}:{ports['scheduler']}"
    info = {"state": str(state.root), "ports": ports}

    if not args.no_prefect:
        env.pop("PREFECT_API_URL", None)
        # The UI asks this address for its data (by default the one of port 4200, whatever --port says).
        server_env = dict(env, PREFECT_UI_API_URL=api_url)
        state.spawn(
            "prefect-server",
            [_bin("prefect"), "server", "start", "--host", host, "--port", str(ports["prefect"])],
            server_env,
        )
        _wait(lambda: _http_ok(api_url + "/health"), "the Prefect server", args.timeout,
              state.logs / "prefect-server.log")
        env["PREFECT_API_URL"] = api_url
        info["prefect_api_url"] = api_url
        info["prefect_ui_url"] = f"http://{host}:{ports['prefect']}"

    if args.workers > 0:
        state.spawn(
            "dask-scheduler",
            [_bin("dask"), "scheduler", "--host", host, "--port", str(ports["scheduler"]),
             "--dashboard-address", f"{host}:{ports['dashboard']}"],
            env,
        )
        _wait(lambda: _port_open(host, ports["scheduler"]), "the Dask scheduler", args.timeout,
              state.logs / "dask-scheduler.log")
        for i in range(args.workers):
            state.spawn(
                f"dask-worker-{i}",
                [_bin("dask"), "worker", dask_address, "--host", host, "--nthreads", str(args.threads),
                 "--name", f"worker-{i}", "--memory-limit", args.memory_limit,
                 "--local-directory", str(state.root / "dask"), "--dashboard-address", f"{host}:0"],
                dict(env, **NO_WORKER_PROFILER, **HEAP_ARRAYS, **(NO_SPILLING if args.no_spill else {})),
            )
        _wait(lambda: _n_workers(dask_address) >= args.workers, f"{args.workers} Dask worker(s)",
              args.timeout, state.logs / "dask-worker-0.log")
        info["dask_address"] = dask_address
        info["dask_dashboard_url"] = f"http://{host}:{ports['dashboard']}/status"

    if args.prefect_worker:
        if args.no_prefect:
            raise SystemExit("--prefect-worker needs the Prefect server (drop --no-prefect)")
        worker_env = dict(env, SAE_DASK_ADDRESS=info.get("dask_address", ""))
        state.spawn(
            "prefect-worker",
            [_bin("prefect"), "worker", "start", "--pool", args.pool, "--type", "process",
             "--name", "sae-local-worker"],
            worker_env,
        )
        _wait(lambda: "started" in _read(state.logs / "prefect-worker.log").lower(), "the Prefect worker",
              args.timeout, state.logs / "prefect-worker.log")
        info["work_pool"] = args.pool

    if args.owner_pid is not None:
        started = _start_time(args.owner_pid)
        if started is None:
            raise OSError(f"--owner-pid {args.owner_pid}: no such process")
        state.spawn("owner-watch", [sys.executable, str(Path(__file__).resolve()), "watch", "--state",
                                    str(state.root), "--pid", str(args.owner_pid), "--started", started], env)
        info["owner_pid"] = args.owner_pid

    lines = [f"export {key}={value}" for key, value in OFFLINE_ENV.items()]
    if "prefect_api_url" in info:
        lines.append(f"export PREFECT_API_URL={api_url}")
    if "dask_address" in info:
        lines.append(f"export SAE_DASK_ADDRESS={dask_address}")
    (state.root / "env").write_text("\n".join(lines) + "\n")
    (state.root / "ports.json").write_text(json.dumps(info, indent=2))
    return info


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _n_workers(address: str) -> int:
    from distributed import Client

    try:
        with Client(address, timeout=2) as client:
            return len(client.scheduler_info(n_workers=-1)["workers"])
    except OSError:
        return 0


def stop(args: argparse.Namespace) -> list[str]:
    """Stop every service of the state folder: SIGINT, then SIGTERM, then SIGKILL."""
    state = State(Path(args.state))
    stopped = []
    # The owner's watcher first (a stop by hand), then workers before the services they talk to.
    order = ["owner-watch", "prefect-worker", "dask-worker", "dask-scheduler", "prefect-server"]
    running = state.running()
    names = sorted(running, key=lambda name: next(i for i, p in enumerate(order + [""]) if name.startswith(p)))
    for name in names:
        pid = running[name]
        if pid == os.getpid():  # the watcher stopping the services: it ends by itself
            state.pid_file(name).unlink(missing_ok=True)
            continue
        for sig, grace in ((signal.SIGINT, 5), (signal.SIGINT, 5), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + grace
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if not _alive(pid):
                break
        state.pid_file(name).unlink(missing_ok=True)
        stopped.append(name)
    return stopped


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    helps = {"start": "start the services", "stop": "stop every service of the state folder",
             "status": "the services running, with their PIDs",
             "watch": "(started by start --owner-pid) stop the services when a process ends"}
    for name in ("start", "stop", "status", "watch"):
        command = sub.add_parser(name, help=helps[name])
        command.add_argument("--state", default=str(DEFAULT_STATE), help="state folder (default: %(default)s)")
    begin = sub.choices["start"]
    begin.add_argument("--host", default="127.0.0.1", help="address every service binds to (default: %(default)s)")
    begin.add_argument("--workers", type=int, default=2, help="Dask worker processes (0: no Dask cluster)")
    begin.add_argument("--threads", type=int, default=1, help="threads per Dask worker")
    begin.add_argument("--memory-limit", default="auto", help="memory limit per Dask worker, e.g. 4GB")
    begin.add_argument("--no-spill", action="store_true",
                       help="workers never spill results to disk (they still pause at 80%% of their limit): a "
                       "training may then use up to the pause threshold instead of 60%% (train.memory_check)")
    begin.add_argument("--no-prefect", action="store_true", help="do not start a Prefect server")
    begin.add_argument("--prefect-worker", action="store_true", help="start a Prefect process worker")
    begin.add_argument("--pool", default="sae-process", help="work pool of the Prefect worker")
    begin.add_argument("--ports", choices=["default", "auto"], default="default",
                       help="default: 4200 (Prefect), 8786/8787 (Dask); auto: free ports")
    begin.add_argument("--prefect-port", type=int)
    begin.add_argument("--scheduler-port", type=int)
    begin.add_argument("--dashboard-port", type=int)
    begin.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for each service")
    begin.add_argument("--owner-pid", type=int,
                       help="stop every service when this process ends (checked every second), e.g. a test run's")
    watcher = sub.choices["watch"]
    watcher.add_argument("--pid", type=int, required=True, help=argparse.SUPPRESS)
    watcher.add_argument("--started", required=True, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.command == "start":
        try:
            info = start(args)
        except (TimeoutError, OSError) as error:
            stop(args)
            raise SystemExit(f"start failed, everything stopped again: {error}") from None
        print(json.dumps(info, indent=2))
        print(f"source {Path(args.state) / 'env'}  # to use these services from a shell")
    elif args.command == "watch":
        watch(args)
    elif args.command == "stop":
        stopped = stop(args)
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    else:
        running = State(Path(args.state)).running()
        print(json.dumps(running, indent=2) if running else "nothing running")


if __name__ == "__main__":
    main()
