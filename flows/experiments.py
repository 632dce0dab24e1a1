"""The thesis's noise experiment as one flow: accuracy against the noise added to the scaled CQT.

For every noise std (default 0, 0.1, 0.2) the flow runs, as coarse Prefect tasks of
the other stages' flows, each skipped when its stage group is already complete, the
stages configured by `sae.stages.noise_stages`:

1. ``preprocess`` (`flows.graph`): the scaled frames plus noise of that std (the graph,
   the models and the baseline all see the same noisy frames);
2. ``graph`` (`flows.graph`): their kNN graph and Laplacian (only if ``lambda_g > 0``);
3. ``train`` (`flows.train`): the auto-encoder with ``lambda_g = 0`` and with ``lambda_g``;
4. the classification (`flows.classify`) of the baseline (the noisy scaled CQT),
   ``lambda_g_off`` and ``lambda_g_on`` codes.

It returns and publishes the thesis's table (noise std x feature set, with the
published figures in brackets, `sae.report.noise_table_markdown`) and a plot
(`sae.report.plot_noise_experiment`) written beside the store
(`sae.stages.write_experiment_outputs`)::

    from prefect_dask import DaskTaskRunner
    from flows.experiments import noise_experiment_flow
    from sae.config import ClassifyConfig, PreprocessConfig

    noise_experiment_flow.with_options(task_runner=DaskTaskRunner())(
        "gtzan.zarr",
        preprocess=PreprocessConfig(frames_per_clip=298,
                                    labels=("blues", "classical", "country", "disco", "hiphop")),
        classify=ClassifyConfig(protocol="thesis"))
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.context import FlowRunContext

from flows._dask import StoppableTaskRunner
from flows.classify import submit_classification
from flows.graph import graph_task, preprocess_task
from flows.train import train_task
from sae.config import ClassifyConfig, GraphConfig, PipelineConfig, PreprocessConfig, TrainConfig
from sae.report import inline_images
from sae.stages.experiment import COLUMNS, noise_features, noise_keys, noise_stages, write_experiment_outputs
from sae.stages.results import brief, check_folds

__all__ = ["COLUMNS", "noise_experiment_flow", "run_experiment"]


@flow(name="noise-experiment", task_runner=StoppableTaskRunner(max_workers=2))
def noise_experiment_flow(
    store: str,
    noise_stds: tuple[float, ...] = (0.0, 0.1, 0.2),
    lambda_g: float = 100.0,
    preprocess: PreprocessConfig = PreprocessConfig(),  # noqa: B008 - frozen pydantic models
    graph: GraphConfig = GraphConfig(),  # noqa: B008
    train: TrainConfig = TrainConfig(),  # noqa: B008
    classify: ClassifyConfig = ClassifyConfig(),  # noqa: B008
) -> dict[str, Any]:
    """Baseline, lambda_g = 0 and lambda_g > 0 for every noise std; the thesis's table and a plot.

    ``preprocess.noise_std`` and ``train.model.lambda_g`` are overridden by
    ``noise_stds`` and (0, ``lambda_g``); everything else is as given.

    Returns
    -------
    dict
        ``table`` (noise std -> feature set -> accuracy_mean, accuracy_std, chance,
        n_scores), ``keys`` (noise std -> the stage keys used), ``markdown``, ``png``.
    """
    log = get_run_logger()
    stages = noise_stages(noise_stds, lambda_g, preprocess, train)
    table: dict[float, dict[str, dict[str, Any]]] = {}
    keys: dict[float, dict[str, str]] = {}
    for noise in stages:
        pre = preprocess_task.submit(store, noise.preprocess).result()
        graph_out = graph_task.submit(store, pre["key"], graph).result()
        models = {name: train_task.submit(store, pre["key"], graph_key, config)
                  for name, (graph_key, config) in noise.models(graph_out["key"]).items()}
        features = noise_features(pre["key"], {name: future.result()["key"] for name, future in models.items()})
        key, reused, summaries = submit_classification(store, pre["key"], features, classify)
        table[noise.noise_std] = summaries
        keys[noise.noise_std] = noise_keys(pre["key"], graph_out["key"], key, features)
        log.info(
            "noise %g: %s%s", noise.noise_std,
            ", ".join(f"{n} {100 * s['accuracy_mean']:.1f} ± {100 * s['accuracy_std']:.1f}" for n, s in summaries.items()),
            " (reused)" if reused else "",
        )
    outputs = write_experiment_outputs(store, noise_stds, table, keys, lambda_g=lambda_g, protocol=classify.protocol)
    if FlowRunContext.get() is not None:
        create_markdown_artifact(
            inline_images(outputs["report"], Path(outputs["png"]).parent), key="noise-experiment",
            description=f"Noise experiment on {store}",
        )
    return {
        "store": store,
        "table": {noise_std: brief(summaries) for noise_std, summaries in table.items()},
        "keys": keys,
        "markdown": outputs["markdown"],
        "png": outputs["png"],
        "text": outputs["text"],
    }


def run_experiment(config: PipelineConfig, noise_stds: tuple[float, ...], lambda_g: float) -> dict[str, Any]:
    """The noise experiment on the store of a pipeline configuration: ingestion, then `noise_experiment_flow`.

    Every section of ``config`` is used as given (the preprocessing, graph,
    training and classification of ``sae run``), but ``preprocess.noise_std``
    and ``train.model.lambda_g``, which the experiment varies.  With a Dask
    address (``config.cluster`` or ``$SAE_DASK_ADDRESS``) the stages run on that cluster.
    """
    from flows.pipeline import check_frames, dask_address, make_task_runner, resolve_paths, run_ingest_stage
    from sae import store as sae_store

    check_frames(config)
    config = resolve_paths(config)
    address = dask_address(config)
    with sae_store.store_lock(config.ingest.store):
        run_ingest_stage(config, address)
        check_folds(config.ingest.store, config.classify)  # before any training
        runnable = noise_experiment_flow
        if address is not None:
            runnable = runnable.with_options(task_runner=make_task_runner(address))
        out = runnable(config.ingest.store, noise_stds=tuple(noise_stds), lambda_g=lambda_g,
                       preprocess=config.preprocess, graph=config.graph, train=config.train, classify=config.classify)
    return {**out, "cluster": address}
