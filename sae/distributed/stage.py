"""The training stage in a store: ``model/<key>``, keyed by the training configuration and its inputs.

`train_model` trains on ``preprocess/<key>/X`` (and ``graph/<key>/laplacian``
when ``lambda_g > 0``) with :func:`sae.distributed.fit_distributed`,
checkpointing into the stage group (:mod:`sae.distributed.checkpoints`) after
every outer iteration; a rerun resumes from the last checkpoint (the key does
not include ``max_outer``, so a run with a larger ``max_outer`` continues),
and returns at once when the group is complete.  `open_model` reads a trained
model back.  The key and the configuration recorded in the group are
`sae.store.keys.model_key` and `sae.store.keys.model_identity`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import zarr

from sae.config import TrainConfig
from sae.distributed.blocks import LaplacianRef
from sae.distributed.checkpoints import checkpoint_arrays, ends_training, read_checkpoint
from sae.distributed.trainer import fit_distributed
from sae.outer import iterations_done
from sae.progress import Interrupt, go_on
from sae.store.keys import MODEL, model_identity, model_key

__all__ = ["train_model", "open_model"]

logger = logging.getLogger("sae.distributed")


def train_model(
    store_path: Any,
    preprocess_key: str,
    train: TrainConfig,
    *,
    client: Any,
    graph_key: str | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    overwrite: bool = False,
    interrupt: Interrupt = go_on,
) -> dict[str, Any]:
    """Train on the frames ``preprocess/<preprocess_key>/X`` of a store; write ``model/<key>``.

    The Laplacian is ``graph/<graph_key>/laplacian`` (required when
    ``train.model.lambda_g > 0``).  Checkpoints (:mod:`sae.distributed.checkpoints`) go to the
    stage group; a rerun resumes from the last one, and returns at once when
    the group is complete for this ``max_outer`` or converged.  ``interrupt``
    (`sae.progress.Interrupt`): before the group is written, then as
    :func:`sae.distributed.fit_distributed` says, and before it is marked complete.

    Returns
    -------
    dict
        ``key``, ``n_iter``, ``stop_reason``, ``resumed_from``, ``objective``
        (final total), ``sparsity_percent``, ``seconds``, ``skipped`` (bool).
    """
    from sae import store
    from sae.preprocess import open_preprocessed

    config = train.model
    if config.lambda_g > 0 and graph_key is None:
        raise ValueError(
            f"graph_key is required when lambda_g > 0 (got lambda_g={config.lambda_g!r} and graph_key=None)"
        )
    key = model_key(train, preprocess_key, graph_key)
    root = store.open_store(store_path, mode="r+")
    inputs = [open_preprocessed(root, preprocess_key)]
    X = inputs[0]["X"]
    laplacian = None
    if config.lambda_g > 0:
        from sae.graph import open_graph

        inputs.append(open_graph(root, graph_key))
        kind = (inputs[-1].attrs.get("config") or {}).get("laplacian")
        laplacian = LaplacianRef(inputs[-1], "laplacian", kind=kind)
    stage_config = model_identity(train, preprocess_key, graph_key)
    interrupt(f"model {key}, before it writes")
    group = store.stage_group(root, MODEL, key, config=stage_config, mode="w" if overwrite else "a")
    try:
        done = None if overwrite else read_checkpoint(group)
    except store.StoreDamaged as error:
        logger.warning("%s: training again from the start", error)
        group = store.stage_group(root, MODEL, key, config=stage_config, mode="w")
        done = None
    if store.is_complete(root, MODEL, key) and ends_training(done, config.max_outer):
        logger.info("model %s: complete at outer iteration %d (%s), skipped", key, done["iteration"], done["stop_reason"])
        last = done["history"][-1]
        return {"key": key, "n_iter": iterations_done(done["history"]), "stop_reason": done["stop_reason"],
                "resumed_from": done["iteration"], "objective": last["total"],
                "sparsity_percent": last["sparsity_percent"], "seconds": 0.0, "skipped": True}
    group.attrs.update({"complete": False, "max_outer": config.max_outer, "block_size": train.block_size})
    started = time.perf_counter()
    fit = fit_distributed(
        X, config, client=client, laplacian=laplacian, block_size=train.block_size,
        laplacian_norm=train.laplacian_norm, lookahead=train.lookahead, offload_previous=train.offload_previous,
        memory_check=train.memory_check, order=train.order,
        checkpoint=group, checkpoint_final_only=not train.checkpoint, callback=callback, interrupt=interrupt,
    )
    interrupt(f"model {key}, trained, before it is marked complete")
    store.mark_complete(group, inputs=inputs, arrays=checkpoint_arrays(group))
    last = fit.history[-1]
    return {"key": key, "n_iter": fit.n_iter, "stop_reason": fit.stop_reason, "resumed_from": fit.resumed_from,
            "objective": last["total"], "sparsity_percent": last["sparsity_percent"],
            "seconds": time.perf_counter() - started, "skipped": False}


def open_model(store_path: Any, key: str) -> dict[str, Any]:
    """A trained model of a store: ``components``, ``encoder`` (or None), ``codes`` (zarr (N, m)), ``history``.

    ``codes`` is None while an unfinished training's last checkpoint holds
    them in the order of its blocks (:mod:`sae.distributed.checkpoints`).
    ``complete``: the group is marked complete and its last checkpoint is the
    final one (a stop reason, the codes in the frames' order; a group that an
    earlier version marked complete on a checkpoint in the blocks' order is not).

    Reads the last complete checkpoint of ``model/<key>`` (the final one when
    the group is complete).
    """
    from sae import store

    root = store.open_store(store_path) if not isinstance(store_path, zarr.Group) else store_path
    group = store.stage_group(root, MODEL, key, mode="r")
    state = read_checkpoint(group)
    if state is None:
        raise ValueError(f"model/{key} holds no complete outer iteration yet: run train_model first")
    in_blocks = state.pop("frame_of_row") is not None
    if in_blocks:  # an unfinished training's codes, in its blocks' order
        state["codes"] = None
    state["complete"] = store.is_complete(root, MODEL, key) and bool(state["stop_reason"]) and not in_blocks
    return state
