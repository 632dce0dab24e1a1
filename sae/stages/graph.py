"""The graph stage: ``preprocess/<key>`` (the model input X) and ``graph/<key>`` (kNN graph, Laplacian).

Freshness: `graph_current` (the preprocessed frames computed from the frames
the store holds now, and the graph complete and computed from them).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sae import store as sae_store
from sae.config import PipelineConfig
from sae.stages.inputs import require_frames
from sae.store.keys import GRAPH, stage_keys

logger = logging.getLogger("sae.stages")


def graph_current(config: PipelineConfig) -> bool:
    """Whether ``preprocess/<key>`` and ``graph/<key>`` of ``config`` are complete and current."""
    from sae.preprocess import preprocess_current

    store = config.ingest.store
    return preprocess_current(store, config.preprocess) and sae_store.is_complete(
        store, GRAPH, stage_keys(config)["graph"])


def graph_stage(config: PipelineConfig, run: Callable[..., dict[str, Any]], *, log: Any = logger) -> dict[str, Any]:
    """Preprocessing and graph, skipped when both are complete and current; returns their keys and ``skipped``.

    ``run(store=, preprocess=, graph=)`` computes both (``flows.graph.graph_flow``
    in a flow) and returns their metadata (``preprocess`` and ``graph``, each with its ``key``).
    """
    store, keys = config.ingest.store, stage_keys(config)
    with sae_store.store_lock(store):
        require_frames(store)
        if graph_current(config):
            log.info("graph: preprocess/%s and graph/%s are complete: skipped", keys["preprocess"], keys["graph"])
            return {"skipped": True, "preprocess": {"key": keys["preprocess"]}, "graph": {"key": keys["graph"]}}
        out = run(store=store, preprocess=config.preprocess, graph=config.graph)
    return {"skipped": False, **out}
