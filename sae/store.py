"""The one module that knows the Zarr layout of a dataset store.

A *store* is a Zarr v3 group on disk (``<name>.zarr``) that holds one dataset
run and everything computed from it.  Nothing else in ``sae`` or ``flows``
builds paths inside a store: it calls the functions here.  Everything in it is
plain arrays and JSON attributes, readable by any Zarr v3 client.

Layout (orientation: samples by features, see ``sae``)::

    <store>.zarr/
      attrs: sae_layout (int), sae_version, created (ISO 8601),
             cqt (CQTConfig as JSON), labels (sorted label names),
             frames_per_clip (F), n_clips
      frames        float32 (n_clips * F, n_bins), chunks (chunk_clips * F, n_bins)
                    rows [i*F, (i+1)*F) belong to clip i; the rows of a clip
                    whose status is not "ok" hold no data (fill value 0).
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
        error_kind   str    "" or one of: empty, corrupt, unsupported, too_short,
                            silent, unreadable, missing
        error        str    human-readable message, "" when ok
      <stage>/<key>/  results of later stages (preprocess, graph, model,
                      features, results), one group per configuration
                      fingerprint; attrs: config (JSON), complete (bool, written
                      last), created.

The clip table is written by one writer only (the flow that owns the run),
after the frames of a batch are fully written; a clip is "ok" only then, so a
crash never leaves a half-written clip marked done.
"""
