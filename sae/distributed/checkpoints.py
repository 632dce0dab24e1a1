"""Checkpoints of a distributed fit in a ``model/<key>`` group of a store.

Two slots, ``checkpoint_0/`` and ``checkpoint_1/``, each holding ``codes``
(N, m), ``components`` (m, n) and ``encoder`` (m, n, absent when
``lambda_e = 0``).  Outer iteration ``k`` writes slot ``k % 2`` (the codes
chunk by chunk, on the workers: one task per chunk, so no lock), then the
attributes ``history`` (the records of :class:`sae.outer.FitResult`),
``stop_reason`` ("" while running) and last ``checkpoint_slot`` and
``last_complete_outer = k``: a crash at any point leaves the previous
checkpoint intact.  Codes are stored dense, chunked ``(block_size, m)`` and
compressed (:func:`sae.store.array_compressors`): zeros compress well and
readers get a plain (N, m) array.

When the training groups the frames into blocks in an order of its own
(:mod:`sae.distributed.order`), the checkpoints written while it goes on
hold block ``b`` in chunk ``b`` (no row moves between outer iterations) and
the slot's ``frame_of_row`` (N,) says which frame each row holds; the last
checkpoint is written in the frames' order, without ``frame_of_row``.
`read_checkpoint` reports which (``frame_of_row`` None: row i is frame i).
A training stopped after a checkpoint and resumed with ``max_outer`` at most
that checkpoint's iteration trains no more, but writes it again as the final
one (`ends_training` tells a final checkpoint).
"""

from __future__ import annotations

from typing import Any

import zarr

__all__ = ["checkpoint_slot", "checkpoint_arrays", "read_checkpoint", "write_frame_of_row", "ends_training"]


def checkpoint_slot(
    group: zarr.Group, slot: int, n_rows: int, n_atoms: int, n_features: int, block_size: int, dtype: str,
    encoder: bool,
) -> zarr.Group:
    """The group ``checkpoint_<slot>`` of ``group``, with its arrays (created when absent)."""
    from sae.store import create_array

    sub = group.require_group(f"checkpoint_{slot}")
    if "codes" not in sub:
        create_array(sub, "codes", shape=(n_rows, n_atoms), chunks=(block_size, n_atoms), dtype=dtype,
                     dimension_names=("frame", "atom"))
    for array_name in ("components",) + (("encoder",) if encoder else ()):
        if array_name not in sub:
            create_array(sub, array_name, shape=(n_atoms, n_features), dtype=dtype)
    return sub


def write_frame_of_row(slot: zarr.Group, frame_of_row: Any) -> None:
    """Record in a slot which frame each row of its codes holds (None: row i is frame i, the array is removed)."""
    from sae.store import create_array

    if "frame_of_row" in slot:
        del slot["frame_of_row"]
    if frame_of_row is not None:
        create_array(slot, "frame_of_row", shape=frame_of_row.shape, dtype="int64", data=frame_of_row)


def checkpoint_arrays(group: zarr.Group) -> list[str]:
    """Paths (relative to ``model/<key>``) of the arrays of its last complete checkpoint ([] if none)."""
    if group.attrs.get("last_complete_outer") is None:
        return []
    name = f"checkpoint_{int(group.attrs['checkpoint_slot'])}"
    return [f"{name}/{array}" for array in ("codes", "components", "encoder", "frame_of_row")
            if array in group[name]]


def _python_record(record: dict[str, Any]) -> dict[str, Any]:
    return {k: (float("nan") if v is None else v) for k, v in record.items()}


def read_checkpoint(group: zarr.Group) -> dict[str, Any] | None:
    """The last complete checkpoint of a ``model/<key>`` group, or None.

    Returns
    -------
    dict or None
        ``iteration`` (int), ``components`` (m, n), ``encoder`` (m, n) or None,
        ``codes`` (the stored zarr array, (N, m)), ``history`` (list of dict),
        ``stop_reason`` ("" while running, else "rtol" or "max_outer"),
        ``frame_of_row`` (ndarray (N,): the frame each row of ``codes`` holds,
        or None when row i is frame i).

    Raises
    ------
    sae.store.StoreDamaged
        A chunk of the checkpoint's arrays is missing from disk.
    """
    from sae.store import StoreDamaged

    iteration = group.attrs.get("last_complete_outer")
    if iteration is None:
        return None
    for path in checkpoint_arrays(group):
        array = group[path]
        if array.nchunks_initialized != array.nchunks:
            raise StoreDamaged(f"{group.path}: the checkpoint of outer iteration {int(iteration)} is damaged "
                               f"({array.nchunks - array.nchunks_initialized} chunks of {path} missing)")
    sub = group[f"checkpoint_{int(group.attrs['checkpoint_slot'])}"]
    return {
        "iteration": int(iteration),
        "components": sub["components"][:],
        "encoder": sub["encoder"][:] if "encoder" in sub else None,
        "codes": sub["codes"] if "codes" in sub else None,
        "history": [_python_record(r) for r in group.attrs["history"]],
        "stop_reason": group.attrs.get("stop_reason", ""),
        "frame_of_row": sub["frame_of_row"][:] if "frame_of_row" in sub else None,
    }


def ends_training(state: dict[str, Any] | None, max_outer: int) -> bool:
    """Whether a checkpoint (`read_checkpoint`) ends a training for ``max_outer``: the final one (with a stop
    reason: codes in the frames' order) of a training converged or run for at least ``max_outer`` iterations.

    A checkpoint written while a training went on (stop reason "") does not, even at ``max_outer`` iterations
    or more (a run stopped after it, asked again for fewer): resuming from it writes the final one.

    >>> ends_training({"history": [{"iteration": 0}, {"iteration": 2}], "stop_reason": "max_outer"}, 2)
    True
    >>> ends_training({"history": [{"iteration": 0}, {"iteration": 2}], "stop_reason": ""}, 2)
    False
    """
    from sae.outer import training_done

    return state is not None and bool(state["stop_reason"]) and training_done(state["history"], state["stop_reason"],
                                                                              max_outer)
