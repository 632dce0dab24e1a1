"""Stage groups ``<stage>/<key>``: their creation, their complete marker and manifest, their problems.

A stage group is complete when `mark_complete` recorded, last, its manifest
(every array's shape), the versions of its inputs and its own version;
`stage_problems` checks a group against them without reading any chunk's data,
so a result never outlives the data it came from (`is_complete`).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import zarr

from sae.store.keys import group_name
from sae.store.layout import PathLike, StoreError, _as_json, _check_name, _group, _now


def stage_group(
    group_or_path: zarr.Group | PathLike,
    stage: str,
    key: str,
    *,
    config: Mapping[str, Any] | Any = None,
    mode: Literal["r", "a", "w"] = "a",
) -> zarr.Group:
    """The group ``<stage>/<key>`` of a store, for the results of a later stage.

    Parameters
    ----------
    group_or_path : zarr.Group or path
        The store (a path is opened with `open_store`).
    stage, key : str
        E.g. ``"graph"`` and a configuration fingerprint.
    config : mapping or pydantic model
        The configuration of the stage, recorded as attribute ``config``.
    mode : {"r", "a", "w"}
        "r": open an existing group read only (error if absent).
        "a": open if present (its recorded ``config`` must equal ``config``), else create.
        "w": create, deleting any existing group of that name.

    Returns
    -------
    zarr.Group
        Attributes ``config``, ``complete`` (False until `mark_complete`), ``created``.
    """
    _check_name("stage", stage)
    _check_name("key", key)
    if mode not in ("r", "a", "w"):
        raise ValueError(f"mode must be one of 'r', 'a', 'w', got {mode!r}")
    root = _group(group_or_path, mode="r" if mode == "r" else "r+")
    name = group_name(stage, key)
    exists = name in root
    if mode == "r":
        if not exists:
            raise KeyError(f"store has no group {name!r}")
        return root[name]
    wanted = None if config is None else _as_json(config)
    if exists and mode == "a":
        found = root[name]
        if wanted is not None and _as_json(found.attrs.get("config")) != wanted:
            raise StoreError(
                f"group {name!r} exists with config {found.attrs.get('config')!r}, "
                f"which differs from the config given {wanted!r}; use mode='w' to replace it"
            )
        return found
    if exists:
        del root[name]
    try:
        parent = root.require_group(stage)
    except zarr.errors.ContainsGroupError:  # created meanwhile by another task of the run (the baseline's results)
        parent = root[stage]
    created = parent.create_group(key)
    created.attrs.update({"config": wanted, "complete": False, "created": _now()})
    return created


def _arrays_of(group: zarr.Group) -> dict[str, zarr.Array]:
    return {name: node for name, node in group.members(max_depth=None) if isinstance(node, zarr.Array)}


def mark_complete(
    group: zarr.Group,
    *,
    inputs: Iterable[zarr.Group] = (),
    arrays: Iterable[str] | None = None,
    version: str | None = None,
) -> None:
    """Flag a stage group as complete; call last, after every array is written.

    Records the manifest (``arrays``: the shape of each array, default every
    array in the group, or only those named, as paths relative to it), the
    versions of the stage groups it was computed from (``inputs``), and its
    own ``version``: a digest of its content when the caller has one (then a
    recomputation that gives the same content keeps the groups computed from
    it current), else a random id.
    """
    found = _arrays_of(group)
    names = sorted(found) if arrays is None else list(arrays)
    missing = [name for name in names if name not in found]
    if missing:
        raise StoreError(f"cannot mark {group.path!r} complete: it has no array {missing[0]!r}")
    manifest = {name: [int(n) for n in found[name].shape] for name in names}
    recorded_inputs = {}
    for source in inputs:
        source_version = source.attrs.get("version")
        if source.attrs.get("complete") is not True or source_version is None:
            raise StoreError(f"cannot mark {group.path!r} complete: its input {source.path!r} is not complete")
        recorded_inputs[source.path] = source_version
    group.attrs.update({"arrays": manifest, "inputs": recorded_inputs, "version": version or uuid.uuid4().hex[:16],
                        "complete": True, "completed": _now()})


def stage_problems(group: zarr.Group | PathLike, stage: str, key: str) -> list[str]:
    """Why ``<stage>/<key>`` is not a usable complete result: [] when it is.

    Checks, without reading any chunk's data: the group exists and is marked
    complete; every array of its manifest is there with its recorded shape
    and all its chunks on disk; every input it was computed from is still
    there, complete, at the version it recorded (so results never outlive the
    data they came from).
    """
    root = _group(group)
    name = group_name(stage, key)
    if name not in root:
        return [f"{name} does not exist"]
    node = root[name]
    if node.attrs.get("complete") is not True:
        return [f"{name} is not complete (a run was interrupted, or is running)"]
    problems = []
    for path, shape in (node.attrs.get("arrays") or {}).items():
        try:
            array = node[path]
        except KeyError:
            problems.append(f"{name}: array {path!r} is missing")
            continue
        if list(array.shape) != list(shape):
            problems.append(f"{name}: array {path!r} has shape {tuple(array.shape)}, recorded {tuple(shape)}")
        elif array.nchunks_initialized != array.nchunks:
            problems.append(f"{name}: array {path!r} has {array.nchunks - array.nchunks_initialized} of its "
                            f"{array.nchunks} chunks missing")
    for path, version in (node.attrs.get("inputs") or {}).items():
        if path not in root:
            problems.append(f"{name}: its input {path} is gone")
        elif root[path].attrs.get("complete") is not True or root[path].attrs.get("version") != version:
            problems.append(f"{name}: its input {path} changed since it was computed")
    return problems


def is_complete(group: zarr.Group | PathLike, stage: str, key: str) -> bool:
    """Whether ``<stage>/<key>`` is a complete, intact, current result (`stage_problems` finds nothing)."""
    return not stage_problems(group, stage, key)


def stages(group: zarr.Group | PathLike) -> dict[str, list[str]]:
    """The stage groups of a store: stage name -> keys (sorted)."""
    root = _group(group)
    out = {}
    for stage, node in sorted(root.groups()):
        if stage != "clips":
            out[stage] = sorted(key for key, _ in node.groups())
    return out
