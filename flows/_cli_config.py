"""The ``sae`` command's configuration: its shared options, and the `PipelineConfig` they build.

Every command builds one `sae.config.PipelineConfig` from, in increasing
priority: the pipeline's defaults, ``--config file.yaml|.toml``, ``--set
section.field=value`` overrides, and ``--data`` / ``--store`` / ``--cluster``.
An invalid configuration (unknown key, value out of range, missing data) stops
the command before any work, with exit code 2 and a message naming the field.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from pydantic import ValidationError

from sae.config import PipelineConfig

USAGE_ERROR = 2
"""Exit code of an invalid command line or configuration (no work done)."""


# --------------------------------------------------------------------------- options shared by the commands

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML (.yaml/.yml) or TOML (.toml) file of a PipelineConfig: sections "
                 "ingest, preprocess, graph, train, classify, and cluster, force.", show_default=False),
]
DataOption = Annotated[
    str | None,
    typer.Option("--data", help="GTZAN-style folder (<root>/<genre>/<clip>) or CSV manifest (path,label). "
                 "Default: the built-in synthetic dataset, generated beside the store.", show_default=False),
]
StoreOption = Annotated[
    str | None, typer.Option("--store", help="Zarr store to create or reuse (default: sae.zarr).", show_default=False)
]
ClusterOption = Annotated[
    str | None,
    typer.Option("--cluster", help="Dask scheduler address, e.g. tcp://127.0.0.1:8786; 'local' for local threads. "
                 "Default: $SAE_DASK_ADDRESS if set, else local threads.", show_default=False),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override one field, e.g. --set train.model.n_atoms=128 "
                 "(value parsed as YAML); repeatable.", show_default=False),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the summary as JSON instead of text.")]
ForceOption = Annotated[bool, typer.Option("--force", help="Create the store anew and recompute every stage.")]
StrictOption = Annotated[
    bool, typer.Option("--strict", help="Fail (exit 1) if any clip of the store is in error, even when ingestion "
                       "is skipped.")
]
PresetOption = Annotated[
    str | None,
    typer.Option("--preset", help="Recipe the configuration starts from: 'default' (the best measured) or 'thesis' "
                 "(the 2015 settings and protocol).", show_default=False),
]
NoWaitOption = Annotated[
    bool, typer.Option("--no-wait", help="Fail at once if another sae run is writing the store (default: wait "
                       "for it to end).")
]


# --------------------------------------------------------------------------- configuration


class ConfigError(ValueError):
    """An invalid configuration; the message names the field(s) and the problem."""


def read_config_file(path: Path) -> dict[str, Any]:
    """The mapping of a YAML or TOML configuration file (empty file: empty mapping)."""
    if not path.is_file():
        raise ConfigError(f"--config: no such file {str(path)!r}")
    suffix = path.suffix.lower()
    text = path.read_text()
    try:
        if suffix == ".toml":
            values = tomllib.loads(text)
        elif suffix in (".yaml", ".yml", ".json"):
            values = yaml.safe_load(text)
        else:
            raise ConfigError(f"--config must end in .yaml, .yml, .toml or .json, got {str(path)!r}")
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"--config {str(path)!r} is not valid {suffix[1:].upper()}: {error}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"--config {str(path)!r} must hold a mapping of sections, got {type(values).__name__}")
    return values


def apply_override(values: dict[str, Any], assignment: str) -> None:
    """Set ``a.b.c=value`` in nested ``values`` (value parsed as YAML: 1e-3, true, [a, b], null).

    >>> values = {}
    >>> apply_override(values, "train.model.n_atoms=128"); values
    {'train': {'model': {'n_atoms': 128}}}
    """
    path, sep, raw = assignment.partition("=")
    keys = path.strip().split(".")
    if not sep or not all(keys):
        raise ConfigError(f"--set must read 'section.field=value', got {assignment!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"--set {assignment!r}: the value is not valid YAML: {error}") from None
    node = values
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {assignment!r}: {key!r} is a value, not a section")
        node = child
    node[keys[-1]] = value


def describe_errors(error: ValidationError) -> str:
    """One line per problem: the dotted field, pydantic's message and the value received."""
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        received = "" if item["type"] == "value_error" else f" (got {item['input']!r})"
        if item["type"] == "extra_forbidden":
            message, received = "unknown key", ""
        lines.append(f"  {where}: {message}{received}" if where else f"  {message}")
    return "\n".join(lines)


def build_config(
    config_file: Path | None = None,
    overrides: list[str] | None = None,
    *,
    data: str | None = None,
    store: str | None = None,
    cluster: str | None = None,
    force: bool = False,
    strict: bool = False,
    preset: str | None = None,
) -> PipelineConfig:
    """The validated configuration of a command (see the module docstring for the priority).

    Raises
    ------
    ConfigError
        With every problem found, each naming its field.
    """
    values = read_config_file(config_file) if config_file is not None else {}
    for assignment in overrides or ():
        apply_override(values, assignment)
    for dotted, value in (("ingest.data", data), ("ingest.store", store), ("cluster", cluster)):
        if value is not None:
            section, _, field = dotted.rpartition(".")
            target = values.setdefault(section, {}) if section else values
            if not isinstance(target, dict):
                raise ConfigError(f"{section} must be a mapping of fields, got {target!r}")
            target[field] = value
    if force:
        values["force"] = True
    if preset is not None:
        values["preset"] = preset
    if strict:
        ingest = values.setdefault("ingest", {})
        if not isinstance(ingest, dict):
            raise ConfigError(f"ingest must be a mapping of fields, got {ingest!r}")
        ingest["strict"] = True
    try:
        return PipelineConfig.model_validate(values)
    except ValidationError as error:
        source = f" in {str(config_file)!r}" if config_file is not None else ""
        raise ConfigError(f"invalid configuration{source}:\n{describe_errors(error)}") from None


def config_or_exit(**kwargs: Any) -> PipelineConfig:
    """`build_config`, or its error as one ``error:`` line and exit code 2."""
    try:
        return build_config(**kwargs)
    except ConfigError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(USAGE_ERROR) from None
