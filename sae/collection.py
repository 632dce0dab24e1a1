"""A whole collection through a trained model: codes, clip vectors and predictions in a store.

The collection's store is an ordinary store (`sae.store`: ``frames``, the clip
table, chunks of ``chunk_clips`` clips) made from the model's CQT
configuration, plus one stage group ``encode/<key>`` per model and encoding
method (``key``: `sae.store.keys.encode_key`)::

    encode/<key>/
      codes         float32 (n_clips * n_rows, n_atoms)  rows [i n_rows, (i+1) n_rows) of clip i
      vectors       float32 (n_clips * V, n_atoms * P)   its window vectors, P pooling statistics
                                                         (`sae.pooling.aggregate_config`)
      scores        float32 (n_clips, n_classes)         vote shares of the classes (`sae.classify.vote_shares`)
      label_index   int32   (n_clips,)                   predicted class, index into attrs classes; -1 if not ok
      attrs         model (folder, manifest digest), method, classes, n_rows, vectors_per_clip,
                    encoded_chunks (chunks done), and the stage attributes (complete, manifest...)

Rows of clips that are not ok hold zeros.  Every array is chunked by the
store's clip chunks, so the batch of chunk ``c`` (`encode_chunk`) writes whole
chunks of every array, without locks, as ingestion writes ``frames``.  The
clip table and ``encoded_chunks`` are written by the run's process only
(`record_chunk`); a rerun ingests the clips not ok (those in error are tried
again, as ingestion does) and encodes their chunks and the chunks not done, so
an interrupted run resumes.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from sae import store as sae_store
from sae.report import predictions_markdown
from sae.store.keys import ENCODE, encode_key, prediction_paths

__all__ = ["prepare_encoding", "pending_chunks", "encode_chunk", "record_chunk",
           "finish_encoding", "predictions", "write_predictions"]


def prepare_encoding(out: str, model: Any, method: str) -> str:
    """Create (or reopen, to resume) ``encode/<key>`` in the collection's store; returns the key."""
    root = sae_store.open_store(out, mode="r+")
    key = encode_key(model, method)
    config = {"model": model.info["digest"], "method": method}
    if key in sae_store.stages(root).get(ENCODE, []):
        return key
    group = sae_store.stage_group(root, ENCODE, key, config=config, mode="w")
    n_clips, chunk_clips = int(root.attrs["n_clips"]), int(root.attrs["chunk_clips"])
    n_rows, m = model.n_rows, model.model.n_atoms
    n_vectors, width = model.vectors(np.zeros((n_rows, m)), 1).shape  # width: n_atoms x the pooling statistics
    n_classes = len(model.classes_)
    for name, shape, chunks, dtype in (
        ("codes", (n_clips * n_rows, m), (chunk_clips * n_rows, m), "float32"),
        ("vectors", (n_clips * n_vectors, width), (chunk_clips * n_vectors, width), "float32"),
        ("scores", (n_clips, n_classes), (chunk_clips, n_classes), "float32"),
        ("label_index", (n_clips,), (chunk_clips,), "int32"),
    ):
        sae_store.create_array(group, name, shape=shape, chunks=chunks, dtype=dtype)
    group.attrs.update({
        "model": {"path": model.info["path"], "digest": model.info["digest"]}, "method": method,
        "classes": model.classes_.tolist(), "n_rows": n_rows, "vectors_per_clip": n_vectors, "encoded_chunks": [],
    })
    return key


def pending_chunks(out: str, key: str) -> list[tuple[int, list[int]]]:
    """The work of a run: ``(chunk, clips not ok)`` for every chunk not encoded yet or with clips not ok
    (clips in error are tried again, as ingestion does)."""
    root = sae_store.open_store(out)
    done = set(sae_store.stage_group(root, ENCODE, key, mode="r").attrs["encoded_chunks"])
    todo = dict(sae_store.pending_batches(root))
    return [(chunk, todo.get(chunk, [])) for chunk in range(sae_store.n_chunks(root)) if chunk in todo or chunk not in done]


def encode_chunk(out: str, key: str, chunk_index: int, model: Any, records: list[dict[str, Any]]) -> int:
    """Encode the ok clips of one chunk with ``model`` and write that chunk of every array of ``encode/<key>``.

    ``records`` are the outcomes of the clips this batch has just ingested
    (`sae.audio.process_batch`), not yet in the clip table.  Returns the
    number of clips encoded.
    """
    root = sae_store.open_store(out, mode="r+")
    group = sae_store.stage_group(root, ENCODE, key, mode="r")
    method, n_rows = group.attrs["method"], int(group.attrs["n_rows"])
    clips = sae_store.chunk_clips_range(root, chunk_index)
    status = {i: str(s) for i, s in zip(clips, sae_store.clip_table(root)["status"][clips.start : clips.stop])}
    status.update({int(record["index"]): record["status"] for record in records})
    frames = sae_store.read_chunk_frames(root, chunk_index)
    n_frames = sae_store.store_frames_per_clip(root)
    m, n_vectors = model.model.n_atoms, int(group.attrs["vectors_per_clip"])
    width = group["vectors"].shape[1]
    codes = np.zeros((len(clips) * n_rows, m), dtype=np.float32)
    vectors = np.zeros((len(clips) * n_vectors, width), dtype=np.float32)
    scores = np.zeros((len(clips), len(model.classes_)), dtype=np.float32)
    label_index = np.full(len(clips), -1, dtype=np.int32)
    for position, clip in enumerate(clips):
        if status[clip] != "ok":
            continue
        X = model.model_input(frames[position * n_frames : (position + 1) * n_frames])
        clip_codes = model.encode(X, method)
        clip_vectors = model.vectors(clip_codes, 1)
        shares = model.scores_of_vectors(clip_vectors, 1, method)[0]
        codes[position * n_rows : (position + 1) * n_rows] = clip_codes
        vectors[position * n_vectors : (position + 1) * n_vectors] = clip_vectors
        scores[position], label_index[position] = shares, int(np.argmax(shares))
    for name, values, rows in (("codes", codes, n_rows), ("vectors", vectors, n_vectors), ("scores", scores, 1),
                               ("label_index", label_index, 1)):
        group[name][clips.start * rows : clips.stop * rows] = values
    return int(np.sum(label_index >= 0))


