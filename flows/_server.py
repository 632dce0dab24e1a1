"""The Prefect API of a ``sae`` command: the configured one, else a temporary server that dies with the command.

Prefect's own ephemeral mode starts its temporary server as a child process
and stops it at exit, but a command killed by SIGKILL (or the OOM killer)
leaves it running, reparented to init.  `prefect_api` starts it through a
*guard* instead: a small child process (``python -m flows._server``) that
starts the server (Prefect's `SubprocessASGIServer`, on 127.0.0.1), prints its
API URL, then waits for its standard input to close, which happens when the
command ends, however it ends, and stops the server.

The temporary server keeps the runs in the current Prefect profile's
database, as Prefect's ephemeral mode does; a server started by the user
(``PREFECT_API_URL``, or the profile's ``api.url``) is used as it is.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

STARTUP_SECONDS = 120.0
"""How long `prefect_api` waits for the temporary server to answer."""

STOP_SECONDS = 30.0
"""How long `prefect_api` lets the guard stop the server in order before killing both."""


def configured_api_url() -> str | None:
    """The API URL of the Prefect server this process is configured for (None: none, ephemeral mode)."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


@contextmanager
def prefect_api(timeout: float = STARTUP_SECONDS) -> Iterator[str]:
    """The configured Prefect API, else a temporary server's for the duration of the block; yields its URL.

    Raises
    ------
    RuntimeError
        The temporary server did not start within ``timeout`` seconds.
    """
    url = configured_api_url()
    if url is not None:
        yield url
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # No analytics from the temporary server whatever imported this module (the telemetry
    # service otherwise logs an ERROR per attempt on a machine without internet).
    env = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", **os.environ}
    guard = subprocess.Popen(
        [sys.executable, "-m", "flows._server"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
    )
    try:
        url = _read_url(guard, timeout)
        previous = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = url  # for what this process starts; the settings for Prefect itself
        try:
            with temporary_settings(updates={PREFECT_API_URL: url}):
                yield url
        finally:
            if previous is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = previous
    finally:
        _drain_prefect_queues()
        guard.stdin.close()  # the guard stops the server and exits
        try:
            guard.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            _kill_tree(guard)


def _drain_prefect_queues(timeout: float = 5.0) -> None:
    """Send the logs and events Prefect still queues in this process before the server goes away."""
    try:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker
    except ImportError:  # another Prefect layout: its own exit handlers will try (and report a failure)
        return
    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=timeout)


def _kill_tree(guard: subprocess.Popen) -> None:
    """Kill the guard and the server it started (on a loaded machine its orderly stop can outlast our wait).

    Killing the guard alone would leave the server running, reparented to init.
    """
    import psutil

    try:
        processes = psutil.Process(guard.pid).children(recursive=True)
    except psutil.Error:
        processes = []
    guard.kill()
    for process in processes:
        try:
            process.kill()
        except psutil.Error:
            pass
    guard.wait()
    psutil.wait_procs(processes, timeout=10)


def _read_url(guard: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([guard.stdout], [], [], 0.5)
        if ready:
            line = guard.stdout.readline().strip()
            if line.startswith("http://"):
                return line
            if not line and guard.poll() is not None:
                break
        elif guard.poll() is not None:
            break
    _kill_tree(guard)
    raise RuntimeError(
        f"the temporary Prefect server did not start within {timeout:.0f} s (exit code {guard.poll()}); "
        "start one with `prefect server start --host 127.0.0.1` and set PREFECT_API_URL"
    )


def main() -> None:
    """The guard: start the server, print its API URL, stop it when standard input closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C ends the command, which closes our input
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    # Only the URL goes to the command: the server's own output goes nowhere (nobody reads the pipe later).
    url_out = os.fdopen(os.dup(1), "w")
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    try:
        server.start(timeout=int(STARTUP_SECONDS))
        url_out.write(server.api_url + "\n")
        url_out.close()
        while sys.stdin.buffer.read(1 << 16):  # returns b"" at end of file: the command has ended
            pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
