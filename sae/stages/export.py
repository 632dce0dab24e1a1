"""The export stage: the trained model of a pipeline as a model folder ``<store>-models/<model key>``."""

from __future__ import annotations

import logging
from typing import Any

from sae import store as sae_store
from sae.config import PipelineConfig
from sae.store.keys import MODEL, RESULTS, default_model_path, stage_keys

logger = logging.getLogger("sae.stages")


def export_on(address: str | None, store: str, out: Any, **options: Any) -> dict[str, Any]:
    """`sae.artifact.export_model` of ``store`` to ``out``, the training clips encoded on the workers of the Dask
    scheduler at ``address`` (a client of its own, not the default one), or in this process when None."""
    from sae.artifact import export_model

    if address is None:
        return export_model(store, out, **options)
    from distributed import Client

    with Client(address, timeout=30, set_as_default=False) as client:
        return export_model(store, out, client=client, **options)


def export_stage(config: PipelineConfig, *, address: str | None = None, log: Any = logger) -> dict[str, Any]:
    """The trained model as a model folder, ``<store>-models/<model key>`` (`sae.artifact.export_model`).

    Skipped when the folder is intact and was exported from the same model and
    classification (their versions in the store); exported again otherwise.
    With a Dask scheduler ``address``, the training clips that the classifiers
    are fitted on are encoded on its workers.

    Returns
    -------
    dict
        ``skipped`` and ``path``.
    """
    from sae.artifact import exported_source

    store, keys = config.ingest.store, stage_keys(config)
    path = default_model_path(store, keys["model"])
    root = sae_store.open_store(store)
    current = {
        "model_key": keys["model"],
        "model_version": sae_store.stage_group(root, MODEL, keys["model"], mode="r").attrs.get("version"),
        "results_key": keys["results"],
        "results_version": sae_store.stage_group(root, RESULTS, keys["results"], mode="r").attrs.get("version"),
    }
    source = exported_source(path) or {}
    if all(source.get(name) == value for name, value in current.items()):
        log.info("export: %s is the model of model/%s and results/%s: skipped", path, keys["model"], keys["results"])
        return {"skipped": True, "path": str(path)}
    export_on(address, store, path, model_key=keys["model"], results_key=keys["results"], overwrite=True)
    log.info("export: model/%s -> %s", keys["model"], path)
    return {"skipped": False, "path": str(path)}
