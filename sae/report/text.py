"""Plain text of results for a terminal: what the ``sae`` command prints (plain functions from data to str).

Each function renders the summary of one command (the JSON output is the
summary itself); the lines are joined by newlines, without a final one.

>>> print(summary_text({"store": "a.zarr", "cluster": None, "skipped": {"ingest": True}}))
store: a.zarr
cluster: local threads
skipped: ingest=True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sae.report.markdown import agreement_text

__all__ = [
    "clips_by_reason",
    "summary_text",
    "verify_text",
    "sweep_text",
    "experiment_text",
    "export_text",
    "predictions_text",
    "predictions_tally",
    "encode_text",
]


def clips_by_reason(found: Mapping[str, str], limit: int = 8) -> list[str]:
    """``{clip_id: reason}`` as one line per reason: the reason, the count and the first clip ids.

    >>> clips_by_reason({"a/1": "missing", "a/2": "missing", "b/1": "checksum"}, limit=1)
    ['missing: 2 clip(s): a/1 ...', 'checksum: 1 clip(s): b/1']
    """
    by_reason: dict[str, list[str]] = {}
    for clip_id, reason in found.items():
        by_reason.setdefault(reason, []).append(clip_id)
    return [f"{reason}: {len(ids)} clip(s): {', '.join(ids[:limit])}{' ...' if len(ids) > limit else ''}"
            for reason, ids in by_reason.items()]


def _fields(values: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items())


def summary_text(summary: Mapping[str, Any]) -> str:
    """A stage's or the pipeline's summary: one ``name: value`` line per entry, then its accuracy table if any."""
    lines = []
    for key, value in summary.items():
        if key == "table" or (key == "results" and "table" in summary):
            continue
        if key == "repaired":
            lines += [f"re-ingested, {line}" for line in clips_by_reason(value)]
            continue
        if key == "cluster" and value is None:
            value = "local threads"
        if isinstance(value, dict):
            value = _fields(value)
        lines.append(f"{key}: {value}")
    if "table" in summary:
        lines.append("\n" + summary["table"])
    return "\n".join(lines)


def verify_text(report: Mapping[str, Any]) -> str:
    """The state of a store (`sae.store.verify`): clips, labels, errors, damaged clips, stages, lock."""
    counts = report["counts"]
    lines = [f"store: {report['store']} (layout {report['layout']})",
             f"clips: {report['n_clips']} ({', '.join(f'{k} {v}' for k, v in counts.items())})",
             "labels: " + ", ".join(f"{name} {n}" for name, n in report["ok_per_label"].items())]
    lines += [f"  label {name!r} has no valid audio file: not a label of this dataset" for name in report["empty_labels"]]
    if report["errors"]:
        kinds: dict[str, int] = {}
        for error in report["errors"]:
            kinds[error["kind"]] = kinds.get(error["kind"], 0) + 1
        lines.append("clips in error: " + ", ".join(f"{kind} {n}" for kind, n in sorted(kinds.items())))
    lines.append(f"damaged clips: {len(report['damaged'])}" if report["damaged"] else "damaged clips: none")
    lines += [f"  {line}" for line in clips_by_reason(report["damaged"])]
    lines.append("stages:")
    for name, info in report["stages"].items():
        state = "ok" if info["complete"] else "; ".join(info["problems"])
        lines.append(f"  {name}: {state}")
    lines.append(f"lock: held by {report['locked']}" if report["locked"] else "lock: free")
    lines.append("intact: yes" if report["intact"] else
                 "intact: no (the next `sae run` re-ingests the damaged clips and recomputes the damaged stages)")
    return "\n".join(lines)


def sweep_text(summary: Mapping[str, Any]) -> str:
    """A sweep's summary (`flows.sweep.sweep_flow`): its files, the stages it computed, its table."""
    lines = [f"{name}: {summary[name]}"
             for name in ("store", "key", "csv", "markdown", "metrics_png", "atoms_png", "convergence_png")]
    lines.append("computed: " + ", ".join(f"{stage} {len(keys)}" for stage, keys in summary["computed"].items()))
    lines.append("\n" + summary["table"])
    return "\n".join(lines)


def experiment_text(summary: Mapping[str, Any]) -> str:
    """The noise experiment's summary (`flows.experiments.noise_experiment_flow`): its files and its table."""
    lines = [f"{name}: {summary[name]}" for name in ("store", "markdown", "png")]
    lines.append("\n" + summary["text"])
    return "\n".join(lines)


def export_text(summary: Mapping[str, Any]) -> str:
    """An exported model folder (`sae.artifact.export_model`): where, what, its size and its accuracy."""
    lines = [f"{name}: {summary[name]}" for name in ("path", "model_key", "results_key", "method")]
    lines.append(f"methods: {', '.join(summary['methods'])}")
    lines.append(f"size: {summary['bytes'] / 1e6:.1f} MB")
    for name, row in (summary["accuracy"] or {}).items():
        lines.append(f"accuracy {name}: {100 * row['accuracy_mean']:.1f} ± {100 * row['accuracy_std']:.1f} % "
                     f"({row['protocol']})")
    return "\n".join(lines)


def predictions_text(records: Sequence[Mapping[str, Any]], top: int) -> str:
    """One line per file (`sae.inference.predict_files`): its path, then its ``top`` labels or its error.

    >>> predictions_text([{"path": "a.wav", "status": "ok", "scores": {"jazz": 0.75, "blues": 0.25}},
    ...                   {"path": "b.wav", "status": "error", "error_kind": "silent", "error": "quiet"}], 1)
    'a.wav\\tjazz 0.75\\nb.wav\\terror silent: quiet'
    """
    lines = []
    for record in records:
        if record["status"] == "ok":
            best = "  ".join(f"{name} {share:.2f}" for name, share in list(record["scores"].items())[:top])
            lines.append(f"{record['path']}\t{best}")
        else:
            lines.append(f"{record['path']}\terror {record['error_kind']}: {record['error']}")
    return "\n".join(lines)


def predictions_tally(n_files: int, n_errors: int, method: str) -> str:
    """How many files were classified, and by which method."""
    return f"{n_files - n_errors} of {n_files} files classified (method {method})"


def encode_text(summary: Mapping[str, Any]) -> str:
    """An encoded collection's summary (`flows.predict.predict_flow`): the store, its key, counts and tables."""
    lines = []
    for name in ("store", "key", "method", "counts", "csv", "markdown"):
        value = summary[name]
        lines.append(f"{name}: {_fields(value) if isinstance(value, dict) else value}")
    if summary.get("agreement"):
        lines.append(f"agreement: {agreement_text(summary['agreement'])}")
    return "\n".join(lines)
