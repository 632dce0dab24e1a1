"""Prefect 3 flows of the sae pipeline: thin orchestration over the plain functions of ``sae``.

Each flow takes a typed configuration (``sae.config``), maps coarse tasks that
call one ``sae`` function each, and passes store paths and metadata between
tasks, never arrays.
"""
