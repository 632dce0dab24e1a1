"""How a command of ``sae`` runs its work: the store's lock, a Prefect API, the progress display, the stop.

The work's errors become one ``error:`` line (its traceback with
``$SAE_TRACEBACK``) and exit code 1; an invalid request found before any work,
exit code 2 (`flows._cli_config.USAGE_ERROR`).  Ctrl-C ends the command at once
with exit code 130, SIGTERM with 143: the store keeps every completed stage.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer

from flows._cli_config import USAGE_ERROR
from sae.config import PipelineConfig


def fail(error: BaseException, code: int) -> typer.Exit:
    """Print ``error`` as one ``error:`` line (its traceback too when $SAE_TRACEBACK is set); the exit to raise."""
    if os.environ.get("SAE_TRACEBACK"):
        import traceback

        traceback.print_exception(error)
    message = str(error) or type(error).__name__
    if isinstance(error, (OSError, KeyError)) and type(error).__name__ not in message:
        message = f"{type(error).__name__}: {message}"
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@contextmanager
def prepared(command: str, config: PipelineConfig, no_wait: bool) -> Iterator[PipelineConfig]:
    """Check ``config`` for ``command`` before any work (exit 2), then hold the store's lock and a Prefect API.

    Errors of the work inside become one ``error:`` line and exit code 1.
    """
    import logging

    from flows import pipeline

    logging.getLogger("distributed").setLevel(logging.WARNING)
    pipeline.show_library_logs()
    config = pipeline.resolve_paths(config)
    try:
        pipeline.preflight(command, config)
    except ValueError as error:
        raise fail(error, USAGE_ERROR) from None
    with running(config.ingest.store, no_wait, pipeline.dask_address(config)):
        yield config


@contextmanager
def running(store: str, no_wait: bool, address: str | None = None) -> Iterator[None]:
    """Hold ``store``'s lock, a Prefect API and the terminal's progress display (with a Dask ``address``, the
    workers' progress too) for the work inside; its errors become one ``error:`` line, exit 1."""
    from flows._progress import terminal_display
    from flows._server import prefect_api
    from prefect.exceptions import TerminationSignal

    from sae import store as sae_store

    try:
        with _terminated_as_exception(), sae_store.store_lock(store, wait=0 if no_wait else None), \
                prefect_api(), terminal_display(address, store=store) as display:
            try:
                yield
            except (KeyboardInterrupt, TerminationSignal, _Terminated) as stop:
                _stop_now(stop, display)  # here, not below: leaving the blocks above would wait for the server
    except typer.Exit:
        raise
    except (KeyboardInterrupt, TerminationSignal, _Terminated) as stop:
        _stop_now(stop)
    except Exception as error:  # noqa: BLE001 - the command's boundary: one line, no traceback
        raise fail(error, 1) from None


class _Terminated(BaseException):
    """SIGTERM outside a flow run (inside one, Prefect raises its own ``TerminationSignal``)."""


@contextmanager
def _terminated_as_exception() -> Iterator[None]:
    """SIGTERM raises `_Terminated` in the main thread while the work runs, and Ctrl-C KeyboardInterrupt.

    Ctrl-C gets a handler of ours too, though Python's raises the same
    exception: while Python's default handler is installed, an event loop run
    in the main thread (``asyncio.run``, as libraries' synchronous wrappers do)
    replaces it by one that cancels the loop's task, and a task that absorbs
    its cancellation loses the Ctrl-C: the command would run on to the end.
    """
    import signal

    def terminated(signum: int, frame: Any) -> None:
        raise _Terminated

    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = {signum: signal.signal(signum, handler)
                for signum, handler in ((signal.SIGTERM, terminated), (signal.SIGINT, interrupted))}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _stop_now(stop: BaseException, display: Any = None) -> None:
    """End the command at once after Ctrl-C (``stop`` a KeyboardInterrupt: exit 130) or SIGTERM (143).

    The work runs in threads (task runners, an in-process Dask cluster) that do
    not stop on request: an ordinary exit would wait for them, i.e. for the
    current stage to finish.  Nothing is lost by not waiting: a stage group
    is complete only once fully written, the store's lock is the operating
    system's (released with the process), the temporary Prefect server stops
    when its input closes, and a cluster drops the tasks of a client that left.
    """
    what, code = ("interrupted", 130) if isinstance(stop, KeyboardInterrupt) else ("terminated", 143)
    if display is not None:
        display.__exit__(None, None, None)  # the terminal back as it was (the progress bars hide the cursor)
    typer.echo(f"{what}: the store keeps every completed stage; run again to resume", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
