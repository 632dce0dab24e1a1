"""Markdown of results: the tables, and the reports written beside a store and published as Prefect artifacts.

Plain functions from data to str.  The classification summaries are those of
`sae.classify.cross_validate` (dicts with ``accuracy_mean``, ``accuracy_std``,
``chance``, ``classes``, ``per_class_accuracy``, ``confusion``, optionally
``class_names`` and ``voting``), keyed by feature set name.  A report links its
figures by file name (the PNGs of `sae.report.figures` in the same folder);
`inline_images` makes a copy that holds them.

>>> summary = {"accuracy_mean": 0.8, "accuracy_std": 0.05, "chance": 0.5, "n_scores": 10,
...            "protocol": "grouped", "classes": [0, 1], "class_names": ["blues", "disco"],
...            "per_class_accuracy": [0.9, 0.7], "confusion": [[9, 1], [3, 7]]}
>>> print(results_markdown({"cqt": summary}).splitlines()[4])
| cqt | grouped | 80.0 ± 5.0 | 50.0 | 10 |
"""

from __future__ import annotations

import base64
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "inline_images",
    "PUBLISHED_NOISE_TABLE",
    "history_markdown",
    "results_markdown",
    "noise_table_markdown",
    "paired_difference",
    "accuracy_table",
    "errors_markdown",
    "summary_rows",
    "sweep_table",
    "predictions_markdown",
    "classification_report",
    "pipeline_report",
    "model_report",
    "experiment_report",
    "sweep_report",
]

PUBLISHED_NOISE_TABLE: dict[float, dict[str, float]] = {
    0.0: {"baseline": 69.7, "lambda_g_off": 75.9, "lambda_g_on": 78.0},
    0.1: {"baseline": 58.7, "lambda_g_off": 57.1, "lambda_g_on": 65.9},
    0.2: {"baseline": 46.9, "lambda_g_off": 42.6, "lambda_g_on": 51.6},
}
"""The thesis's accuracies (%) by noise std: CQT baseline, lambda_g off, lambda_g = 100
(5 genres x 100 clips x 149 frames, m = 128, lambda_z = 1, lambda_d = 10, K = 10)."""


_IMAGE_LINK = re.compile(r"!\[([^\]]*)\]\(([^)\s]+\.png)\)")

INLINE_MAX_BYTES = 4_000_000
"""Largest PNG `inline_images` embeds (larger ones stay links)."""


def inline_images(markdown: str, folder: str | os.PathLike, max_bytes: int = INLINE_MAX_BYTES) -> str:
    """``markdown`` with every image link to a PNG file of ``folder`` replaced by the image itself (a data URI).

    A report written beside the store links its figures by relative path
    (``![confusion](classify-abc.png)``), which any markdown viewer of the
    folder shows; a copy with the images inline shows them anywhere else (a
    Prefect artifact in the UI).  Links to missing files, to other kinds of
    file, or to PNGs above ``max_bytes`` are left as they are.

    >>> inline_images("![none](missing.png) and text", ".")
    '![none](missing.png) and text'
    """
    folder = Path(folder)

    def embed(match: re.Match) -> str:
        path = folder / match.group(2)
        if not path.is_file() or path.stat().st_size > max_bytes:
            return match.group(0)
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return f"![{match.group(1)}](data:image/png;base64,{data})"

    return _IMAGE_LINK.sub(embed, markdown)


# --------------------------------------------------------------------------- tables


