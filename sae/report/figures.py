"""Figures of results (plain functions, matplotlib Agg): each drawn on a `matplotlib.figure.Figure`
(no pyplot state, no display) and saved as PNG; each returns the path written.

The classification summaries are those of `sae.classify.cross_validate`, keyed
by feature set name (see `sae.report.markdown`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from sae.report.markdown import PUBLISHED_NOISE_TABLE, class_names

__all__ = [
    "plot_results",
    "plot_noise_experiment",
    "SWEEP_METRICS",
    "plot_sweep_metrics",
    "plot_atoms",
    "plot_convergence",
]


def _save_png(fig: Any, path: str | os.PathLike, dpi: int = 100) -> str:
    """Save a figure as PNG at ``path``; returns the path as a string."""
    path = os.fspath(path)
    fig.savefig(path, dpi=dpi)
    return path


def plot_results(results: Mapping[str, Mapping[str, Any]], path: str | os.PathLike) -> str:
    """Save a PNG: accuracy per feature set (bars, std error bars, chance line) and
    the row-normalised confusion matrix of each feature set.

    Returns the path written.
    """
    from matplotlib.figure import Figure

    names = list(results)
    n_panels = 1 + len(names)
    fig = Figure(figsize=(4.2 * n_panels, 4.0), layout="constrained")
    axes = fig.subplots(1, n_panels, squeeze=False)[0]
    means = [100 * results[name]["accuracy_mean"] for name in names]
    stds = [100 * results[name]["accuracy_std"] for name in names]
    ax = axes[0]
    ax.bar(range(len(names)), means, yerr=stds, capsize=4, color="tab:blue")
    if names:
        ax.axhline(100 * results[names[0]]["chance"], color="tab:red", linestyle="--", label="chance")
        ax.legend(loc="lower right")
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("accuracy (mean ± std over splits)")
    for ax, name in zip(axes[1:], names):
        confusion = np.asarray(results[name]["confusion"], dtype=np.float64)
        support = confusion.sum(axis=1, keepdims=True)
        normalised = np.divide(confusion, support, out=np.zeros_like(confusion), where=support > 0)
        image = ax.imshow(normalised, vmin=0, vmax=1, cmap="Blues")
        labels = class_names(results[name])
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{name}: confusion (row share)")
        fig.colorbar(image, ax=ax, shrink=0.8)
    return _save_png(fig, path, dpi=100)


def plot_noise_experiment(
    table: Mapping[float, Mapping[str, Mapping[str, Any]]],
    path: str | os.PathLike,
    *,
    published: Mapping[float, Mapping[str, float]] | None = PUBLISHED_NOISE_TABLE,
) -> str:
    """Save a PNG of accuracy (%) against noise std, one line (± std) per feature set;
    the thesis's figures, when given for a feature set, as a dashed line of the same colour.

    Returns the path written.
    """
    from matplotlib.figure import Figure

    noise = sorted(table)
    names = list(dict.fromkeys(name for row in table.values() for name in row))
    fig = Figure(figsize=(6.0, 4.0), layout="constrained")
    ax = fig.subplots()
    for index, name in enumerate(names):
        color = f"C{index}"
        xs = [s for s in noise if name in table[s]]
        ax.errorbar(
            xs,
            [100 * table[s][name]["accuracy_mean"] for s in xs],
            yerr=[100 * table[s][name]["accuracy_std"] for s in xs],
            marker="o", capsize=4, color=color, label=name,
        )
        ref = [(s, published[s][name]) for s in sorted(published or {}) if name in published[s]]
        if ref:
            ax.plot(*zip(*ref), linestyle="--", marker="x", color=color, label=f"{name} (thesis)")
    ax.set_xlabel("noise std")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("accuracy against noise")
    ax.grid(True)
    ax.legend(loc="best", fontsize="small")
    return _save_png(fig, path, dpi=100)


SWEEP_METRICS: dict[str, tuple[str, ...]] = {
    "accuracy (%)": ("accuracy_mean", "baseline_mean", "chance"),
    "non-zero codes (%)": ("sparsity_percent",),
    "objective at the end (weighted)": ("reconstruction_weighted", "sparsity_weighted", "graph_weighted",
                                        "encoder_weighted", "total"),
    "training time (s)": ("train_seconds",),
    "iterations": ("outer_iterations", "inner_codes", "inner_dictionary", "inner_encoder"),
}
"""Panels of `plot_sweep_metrics`: title -> the row columns drawn in it (see `sae.sweep.point_row`)."""


def _numeric(values: Sequence[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def plot_sweep_metrics(rows: Sequence[Mapping[str, Any]], parameter: str, path: str | os.PathLike) -> str:
    """Save a PNG of every metric of `SWEEP_METRICS` against the value of ``parameter``.

    One panel per entry; with other swept parameters in the rows, one line per
    combination of their values.  Numeric values on a linear axis (logarithmic
    when they are positive and span a factor of 100 or more), other values as
    categories; objectives and iteration counts on a logarithmic axis; accuracies
    with their std as error bars.  Returns the path written.
    """
    from matplotlib.figure import Figure

    if not rows:
        raise ValueError("plot_sweep_metrics needs at least one row")
    values = list(dict.fromkeys(row[parameter] for row in rows))
    numeric = _numeric(values)
    others = [key for key in rows[0] if key not in (parameter,) and "." in key]
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[key] for key in others), []).append(row)
    fig = Figure(figsize=(4.4 * len(SWEEP_METRICS), 4.0), layout="constrained")
    axes = fig.subplots(1, len(SWEEP_METRICS), squeeze=False)[0]
    for ax, (title, columns) in zip(axes, SWEEP_METRICS.items()):
        for g, (group, members) in enumerate(groups.items()):
            members = sorted(members, key=lambda r: values.index(r[parameter]))
            xs = [r[parameter] if numeric else values.index(r[parameter]) for r in members]
            suffix = (" (" + ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in zip(others, group)) + ")"
                      if others else "")
            for c, column in enumerate(columns):
                ys = np.array([float(r.get(column, float("nan")) or 0.0) for r in members], dtype=np.float64)
                if column.endswith(("_weighted", "inner_encoder", "inner_dictionary")) and not np.any(ys):
                    continue  # a term or step switched off at every point
                scale = 100.0 if column in ("accuracy_mean", "baseline_mean", "chance") else 1.0
                std = column.replace("_mean", "_std")
                yerr = ([scale * float(r[std]) for r in members] if column.endswith("_mean") and std in members[0]
                        else None)
                ax.errorbar(xs, scale * ys, yerr=yerr, marker="o", capsize=3, color=f"C{c}",
                            linestyle=("-", "--", ":", "-.")[g % 4], label=column + suffix)
        if title.startswith(("objective", "iterations")):
            ax.set_yscale("symlog" if title.startswith("iterations") else "log")
        if numeric and all(v > 0 for v in values) and max(values) >= 100 * min(values):
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(values)), [str(v) for v in values], rotation=20)
        ax.set_xlabel(parameter)
        ax.set_title(title)
        ax.grid(True, alpha=0.4)
        ax.legend(loc="best", fontsize="x-small")
    return _save_png(fig, path, dpi=90)


def plot_atoms(components: Mapping[str, np.ndarray], path: str | os.PathLike, max_atoms: int = 128) -> str:
    """Save a PNG of learned dictionaries: one panel per model, atoms (rows of ``C``, (m, n)) as an image.

    Atoms are sorted by the frequency bin of their peak, so that a dictionary of
    narrow-band atoms reads as a diagonal; at most ``max_atoms`` atoms (the
    first ones) are drawn per panel.  Returns the path written.
    """
    from matplotlib.figure import Figure

    if not components:
        raise ValueError("plot_atoms needs at least one dictionary")
    fig = Figure(figsize=(3.2 * len(components), 4.0), layout="constrained")
    axes = fig.subplots(1, len(components), squeeze=False)[0]
    for ax, (label, C) in zip(axes, components.items()):
        C = np.asarray(C, dtype=np.float64)[:max_atoms]
        order = np.argsort(np.argmax(np.abs(C), axis=1), kind="stable")
        limit = float(np.abs(C).max()) or 1.0
        image = ax.imshow(C[order], aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
        ax.set_xlabel("frequency bin")
        ax.set_ylabel("atom (by peak bin)")
        ax.set_title(label, fontsize="small")
        fig.colorbar(image, ax=ax, shrink=0.8)
    return _save_png(fig, path, dpi=90)


def plot_convergence(histories: Mapping[str, Sequence[Mapping[str, Any]]], path: str | os.PathLike) -> str:
    """Save a PNG of the convergence of training: the total objective and each weighted term
    against the outer iteration, one panel per quantity, one line per model (its label).

    ``histories`` maps a label to a model's history (`sae.model.FitResult.history`;
    iteration 0, the initial point, is left out).  Terms that are 0 throughout
    (switched off) are not drawn.  Returns the path written.
    """
    from matplotlib.figure import Figure

    if not histories:
        raise ValueError("plot_convergence needs at least one history")
    quantities = ["total"] + [f"{t}_weighted" for t in ("reconstruction", "sparsity", "graph", "encoder")]
    shown = [q for q in quantities
             if any(float(r.get(q) or 0.0) > 0 for h in histories.values() for r in h[1:])]
    fig = Figure(figsize=(4.0 * len(shown), 3.8), layout="constrained")
    axes = fig.subplots(1, len(shown), squeeze=False)[0]
    for ax, quantity in zip(axes, shown):
        for index, (label, history) in enumerate(histories.items()):
            points = [(r["iteration"], float(r.get(quantity) or 0.0)) for r in history[1:]]
            points = [(i, v) for i, v in points if v > 0]
            if points:
                ax.plot(*zip(*points), marker=".", color=f"C{index % 10}", label=label)
        ax.set_yscale("log")
        ax.set_xlabel("outer iteration")
        ax.set_title(quantity)
        ax.grid(True, alpha=0.4)
        ax.legend(loc="best", fontsize="x-small")
    return _save_png(fig, path, dpi=90)
