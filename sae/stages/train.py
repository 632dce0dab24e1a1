"""The train stage: ``model/<key>``, the auto-encoder trained on ``preprocess/<key>`` (and ``graph/<key>``).

Freshness: `model_complete` (converged, or trained for at least ``max_outer``
outer iterations: the key leaves ``max_outer`` out, so a larger one resumes).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sae import store as sae_store
from sae.config import PipelineConfig
from sae.stages.inputs import require
from sae.store.keys import GRAPH, MODEL, PREPROCESS, stage_keys

logger = logging.getLogger("sae.stages")


def model_complete(store: str, key: str, max_outer: int) -> bool:
    """Whether ``model/<key>`` is complete: converged (rtol), or trained for at least ``max_outer`` iterations
    (epochs of an online fit), its last checkpoint the final one (`sae.distributed.ends_training`)."""
    from sae.distributed import ends_training, read_checkpoint

    if not sae_store.is_complete(store, MODEL, key):
        return False
    try:
        state = read_checkpoint(sae_store.stage_group(store, MODEL, key, mode="r"))
    except sae_store.StoreDamaged:
        return False
    return ends_training(state, max_outer)


def require_model(store: str, key: str, max_outer: int) -> None:
    """Fail unless ``model/<key>`` is complete for ``max_outer`` (`model_complete`), saying to train first."""
    if not model_complete(store, key, max_outer):
        raise RuntimeError(f"store {store!r} has no complete model/{key}: run the train stage first")


def train_inputs(config: PipelineConfig) -> str | None:
    """Check that the inputs of the training of ``config`` are complete; returns its graph key (None without graph).

    Raises
    ------
    RuntimeError
        ``preprocess/<key>``, or ``graph/<key>`` when ``lambda_g > 0``, is not complete.
    """
    store, keys = config.ingest.store, stage_keys(config)
    require(store, PREPROCESS, keys["preprocess"], "graph")
    graph = keys["graph"] if config.train.model.lambda_g > 0 else None
    if graph is not None:
        require(store, GRAPH, graph, "graph")
    return graph


def train_stage(config: PipelineConfig, run: Callable[..., dict[str, Any]], *, log: Any = logger) -> dict[str, Any]:
    """Training, skipped when ``model/<key>`` is complete for this ``max_outer``.

    ``run(store=, preprocess_key=, train=, graph_key=)`` trains (``flows.train.train_flow``
    in a flow) and returns the run's metadata (``key``, ``n_iter``, ...).
    """
    store, keys = config.ingest.store, stage_keys(config)
    with sae_store.store_lock(store):
        graph = train_inputs(config)
        if model_complete(store, keys["model"], config.train.model.max_outer):
            log.info("train: model/%s is complete: skipped", keys["model"])
            return {"skipped": True, "key": keys["model"]}
        out = run(store=store, preprocess_key=keys["preprocess"], train=config.train, graph_key=graph)
    return {**out, "skipped": False}
