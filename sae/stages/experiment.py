"""The noise experiment's stages: per noise std, the configuration of each stage; its table, report and plot.

For every noise std the experiment preprocesses the frames with that noise,
builds their graph, trains the auto-encoder with ``lambda_g = 0`` and with the
given ``lambda_g`` (both by the same Z-step solver and stopping rule, so that
the columns differ by the graph term alone), and classifies the baseline (the noisy scaled CQT) and both
models' codes (`COLUMNS`).  `noise_stages` derives each stage's configuration;
`noise_features` and `noise_keys` name what was computed; `write_experiment_outputs`
writes the report and the plot beside the store (`sae.store.keys.experiment_paths`).
``flows.experiments`` runs the stages as Prefect tasks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sae.config import PreprocessConfig, TrainConfig
from sae.store.keys import MODEL, PREPROCESS, experiment_paths, experiment_tag, group_name, parse_source

COLUMNS = ("baseline", "lambda_g_off", "lambda_g_on")
"""Feature sets of the table, named as `sae.report.PUBLISHED_NOISE_TABLE`."""

PAIRED = ("lambda_g_on", "lambda_g_off")
"""The columns the table compares split by split: what the graph term adds."""


@dataclass(frozen=True)
class NoiseStages:
    """The configurations of one noise std's stages.

    Attributes
    ----------
    noise_std : float
    preprocess : PreprocessConfig
        The preprocessing with ``noise_std``.
    trainings : dict
        ``lambda_g_off`` and ``lambda_g_on`` -> their `TrainConfig` (``lambda_g`` 0 and the experiment's).
    """

    noise_std: float
    preprocess: PreprocessConfig
    trainings: dict[str, TrainConfig]

    def models(self, graph_key: str) -> dict[str, tuple[str | None, TrainConfig]]:
        """Model name -> (the graph key it is trained with, None when ``lambda_g = 0``; its training)."""
        return {name: (graph_key if train.model.lambda_g > 0 else None, train)
                for name, train in self.trainings.items()}


def _with_lambda_g(train: TrainConfig, lambda_g: float) -> TrainConfig:
    """``train`` with ``lambda_g``; without the graph term, the solver of the graph column ('auto' would take
    coordinate descent to a certified gap there, and FISTA stopped on the change with the graph)."""
    update: dict[str, Any] = {"lambda_g": float(lambda_g)}
    if lambda_g == 0 and train.model.z_solver == "auto":
        update["z_solver"] = "fista"
    return train.model_copy(update={"model": train.model.model_copy(update=update)})


def noise_stages(
    noise_stds: Sequence[float], lambda_g: float, preprocess: PreprocessConfig, train: TrainConfig
) -> list[NoiseStages]:
    """The stages of every noise std, in order: ``preprocess.noise_std`` and ``train.model.lambda_g`` overridden.

    Raises
    ------
    ValueError
        ``lambda_g <= 0`` (the graph-regularised column needs a graph), or no
        noise std, or a negative one.
    """
    if lambda_g <= 0:
        raise ValueError(f"lambda_g must be > 0 (the graph-regularised column), got {lambda_g}")
    if not noise_stds or any(s < 0 for s in noise_stds):
        raise ValueError(f"noise_stds must be a non-empty list of values >= 0, got {noise_stds}")
    return [
        NoiseStages(
            noise_std=float(noise_std),
            preprocess=preprocess.model_copy(update={"noise_std": float(noise_std)}),
            trainings={"lambda_g_off": _with_lambda_g(train, 0.0), "lambda_g_on": _with_lambda_g(train, lambda_g)},
        )
        for noise_std in noise_stds
    ]


def noise_features(preprocess_key: str, model_keys: Mapping[str, str]) -> dict[str, str]:
    """The feature sources of one noise std: ``baseline`` (the noisy frames), then each model's codes."""
    features = {"baseline": group_name(PREPROCESS, preprocess_key)}
    features.update({name: group_name(MODEL, key) for name, key in model_keys.items()})
    return features


def noise_keys(preprocess_key: str, graph_key: str, results_key: str, features: Mapping[str, str]) -> dict[str, str]:
    """The stage keys of one noise std: ``preprocess``, ``graph``, ``results`` and each model's by its name."""
    return {"preprocess": preprocess_key, "graph": graph_key, "results": results_key,
            **{name: parse_source(source)[1] for name, source in features.items() if name != "baseline"}}


def write_experiment_outputs(
    store: str,
    noise_stds: Sequence[float],
    table: Mapping[float, Mapping[str, Mapping[str, Any]]],
    keys: Mapping[float, Mapping[str, str]],
    *,
    lambda_g: float,
    protocol: str,
) -> dict[str, str]:
    """The markdown report and the plot of the experiment beside the store, named by its results keys.

    Parameters
    ----------
    store : str
    noise_stds : list of float
        As the experiment was given them (they name the files, in this order).
    table : dict
        Noise std -> feature set (`COLUMNS`) -> classification summary.
    keys : dict
        Noise std -> `noise_keys`.
    lambda_g : float
    protocol : str
        The classification protocol: the thesis's figures are shown beside its own protocol only.

    Returns
    -------
    dict
        ``markdown`` and ``png`` (paths), ``report`` (the markdown written) and
        ``text`` (the table, `sae.report.noise_table_markdown`).
    """
    from sae.report import PUBLISHED_NOISE_TABLE, experiment_report, noise_table_markdown, plot_noise_experiment

    tag = experiment_tag([keys[float(s)]["results"] for s in noise_stds])
    markdown_path, png_path = experiment_paths(store, tag)
    # The thesis's figures were measured with its own (leaky) protocol on GTZAN: shown beside that protocol only.
    published = PUBLISHED_NOISE_TABLE if protocol == "thesis" else None
    markdown = experiment_report(table, COLUMNS, protocol=protocol, lambda_g=lambda_g, published=published,
                                 figure=png_path.name, paired=PAIRED)
    markdown_path.parent.mkdir(parents=True, exist_ok=True)
    markdown_path.write_text(markdown)
    plot_noise_experiment(table, png_path, published=published)
    return {"markdown": str(markdown_path), "png": str(png_path), "report": markdown,
            "text": noise_table_markdown(table, COLUMNS, published=published, paired=PAIRED)}
