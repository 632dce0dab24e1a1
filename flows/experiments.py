"""The thesis's noise experiment as one flow: accuracy against the noise added to the scaled CQT.

For every noise std (default 0, 0.1, 0.2) the flow runs, as coarse Prefect tasks of
the other stages' flows, each skipped when its stage group is already complete:

1. ``preprocess`` (`flows.graph`): the scaled frames plus noise of that std (the graph,
   the models and the baseline all see the same noisy frames);
2. ``graph`` (`flows.graph`): their kNN graph and Laplacian (only if ``lambda_g > 0``);
3. ``train`` (`flows.train`): the auto-encoder with ``lambda_g = 0`` and with ``lambda_g``;
4. the classification (`flows.classify`) of the baseline (the noisy scaled CQT),
   ``lambda_g_off`` and ``lambda_g_on`` codes.

It returns and publishes the thesis's table (noise std x feature set, with the
published figures in brackets, `sae.report.noise_table_markdown`) and a plot
(`sae.report.plot_noise_experiment`) written beside the store::

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

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.context import FlowRunContext
from prefect.task_runners import ThreadPoolTaskRunner

from flows.classify import submit_classification
from flows.graph import graph_task, preprocess_task
from flows.train import train_task
from sae.config import ClassifyConfig, GraphConfig, PipelineConfig, PreprocessConfig, TrainConfig
from sae.report import (
    PUBLISHED_NOISE_TABLE,
    experiment_report,
    inline_images,
    noise_table_markdown,
    plot_noise_experiment,
)
from sae.stages.results import brief, check_folds
from sae.store.keys import MODEL, PREPROCESS, experiment_paths, experiment_tag, group_name, parse_source

COLUMNS = ("baseline", "lambda_g_off", "lambda_g_on")
"""Feature sets of the table, named as `sae.report.PUBLISHED_NOISE_TABLE`."""


@flow(name="noise-experiment", task_runner=ThreadPoolTaskRunner(max_workers=2))
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
    if lambda_g <= 0:
        raise ValueError(f"lambda_g must be > 0 (the graph-regularised column), got {lambda_g}")
    if not noise_stds or any(s < 0 for s in noise_stds):
        raise ValueError(f"noise_stds must be a non-empty list of values >= 0, got {noise_stds}")
    table: dict[float, dict[str, dict[str, Any]]] = {}
    keys: dict[float, dict[str, str]] = {}
    for noise_std in noise_stds:
        pre = preprocess_task.submit(store, preprocess.model_copy(update={"noise_std": float(noise_std)})).result()
        graph_out = graph_task.submit(store, pre["key"], graph).result()
        models = {
            "lambda_g_off": train_task.submit(
                store, pre["key"], None,
                train.model_copy(update={"model": train.model.model_copy(update={"lambda_g": 0.0})}),
            ),
            "lambda_g_on": train_task.submit(
                store, pre["key"], graph_out["key"],
                train.model_copy(update={"model": train.model.model_copy(update={"lambda_g": float(lambda_g)})}),
            ),
        }
        features = {"baseline": group_name(PREPROCESS, pre["key"])}
        features.update({name: group_name(MODEL, future.result()["key"]) for name, future in models.items()})
        key, reused, summaries = submit_classification(store, pre["key"], features, classify)
        table[float(noise_std)] = summaries
        keys[float(noise_std)] = {"preprocess": pre["key"], "graph": graph_out["key"], "results": key,
                                  **{name: parse_source(source)[1] for name, source in features.items()
                                     if name != "baseline"}}
        log.info(
            "noise %g: %s%s", noise_std,
            ", ".join(f"{n} {100 * s['accuracy_mean']:.1f} ± {100 * s['accuracy_std']:.1f}" for n, s in summaries.items()),
            " (reused)" if reused else "",
        )
    tag = experiment_tag([keys[float(s)]["results"] for s in noise_stds])
    markdown_path, png_path = experiment_paths(store, tag)
    # The thesis's figures were measured with its own (leaky) protocol on GTZAN: shown beside that protocol only.
    published = PUBLISHED_NOISE_TABLE if classify.protocol == "thesis" else None
    markdown = experiment_report(table, COLUMNS, protocol=classify.protocol, lambda_g=lambda_g, published=published,
                                 figure=png_path.name)
    markdown_path.parent.mkdir(parents=True, exist_ok=True)
    markdown_path.write_text(markdown)
    plot_noise_experiment(table, png_path, published=published)
    if FlowRunContext.get() is not None:
        create_markdown_artifact(
            inline_images(markdown, png_path.parent), key="noise-experiment",
            description=f"Noise experiment on {store}",
        )
    return {
        "store": store,
        "table": {noise_std: brief(summaries) for noise_std, summaries in table.items()},
        "keys": keys,
        "markdown": str(markdown_path),
        "png": str(png_path),
        "text": noise_table_markdown(table, COLUMNS, published=published),
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
