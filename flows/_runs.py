"""How the flow runs of the project are named and tagged, so that the UI says what runs.

A run is named after what it computes: ``train-<model key>``,
``graph-<graph key>``, ``sweep-lambda_g``, ``pipeline-gtzan.zarr`` (`run_namer`),
and the sub-flow of a stage carries the tags ``sae`` and the stage's name
(`stage_tags`), so the runs of a stage can be filtered in the UI.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

_logger = logging.getLogger("sae.runs")

TAG = "sae"
"""Tag of every run of a stage, beside the stage's name."""


def run_namer(prefix: str, describe: Callable[[dict[str, Any]], str]) -> Callable[[], str]:
    """A ``flow_run_name`` callable: ``<prefix>-<describe(parameters)>``, else ``prefix`` if that fails.

    ``parameters`` are the run's (`prefect.runtime.flow_run.parameters`):
    configurations as models or, in a run started from a deployment, as
    mappings, which the pydantic models validate alike.
    """

    def name() -> str:
        from prefect.runtime import flow_run

        try:
            return f"{prefix}-{describe(flow_run.parameters)}"
        except Exception as error:  # noqa: BLE001 - a name never fails a run
            _logger.debug("run name of %s: %s", prefix, error)
            return prefix

    name.__name__ = f"{prefix.replace('-', '_')}_run_name"
    return name


@contextmanager
def stage_tags(stage: str) -> Iterator[None]:
    """The runs started inside carry the tags ``sae`` and ``stage``."""
    from prefect import tags

    with tags(TAG, stage):
        yield