def _number(value: Any, spec: str) -> str:
    """``value`` formatted with ``spec``, or an empty cell when it is missing or not finite."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return format(value, spec)


def history_markdown(history: Sequence[Mapping[str, Any]]) -> str:
    """A markdown table of a training history (`sae.model.FitResult.history`), one row per outer iteration.

    >>> record = {"iteration": 1, "total": 1234.56789, "relative_change": 0.01234, "sparsity_percent": 4.567,
    ...           "inner_codes": 30, "inner_dictionary": 12, "inner_encoder": 0, "seconds": 1.234}
    >>> print(history_markdown([record]).splitlines()[2])
    | 1 | 1234.57 | 1.23e-02 | 4.57 | 30 / 12 / 0 | 1.2 |
    """
    lines = ["| outer | objective | relative change | non-zeros (%) | inner Z / D / E | time (s) |",
             "|---|---|---|---|---|---|"]
    for record in history:
        inner = " / ".join(str(record.get(f"inner_{step}", 0)) for step in ("codes", "dictionary", "encoder"))
        lines.append(
            f"| {record['iteration']} | {_number(record.get('total'), '.6g')} "
            f"| {_number(record.get('relative_change'), '.2e')} | {_number(record.get('sparsity_percent'), '.2f')} "
            f"| {inner} | {_number(record.get('seconds'), '.1f')} |"
        )
    return "\n".join(lines) + "\n"


def percent(value: float) -> str:
    """A share as a percentage with one decimal, ``n/a`` when missing."""
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def class_names(summary: Mapping[str, Any]) -> list[str]:
    """The class names of a classification summary (its classes when it has no names)."""
    return [str(name) for name in summary.get("class_names") or summary["classes"]]


def _protocol_cell(summary: Mapping[str, Any]) -> str:
    """The protocol and what its folds keep together: "grouped (141 groups)", "thesis (leaky)".

    >>> _protocol_cell({"protocol": "grouped", "grouping": "group", "n_groups": 141})
    'grouped (141 groups)'
    >>> _protocol_cell({"protocol": "thesis", "grouping": "none"})
    'thesis (vectors, leaky)'
    """
    protocol, grouping = str(summary.get("protocol", "")), summary.get("grouping")
    if grouping == "none":
        return f"{protocol} (vectors, leaky)"
    if grouping in ("group", "clip") and summary.get("n_groups"):
        return f"{protocol} ({summary['n_groups']} {grouping}s)"
    return protocol


def results_markdown(results: Mapping[str, Mapping[str, Any]], title: str = "Genre classification") -> str:
    """A markdown report: accuracy per feature set, then per-class accuracy.

    Accuracies in percent, ``mean ± std`` over the splits; chance is the share
    of the majority class.  With voting, a column of whole-clip accuracy.
    """
    voting = any("voting" in summary for summary in results.values())
    header = ["features", "protocol", "accuracy (%)", "chance (%)", "splits"]
    if voting:
        header.append("clip accuracy, voting (%)")
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, summary in results.items():
        row = [
            name,
            _protocol_cell(summary),
            f"{percent(summary['accuracy_mean'])} ± {percent(summary['accuracy_std'])}",
            percent(summary["chance"]),
            str(summary.get("n_scores", len(summary.get("scores", [])))),
        ]
        if voting:
            vote = summary.get("voting")
            row.append(f"{percent(vote['accuracy_mean'])} ± {percent(vote['accuracy_std'])}" if vote else "")
        lines.append("| " + " | ".join(row) + " |")
    if results:
        first = next(iter(results.values()))
        names = class_names(first)
        lines += ["", "Per-class accuracy (%, recall over all splits pooled):", ""]
        lines += ["| class | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
        for k, class_name in enumerate(names):
            cells = [percent(summary["per_class_accuracy"][k]) for summary in results.values()]
            lines.append(f"| {class_name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def noise_table_markdown(
    table: Mapping[float, Mapping[str, Mapping[str, Any]]],
    columns: Sequence[str] | None = None,
    *,
    published: Mapping[float, Mapping[str, float]] | None = PUBLISHED_NOISE_TABLE,
    paired: tuple[str, str] | None = None,
) -> str:
    """The thesis's noise table: accuracy (%) per noise std (rows) and feature set (columns).

    ``table[noise_std][feature]`` is a summary of `sae.classify.cross_validate`;
    ``columns`` fixes the column order (default: first appearance).  With
    ``published``, each cell whose noise std and column name are in it shows
    the thesis's figure in brackets.  With ``paired = (a, b)``, a last column
    gives the mean ± std over the splits of the per-split difference ``a - b``
    (points) and the splits ``a`` wins (both classified on the same splits).

    >>> cell = {"accuracy_mean": 0.7, "accuracy_std": 0.02}
    >>> print(noise_table_markdown({0.0: {"baseline": cell}}).splitlines()[2])
    | 0 | 70.0 ± 2.0 (69.7) |
    >>> two = {"a": {"accuracy_mean": 0.6, "accuracy_std": 0.1, "scores": [0.5, 0.7]},
    ...        "b": {"accuracy_mean": 0.5, "accuracy_std": 0.0, "scores": [0.5, 0.5]}}
    >>> print(noise_table_markdown({0.0: two}, published=None, paired=("a", "b")).splitlines()[2])
    | 0 | 60.0 ± 10.0 | 50.0 ± 0.0 | +10.0 ± 10.0 (1 of 2) |
    """
    if columns is None:
        columns = list(dict.fromkeys(name for row in table.values() for name in row))
    header = list(columns) + ([f"{paired[0]} - {paired[1]}, paired (splits won)"] if paired else [])
    lines = ["| noise std | " + " | ".join(header) + " |", "|---|" + "---|" * len(header)]
    for noise_std in sorted(table):
        cells = []
        for name in columns:
            summary = table[noise_std].get(name)
            cell = (
                f"{percent(summary['accuracy_mean'])} ± {percent(summary['accuracy_std'])}" if summary else "—"
            )
            reference = (published or {}).get(float(noise_std), {}).get(name)
            if reference is not None:
                cell += f" ({reference:.1f})"
            cells.append(cell)
        if paired:
            cells.append(paired_difference(*((table[noise_std].get(name) or {}).get("scores") for name in paired)))
        lines.append(f"| {noise_std:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def paired_difference(a: Sequence[float] | None, b: Sequence[float] | None) -> str:
    """``a - b`` over the splits both were classified on (per-split accuracies): mean ± std (points), and the
    splits ``a`` wins; "—" unless both are given, of the same length.

    >>> paired_difference([0.5, 0.7], [0.5, 0.5])
    '+10.0 ± 10.0 (1 of 2)'
    """
    first, second = (np.asarray([] if s is None else s, dtype=float) for s in (a, b))
    if first.size == 0 or first.shape != second.shape:
        return "—"
    difference = 100 * (first - second)
    return f"{difference.mean():+.1f} ± {difference.std():.1f} ({int((difference > 0).sum())} of {difference.size})"


def accuracy_table(results: Mapping[str, Mapping[str, float]]) -> str:
    """A markdown table of accuracies: feature set, mean ± std (%), chance (%), splits.

    >>> print(accuracy_table({"baseline": {"accuracy_mean": 0.5, "accuracy_std": 0.05, "chance": 0.2, "n_scores": 10}}))
    | features | accuracy (%) | chance (%) | splits |
    |---|---|---|---|
    | baseline | 50.0 ± 5.0 | 20.0 | 10 |
    """
    lines = ["| features | accuracy (%) | chance (%) | splits |", "|---|---|---|---|"]
    for name, row in results.items():
        lines.append(
            f"| {name} | {100 * row['accuracy_mean']:.1f} ± {100 * row['accuracy_std']:.1f} "
            f"| {100 * row['chance']:.1f} | {row['n_scores']} |"
        )
    return "\n".join(lines)


def errors_markdown(summary: Mapping[str, Any]) -> str:
    """A markdown report of an ingestion summary (`sae.store.ingest_summary`): counts, then one table row per error."""
    from sae.store import STATUSES  # the order of the counts; the store's modules load only when needed

    counts = summary["counts"]
    lines = [
        f"# Ingestion of `{summary['store']}`",
        "",
        ", ".join(f"{name}: {counts[name]}" for name in STATUSES) + f" (of {summary['n_clips']} clips)",
        "",
    ]
    for label in summary.get("empty_labels", []):
        lines += [f"Label `{label}` has no valid audio file: it is not a label of this dataset.", ""]
    if summary["errors"]:
        lines += ["| clip | kind | message |", "|---|---|---|"]
        for err in summary["errors"]:
            message = err["message"].replace("|", "\\|").replace("\n", " ")
            lines.append(f"| `{err['clip_id']}` | {err['kind']} | {message} |")
    else:
        lines.append("No errors.")
    return "\n".join(lines) + "\n"


def summary_rows(rows: Sequence[Mapping[str, Any]], parameters: Sequence[str]) -> list[dict[str, Any]]:
    """The headline columns of a sweep's rows, rounded to what is worth reading (the CSV keeps every digit).

    >>> row = {"train.model.lambda_g": 100, "accuracy_mean": 0.6250000000000001, "accuracy_std": 0.05,
    ...        "baseline_mean": 0.7, "baseline_std": 0.04, "chance": 0.2, "sparsity_percent": 4.7123,
    ...        "train_seconds": 12.34, "outer_iterations": 7, "inner_codes": 300, "total": 1234.5678}
    >>> summary_rows([row], ["train.model.lambda_g"])[0]  # doctest: +NORMALIZE_WHITESPACE
    {'lambda_g': 100, 'accuracy (%)': 62.5, 'accuracy std (%)': 5.0, 'baseline (%)': 70.0,
     'baseline std (%)': 4.0, 'chance (%)': 20.0, 'non-zeros (%)': 4.71, 'objective': 1234.57,
     'train (s)': 12.3, 'outer': 7, 'inner Z': 300}
    """
    out = []
    for row in rows:
        item: dict[str, Any] = {p.rsplit(".", 1)[-1]: row[p] for p in parameters}
        for name in ("accuracy", "baseline"):
            item[f"{name} (%)"] = round(100 * row[f"{name}_mean"], 1)
            item[f"{name} std (%)"] = round(100 * row[f"{name}_std"], 1)
        item.update({
            "chance (%)": round(100 * row["chance"], 1),
            "non-zeros (%)": round(row["sparsity_percent"], 2),
            "objective": float(f"{row['total']:.6g}"),
            "train (s)": round(row["train_seconds"], 1),
            "outer": row["outer_iterations"],
            "inner Z": row["inner_codes"],
        })
        out.append(item)
    return out


def sweep_table(rows: Sequence[Mapping[str, Any]], parameters: Sequence[str]) -> str:
    """Markdown table of a sweep: the swept values, accuracy ± std, baseline, chance, non-zeros, time, iterations.

    >>> row = {"train.model.lambda_g": 100, "accuracy_mean": 0.8, "accuracy_std": 0.05, "baseline_mean": 0.7,
    ...        "baseline_std": 0.04, "chance": 0.2, "sparsity_percent": 4.71, "train_seconds": 12.3,
    ...        "outer_iterations": 7, "inner_codes": 300, "total": 1234.5}
    >>> print(sweep_table([row], ["train.model.lambda_g"]).splitlines()[2])
    | 100 | 80.0 ± 5.0 | 70.0 ± 4.0 | 20.0 | 4.71 | 1234.5 | 12.3 | 7 / 300 |
    """
    names = [p.rsplit(".", 1)[-1] for p in parameters]
    header = names + [
        "accuracy (%)", "baseline (%)", "chance (%)", "non-zeros (%)", "objective", "train (s)", "outer / inner Z",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for item in summary_rows(rows, parameters):
        cells = [str(item[name]) for name in names] + [
            f"{item['accuracy (%)']:.1f} ± {item['accuracy std (%)']:.1f}",
            f"{item['baseline (%)']:.1f} ± {item['baseline std (%)']:.1f}",
            f"{item['chance (%)']:.1f}",
            f"{item['non-zeros (%)']:.2f}",
            f"{item['objective']:.6g}",
            f"{item['train (s)']:.1f}",
            f"{item['outer']} / {item['inner Z']}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def agreement_text(agreement: Mapping[str, Any]) -> str:
    """One sentence for `sae.collection.label_agreement`'s result.

    >>> print(agreement_text({"clips": 4, "correct": 3, "accuracy": 0.75}))
    Given label predicted for 3 of the 4 classified clips whose label is one of the model's classes (75.0 %).
    """
    return (f"Given label predicted for {agreement['correct']} of the {agreement['clips']} classified clips whose "
            f"label is one of the model's classes ({100 * agreement['accuracy']:.1f} %).")


def predictions_markdown(out: str, rows: Sequence[Mapping[str, Any]], *, top: int = 3,
                         agreement: Mapping[str, Any] | None = None) -> str:
    """The predictions of a collection (`sae.collection.predictions`) as a markdown table, one row per clip.

    ``agreement`` (`sae.collection.label_agreement`), when given, is stated above the table.

    >>> row = {"clip_id": "a/1", "label": "jazz", "predicted": "blues", "scores": {"blues": 0.6, "jazz": 0.4}}
    >>> print(predictions_markdown("new.zarr", [row]).splitlines()[-1])
    | `a/1` | jazz | **blues** | blues 0.60, jazz 0.40 |
    """
    ok = [row for row in rows if "predicted" in row]
    lines = [f"# Predictions of `{out}`", "", f"{len(ok)} of {len(rows)} clips classified.", ""]
    if agreement is not None:
        lines += [agreement_text(agreement), ""]
    lines += ["| clip | given label | predicted | top scores |", "|---|---|---|---|"]
    for row in rows:
        if "predicted" in row:
            best = ", ".join(f"{name} {share:.2f}" for name, share in list(row["scores"].items())[:top])
            lines.append(f"| `{row['clip_id']}` | {row['label']} | **{row['predicted']}** | {best} |")
        else:
            message = row["error"].replace("|", "\\|").replace("\n", " ")
            lines.append(f"| `{row['clip_id']}` | {row['label']} | error: {row['error_kind'] or row['status']} "
                         f"| {message} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- reports


def classification_report(results: Mapping[str, Mapping[str, Any]], title: str, figure: str) -> str:
    """The report of a ``results/<key>`` group: `results_markdown` and its figure (a file name)."""
    return results_markdown(results, title=title) + f"\n![Accuracies and confusion matrices]({figure})\n"


def pipeline_report(store: str, results: Mapping[str, Mapping[str, float]], figure: Path) -> str:
    """The summary of a pipeline run: its `accuracy_table` and the classification figure (its path)."""
    return (f"# Pipeline on `{store}`\n\n{accuracy_table(results)}\n\n"
            f"![Accuracies and confusion matrices]({figure.name})\n\n"
            f"Reports in `{figure.parent}`\n")


def model_report(
    key: str, store: str, model: Mapping[str, Any], *, convergence_png: str, atoms_png: str
) -> str:
    """The report of ``model/<key>`` (`sae.distributed.open_model`): its history and its figures (file names)."""
    return (
        f"# Model {key}\n\nStore `{store}`: {model['iteration']} outer iterations "
        f"({model['stop_reason'] or 'not finished'}).\n\n"
        + history_markdown(model["history"])
        + f"\n![Convergence of each weighted term]({convergence_png})\n"
        + f"\n![Learned atoms, sorted by peak frequency bin]({atoms_png})\n"
    )


def experiment_report(
    table: Mapping[float, Mapping[str, Mapping[str, Any]]],
    columns: Sequence[str],
    *,
    protocol: str,
    lambda_g: float,
    published: Mapping[float, Mapping[str, float]] | None,
    figure: str,
    paired: tuple[str, str] | None = None,
) -> str:
    """The report of the noise experiment: `noise_table_markdown` under what it measured, and its figure.

    The folds' grouping is read from the first summary of ``table``.
    """
    grouping = next(iter(next(iter(table.values())).values())).get("grouping", "clip")
    return (
        f"# Noise experiment ({protocol} protocol, lambda_g = {lambda_g:g})\n\n"
        + ("Accuracy (%), mean ± std over the splits; the thesis's figures (GTZAN, its protocol) in brackets.\n\n"
           if published else
           f"Accuracy (%), mean ± std over the splits; folds grouped by {grouping} (no {grouping} on both sides).\n\n")
        + noise_table_markdown(table, columns, published=published, paired=paired)
        + f"\n![Accuracy against noise]({figure})\n"
    )


def sweep_report(
    rows: Sequence[Mapping[str, Any]],
    parameters: Sequence[str],
    *,
    store: str,
    protocol: str,
    csv: Path,
    metrics_png: str,
    convergence_png: str,
    atoms_png: str,
) -> str:
    """The report of a sweep: `sweep_table`, where every column is (the CSV's path) and the figures (file names)."""
    return (
        f"# Sweep over {', '.join(parameters)}\n\n"
        f"Store `{store}`; accuracy of the codes and of the scaled CQT (baseline), mean ± std over the "
        f"splits ({protocol} protocol); objective at the end of training.\n\n"
        + sweep_table(rows, parameters)
        + f"\n\nEvery column of every point: `{csv}`\n\n"
        + f"![Metrics against {parameters[0]}]({metrics_png})\n\n"
        + f"![Convergence of each weighted term]({convergence_png})\n\n"
        + f"![Learned atoms, sorted by peak frequency bin]({atoms_png})\n"
    )
