"""The one package that knows the Zarr layout of a dataset store.

A *store* is a Zarr v3 group on disk (``<name>.zarr``) that holds one dataset
run and everything computed from it.  Nothing else in ``sae`` or ``flows``
builds paths inside a store: it calls the functions here.  Everything in it is
plain arrays and JSON attributes, readable by any Zarr v3 client (strings use
the ``string`` data type with the ``vlen-utf8`` codec; no pickled objects).

Layout (orientation: samples by features, see ``sae``)::

    <store>.zarr/
      attrs: sae_layout (int), sae_version, created (ISO 8601),
             cqt (CQTConfig as JSON), labels (sorted label names),
             frames_per_clip (F), n_clips, chunk_clips
      frames        float32 (n_clips * F, n_bins), chunks (chunk_clips * F, n_bins);
                    dimension names ("frame", "bin").
                    Rows [i*F, (i+1)*F) belong to clip i; the rows of a clip
                    whose status is not "ok" hold zeros.
                    A chunk holds whole clips, so batches of chunk_clips clips
                    write disjoint chunks in parallel without locks.
      clips/        the clip table: one 1-D array per column, n_clips long
        clip_id      str    "<label>/<file stem>", unique
        path         str    source path as given
        label        str
        label_index  int32  index into attrs["labels"]
        first_frame  int64  i * F
        n_frames     int32  F for ok clips, 0 otherwise
        status       str    "pending" | "ok" | "error"
        error_kind   str    "" or one of sae.audio.ERROR_KINDS: missing,
                            unreadable, empty, unsupported, corrupt,
                            truncated, too_short, silent
        error        str    human-readable message, "" when ok
        checksum     int64  CRC-32 of the clip's F x n_bins float32 frames
                            (C order) when ok, else 0
        group        str    what must stay on one side of a cross-validation
                            split (recording, album, artist); the clip id when
                            the data gave none.  Stores made before this column
                            read as if every clip were its own group.
      <stage>/<key>/  results of later stages (ingest: the record of a complete
                      ingestion; preprocess, graph, model, results), one group per configuration
                      fingerprint; attrs: config (JSON), complete (bool), created,
                      and, written last by `mark_complete`: arrays (the manifest:
                      path -> shape of every array the stage wrote), inputs (path
                      -> version of every stage group it was computed from),
                      version (a content digest or a random id).  Sparse matrices
                      inside a stage group are sub-groups written by `write_sparse`.

Integrity.  Every array is created by `create_array`: its chunks carry a
CRC-32C checksum (Zarr's ``crc32c`` codec, verified on every read), floating
point arrays have the fill value NaN, and every chunk is written even when it
equals the fill value (``array.write_empty_chunks``), so a chunk missing from
disk reads as NaN, never as plausible zeros, and a damaged one fails to
decode.  `frames_problems` finds the clips whose frames are missing or
damaged (and `mark_damaged` queues them for re-ingestion); `stage_problems`
checks a stage group against its manifest and its inputs; `is_complete`
trusts a stage group only when it finds no problem.

Concurrency.  One process writes a store at a time: the run that holds
`store_lock` (a lock file ``<store>.lock`` beside the store, released by the
operating system when its process dies, even by SIGKILL); tasks of that run
on Dask workers write the chunks it assigns them.  The clip table is written
by the run's own process only, after the frames of a batch are fully written;
a clip is "ok" only then, so a crash never leaves a half-written clip marked
done.  Consolidated metadata is never written (it would go stale); groups are
opened with ``use_consolidated=False``.

Modules
-------
- `sae.store.layout`: creation and opening, array settings, layout version, location checks;
- `sae.store.clips`: the frames' chunks, the clip table and the clips' groups, ingestion's summary;
- `sae.store.integrity`: checksums, damaged frames and their repair, `verify`;
- `sae.store.stages`: stage groups, their complete marker, manifest and problems;
- `sae.store.lock`: the store lock;
- `sae.store.sparse`: CSR matrices inside stage groups;
- `sae.store.keys`: every stage key and every name derived from a store (group names,
  the files beside it).

This package re-exports the public names of all but `sae.store.keys`, which is
imported as a module (``from sae.store.keys import stage_keys``).

Example
-------
>>> import os, tempfile
>>> import numpy as np
>>> from sae.config import CQTConfig
>>> tmp = tempfile.TemporaryDirectory()
>>> root = tmp.name
>>> cqt = CQTConfig(clip_samples=22050)
>>> clips = [("a/x", "x.wav", "a"), ("b/y", "y.wav", "b"), ("a/z", "z.wav", "a")]
>>> group = create_store(os.path.join(root, "demo.zarr"), cqt, clips, chunk_clips=2)
>>> frames_array(group).shape, frames_array(group).chunks
((126, 96), (84, 96))
>>> clip_table(group)["label_index"].tolist()
[0, 1, 0]
>>> ok_clips(group).tolist()
[]
>>> bool(np.isnan(frames_array(group).fill_value))  # a chunk never written reads as NaN
True
>>> tmp.cleanup()
"""

from sae.store.clips import (
    chunk_clips_range,
    clip_group_index,
    clip_table,
    frame_rows,
    frames_array,
    groups_digest,
    ingest_summary,
    n_chunks,
    ok_clips,
    pending_batches,
    read_chunk_frames,
    update_clips,
    update_groups,
    write_chunk_frames,
)
from sae.store.integrity import frames_checksum, frames_digest, frames_problems, mark_damaged, verify
from sae.store.keys import lock_path
from sae.store.layout import (
    CLIP_COLUMNS,
    LAYOUT_VERSION,
    STATUSES,
    PathLike,
    StoreDamaged,
    StoreError,
    StoreLocked,
    array_compressors,
    check_location,
    clip_groups,
    create_array,
    create_store,
    fill_value,
    json_safe,
    open_store,
    store_cqt,
    store_frames_per_clip,
    store_labels,
    store_path,
)
from sae.store.lock import lock_holder, lock_state, store_lock
from sae.store.sparse import read_sparse, write_sparse
from sae.store.stages import is_complete, mark_complete, stage_group, stage_problems, stages

__all__ = [
    "LAYOUT_VERSION", "STATUSES", "CLIP_COLUMNS", "PathLike", "StoreError", "StoreDamaged", "StoreLocked",
    "array_compressors", "fill_value", "create_array", "json_safe", "create_store", "open_store", "check_location",
    "store_path", "store_cqt", "store_labels", "store_frames_per_clip", "clip_groups",
    "frames_array", "n_chunks", "chunk_clips_range", "read_chunk_frames", "write_chunk_frames",
    "clip_table", "update_groups", "groups_digest", "clip_group_index", "update_clips", "ok_clips", "frame_rows",
    "pending_batches", "ingest_summary",
    "frames_checksum", "frames_problems", "mark_damaged", "frames_digest", "verify",
    "stage_group", "mark_complete", "stage_problems", "is_complete", "stages",
    "lock_path", "lock_holder", "lock_state", "store_lock",
    "write_sparse", "read_sparse",
]