def record_chunk(out: str, key: str, chunk_index: int, records: list[dict[str, Any]]) -> None:
    """The run's process records a batch: its clips' outcomes in the clip table, its chunk as encoded."""
    root = sae_store.open_store(out, mode="r+")
    sae_store.update_clips(root, records)
    group = sae_store.stage_group(root, ENCODE, key, mode="a")
    group.attrs["encoded_chunks"] = sorted({*group.attrs["encoded_chunks"], int(chunk_index)})


def finish_encoding(out: str, key: str) -> bool:
    """Mark ``encode/<key>`` complete when every chunk is encoded and no clip is pending; returns whether it is."""
    root = sae_store.open_store(out, mode="r+")
    group = sae_store.stage_group(root, ENCODE, key, mode="a")
    status = sae_store.clip_table(root)["status"]
    if len(group.attrs["encoded_chunks"]) < sae_store.n_chunks(root) or (status == "pending").any():
        return False
    sae_store.mark_complete(group)
    return True


def predictions(out: str, key: str) -> list[dict[str, Any]]:
    """One row per clip: ``clip_id``, ``path``, ``label`` (given), ``status``, ``predicted`` and ``score``
    (vote share), ``scores`` (class -> share, best first) when ok, ``error_kind`` and ``error`` otherwise."""
    root = sae_store.open_store(out)
    group = sae_store.stage_group(root, ENCODE, key, mode="r")
    table = sae_store.clip_table(root)
    classes = list(group.attrs["classes"])
    scores, label_index = group["scores"][:], group["label_index"][:]
    rows = []
    for i, clip_id in enumerate(table["clip_id"]):
        row: dict[str, Any] = {"clip_id": str(clip_id), "path": str(table["path"][i]), "label": str(table["label"][i]),
                               "status": str(table["status"][i])}
        if row["status"] == "ok" and label_index[i] >= 0:
            order = np.argsort(-scores[i], kind="stable")
            row.update(predicted=classes[label_index[i]], score=float(scores[i, label_index[i]]),
                       scores={classes[k]: round(float(scores[i, k]), 6) for k in order})
        else:
            row.update(error_kind=str(table["error_kind"][i]), error=str(table["error"][i]))
        rows.append(row)
    return rows


def label_agreement(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """How many classified clips got their given label, among those whose label is one of the model's classes.

    ``rows`` as `predictions` gives them.  Returns ``{"clips", "correct", "accuracy"}``, or None when no
    classified clip's given label is a class of the model (a collection without labels, or with other names).

    >>> rows = [{"label": "jazz", "predicted": "jazz", "scores": {"jazz": 0.7, "rock": 0.3}},
    ...         {"label": "rock", "predicted": "jazz", "scores": {"jazz": 0.6, "rock": 0.4}},
    ...         {"label": "polka", "predicted": "rock", "scores": {"rock": 0.9, "jazz": 0.1}},
    ...         {"label": "rock", "error": "too short"}]
    >>> label_agreement(rows)
    {'clips': 2, 'correct': 1, 'accuracy': 0.5}
    """
    known = [row for row in rows if "predicted" in row and row["label"] in row["scores"]]
    if not known:
        return None
    correct = sum(row["predicted"] == row["label"] for row in known)
    return {"clips": len(known), "correct": correct, "accuracy": correct / len(known)}


def write_predictions(out: str, key: str, rows: list[dict[str, Any]], *, top: int = 3) -> tuple[Path, Path, str]:
    """The predictions as a CSV and a markdown table in ``<store>-reports/``; returns both paths and the markdown."""
    csv_path, markdown_path = prediction_paths(out, key)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["clip_id", "path", "label", "status", "predicted", "score", "scores", "error_kind", "error"])
        for row in rows:
            writer.writerow([row["clip_id"], row["path"], row["label"], row["status"], row.get("predicted", ""),
                             row.get("score", ""), json.dumps(row.get("scores", {})), row.get("error_kind", ""),
                             row.get("error", "")])
    markdown = predictions_markdown(out, rows, top=top, agreement=label_agreement(rows))
    markdown_path.write_text(markdown)
    return csv_path, markdown_path, markdown

