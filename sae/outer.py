"""The outer loop of the fit, its history record, and the D and E steps: one algorithm for every backend.

Orientation (see :mod:`sae`): ``X`` (N, n), ``Z`` (N, m), ``C`` and ``E``
(m, n).  Each outer iteration runs the Z step, then the D step (if
``lambda_d > 0``) and the E step (if ``lambda_e > 0``), each warm-started
from the current iterate, and appends one history record (`history_record`).
It stops when ``|F_prev - F| <= rtol |F|`` (`relative_change`) or after
``max_outer`` iterations.  With ``balance_lambdas`` the weights are rescaled
after the first outer iteration (`rebalance`).

`alternate` is that loop, written once.  Where the frames and codes live is a
`Backend`'s business: :func:`sae.model.fit_sae` runs it on arrays in memory,
:func:`sae.distributed.fit_distributed` on row blocks held by Dask workers.
A backend does the Z step and computes per-frame sums (the statistics
``Z^T Z``, ``Z^T X``, ``X^T X`` and the objective's terms); the D and E steps
need only those statistics, so they run here, on the (m, m), (m, n) and
(n, n) matrices, for every backend.

>>> weigh_terms({"reconstruction": 4.0, "sparsity": 3.0, "graph": float("nan"), "encoder": 1.0},
...             ModelConfig(lambda_d=1.0, lambda_z=2.0, lambda_e=0.5))["total"]
8.25
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from sae.config import ModelConfig
from sae.solvers import SolverResult, fista
from sae.terms import DictionaryFit, EncoderFit, RowNormBall

__all__ = [
    "Backend",
    "FitResult",
    "FitState",
    "alternate",
    "history_record",
    "iterations_done",
    "training_done",
    "TERM_NAMES",
    "TERM_WEIGHTS",
    "weigh_terms",
    "balanced_weights",
    "rebalance",
    "relative_change",
    "log_outer",
    "inner_options",
    "solve_dictionary",
    "solve_encoder",
]

logger = logging.getLogger(__name__)

#: Names of the objective terms, in the order of the objective.
TERM_NAMES = ("reconstruction", "sparsity", "graph", "encoder")

TERM_WEIGHTS = {"reconstruction": ("lambda_d", 0.5), "sparsity": ("lambda_z", 1.0),
                "graph": ("lambda_g", 0.5), "encoder": ("lambda_e", 0.5)}
"""How each term enters the objective: its weight's name and factor (``lambda_d/2 ||X - Z C||^2``, ...)."""


# --------------------------------------------------------------------------- D and E steps


def inner_options(config: ModelConfig) -> dict[str, Any]:
    """The stopping options of the inner steps that ``config`` sets (the Z step's; the D and E steps replace
    ``rtol`` with ``config.dictionary_tolerance``).

    >>> inner_options(ModelConfig(rtol=1e-4, max_inner=50))
    {'rtol': 0.0001, 'atol': 0.0, 'max_iter': 50, 'restart': True}
    """
    return dict(rtol=config.inner_tolerance, atol=config.atol, max_iter=config.max_inner, restart=config.fista_restart)


def _unit_rows_step(term: DictionaryFit | EncoderFit, start: np.ndarray, rtol: float, atol: float, max_iter: int,
                    restart: bool) -> SolverResult:
    """FISTA on a statistics term over ``{W: ||w_i|| <= 1 for every row i}``, warm-started from ``start``."""
    return fista([term], RowNormBall(1.0), start, rtol=rtol, atol=atol, max_iter=max_iter, restart=restart)


def solve_dictionary(ZtZ: np.ndarray, ZtX: np.ndarray, C0: np.ndarray, *, lambda_d: float, data_sq_norm: float = 0.0,
                     rtol: float = 1e-5, atol: float = 0.0, max_iter: int = 500, restart: bool = True) -> SolverResult:
    """D step from sufficient statistics: ``argmin_{||c_i|| <= 1} lambda_d/2 ||X - Z C||_F^2``.

    ``ZtZ = Z^T Z`` (m, m) and ``ZtX = Z^T X`` (m, n) are sums over samples
    (reducible over blocks of frames); ``C0`` (m, n) is the warm start.
    Gradient ``lambda_d (ZtZ C - ZtX)``, step ``1 / (lambda_d ||ZtZ||_2)``, prox:
    projection of every row of ``C`` onto the unit ball.  ``data_sq_norm``
    (``||X||_F^2``) only shifts the recorded objective, to make it the term
    itself.  Runs in ``C0``'s dtype.
    """
    C0 = np.asarray(C0)
    term = DictionaryFit(np.asarray(ZtZ, dtype=C0.dtype), np.asarray(ZtX, dtype=C0.dtype), lambda_d,
                         data_sq_norm=data_sq_norm)
    return _unit_rows_step(term, C0, rtol, atol, max_iter, restart)


def solve_encoder(XtX: np.ndarray, ZtX: np.ndarray, E0: np.ndarray, *, lambda_e: float, codes_sq_norm: float = 0.0,
                  rtol: float = 1e-5, atol: float = 0.0, max_iter: int = 500, restart: bool = True) -> SolverResult:
    """E step from sufficient statistics: ``argmin_{||e_k|| <= 1} lambda_e/2 ||Z - X E^T||_F^2``.

    ``XtX = X^T X`` (n, n), ``ZtX = Z^T X`` (m, n), ``E0`` (m, n) warm start.
    Gradient ``lambda_e (E XtX - ZtX)``, step ``1 / (lambda_e ||XtX||_2)``, prox:
    row-wise projection onto the unit ball.  ``codes_sq_norm`` (``||Z||_F^2``)
    only shifts the recorded objective.  Runs in ``E0``'s dtype.
    """
    E0 = np.asarray(E0)
    term = EncoderFit(np.asarray(XtX, dtype=E0.dtype), np.asarray(ZtX, dtype=E0.dtype), lambda_e,
                      codes_sq_norm=codes_sq_norm)
    return _unit_rows_step(term, E0, rtol, atol, max_iter, restart)


# --------------------------------------------------------------------------- the history record


def weigh_terms(terms: Mapping[str, float], config: ModelConfig) -> dict[str, float]:
    """The weighted terms, their total and the weights, from the unweighted terms.

    ``<name>_weighted = factor * lambda * terms[name]`` (`TERM_WEIGHTS`; 0 when the
    weight is 0, whatever the term, which may then be NaN), ``total`` their sum,
    and ``lambda_d``, ``lambda_z``, ``lambda_g``, ``lambda_e`` of ``config``.
    """
    out: dict[str, float] = {}
    total = 0.0
    for name, (weight_name, factor) in TERM_WEIGHTS.items():
        weight = getattr(config, weight_name)
        weighted = factor * weight * float(terms[name]) if weight > 0 else 0.0
        out[f"{name}_weighted"] = weighted
        total += weighted
    out["total"] = total
    out.update({weight_name: float(getattr(config, weight_name)) for weight_name, _ in TERM_WEIGHTS.values()})
    return out


def relative_change(previous: float | None, total: float) -> float:
    """The outer stopping quantity ``|F_prev - F| / |F|`` (NaN without a previous value).

    >>> relative_change(110.0, 100.0), relative_change(None, 1.0)
    (0.1, nan)
    """
    if previous is None:
        return float("nan")
    return abs(previous - total) / max(abs(total), np.finfo(np.float64).tiny)


def history_record(
    iteration: int,
    config: ModelConfig,
    terms: Mapping[str, float],
    size: int,
    previous: float | None,
    steps: Mapping[str, Mapping[str, Any] | None],
) -> dict[str, Any]:
    """One history record (keys: :class:`FitResult`'s ``history``), but its ``seconds``.

    ``terms``: the unweighted ``reconstruction``, ``sparsity``, ``graph`` (NaN
    without graph term), ``encoder`` (NaN without encoder), and ``nnz`` of the
    ``size`` codes; ``previous``: the total of the previous record;
    ``steps[name]`` (``codes``, ``dictionary``, ``encoder``): ``n_iter`` and
    ``stop_reason`` of the step, None if skipped.
    """
    record: dict[str, Any] = {"iteration": iteration}
    record.update({name: terms[name] for name in TERM_NAMES})
    record.update(weigh_terms(record, config))
    record["relative_change"] = relative_change(previous, record["total"])
    record["sparsity_percent"] = 100.0 * terms["nnz"] / max(size, 1)
    for name in ("codes", "dictionary", "encoder"):
        step = steps.get(name)
        record[f"inner_{name}"] = 0 if step is None else int(step["n_iter"])
        record[f"stop_{name}"] = "" if step is None else str(step["stop_reason"])
    return record


def log_outer(log: logging.Logger, record: dict[str, Any]) -> None:
    """One progress line for an outer iteration's history record (see `FitResult`)."""
    log.info(
        "outer %d: objective %.6g (rel. change %.2e), non-zeros %.2f%%, inner Z/D/E %d/%d/%d, %.2f s",
        record["iteration"], record["total"], record["relative_change"], record["sparsity_percent"],
        record["inner_codes"], record["inner_dictionary"], record["inner_encoder"], record["seconds"],
    )


def iterations_done(history: list[dict[str, Any]]) -> int:
    """The outer iterations, or the epochs of an online fit, that ``history`` records (`FitResult.n_iter`).

    >>> iterations_done([{"iteration": 0}, {"iteration": 1}, {"iteration": 2}])
    2
    >>> iterations_done([{"iteration": 0, "online": False}, {"iteration": 1, "online": True},
    ...                  {"iteration": 2, "online": False}])
    1
    """
    if any(record.get("online") for record in history):
        return sum(1 for record in history if record.get("online"))
    return int(history[-1]["iteration"])


def training_done(history: list[dict[str, Any]], stop_reason: str | None, max_outer: int) -> bool:
    """Whether a training whose checkpoint holds ``history`` and ``stop_reason`` is over for ``max_outer``:
    converged (rtol), or trained for at least ``max_outer`` iterations (`iterations_done`)."""
    return stop_reason == "rtol" or iterations_done(history) >= max_outer


# --------------------------------------------------------------------------- balancing the weights


def balanced_weights(record: Mapping[str, float], config: ModelConfig) -> dict[str, float]:
    """Weights that make every weighted term of ``record`` equal to the sparsity term ``lambda_z ||Z||_1``.

    ``lambda <- lambda * (lambda_z ||Z||_1) / (weighted term)`` for ``lambda_d``,
    ``lambda_g`` and ``lambda_e``; ``lambda_z`` sets the scale (the minimiser only
    depends on the ratios of the weights).  A weight of 0 stays 0 (its term is
    off), and so does a weight whose term is 0 at ``record`` (nothing to scale).
    Returns only the weights that change, ``{}`` when the codes are all zero
    (no scale to match: the caller keeps its weights).

    This is the rescaling of ``balance_lambdas``, applied once, after the first
    outer iteration (`rebalance`).  At the next iterations the terms drift from
    equality as the codes adapt to the new weights; a penalty whose weighted
    value falls as its weight grows (the encoder term when ``Z`` can follow
    ``X E^T`` closely) may stay well below the others.

    >>> record = {"reconstruction": 20.0, "sparsity": 4.0, "graph": 0.5, "encoder": float("nan")}
    >>> balanced_weights(record, ModelConfig(lambda_d=10.0, lambda_z=1.0, lambda_g=100.0))
    {'lambda_d': 0.4, 'lambda_g': 16.0}
    """
    anchor = config.lambda_z * float(record["sparsity"])
    if not anchor > 0:
        return {}
    update = {}
    for name in ("reconstruction", "graph", "encoder"):
        weight_name, factor = TERM_WEIGHTS[name]
        weight, value = getattr(config, weight_name), float(record[name])
        if weight > 0 and value > 0:
            update[weight_name] = anchor / (factor * value)
    return update


def rebalance(history: list[dict[str, Any]], config: ModelConfig) -> ModelConfig:
    """``config`` with `balanced_weights` of ``history[-1]``; the history re-weighted in place.

    Every record gets the new weighted terms, total and weights (`weigh_terms`),
    so the whole history measures one objective, the one trained from here on;
    the last record's ``relative_change`` is recomputed against the previous
    one, and it is marked ``balanced = True``.  Without a change (all-zero codes)
    ``config`` is returned as it is, with a warning.
    """
    record = history[-1]
    update = balanced_weights(record, config)
    if not update:
        logger.warning("balance_lambdas: the codes are all zero after outer iteration %d, weights kept "
                       "(lower lambda_z or raise lambda_d)", record["iteration"])
        return config
    before = {name: getattr(config, name) for name in update}
    config = config.model_copy(update=update)
    for entry in history:
        entry.update(weigh_terms(entry, config))
    if len(history) > 1:
        record["relative_change"] = relative_change(history[-2]["total"], record["total"])
    record["balanced"] = True
    logger.info("balance_lambdas after outer iteration %d: %s", record["iteration"],
                ", ".join(f"{name} {before[name]:.4g} -> {value:.4g}" for name, value in update.items()))
    return config


# --------------------------------------------------------------------------- the loop


@dataclass(frozen=True)
class FitState:
    """What the outer loop passes to ``callback`` after every outer iteration.

    The arrays are the live iterates: read or copy them, do not modify them.
    ``codes`` is as the backend holds them (an (N, m) array in memory), or None after an epoch of the online
    fit (:mod:`sae.online`), which codes its mini-batches only.
    ``record`` is the history entry of this iteration (see :class:`FitResult`).
    """

    iteration: int
    codes: Any
    components: np.ndarray
    encoder: np.ndarray | None
    record: dict[str, Any]


@dataclass(frozen=True)
class FitResult:
    """Result of :func:`sae.model.fit_sae` (and of `alternate`).

    Attributes
    ----------
    components : ndarray (m, n)
        The dictionary ``C`` (the thesis's ``D^T``), one atom per row.
    encoder : ndarray (m, n) or None
        ``E``; None when ``lambda_e = 0`` (not learned).
    codes : ndarray (N, m)
        ``Z`` after the last Z step (as the backend holds it).
    history : list of dict
        One dict per outer iteration, preceded by the initial point
        (``iteration = 0``).  Keys: ``iteration``; the unweighted terms
        ``reconstruction``, ``sparsity``, ``graph``, ``encoder`` (NaN when off),
        the weighted ones ``<term>_weighted`` and ``total`` (`weigh_terms`);
        ``relative_change`` ``|F_prev - F| / |F|`` (NaN at iteration 0);
        ``sparsity_percent`` (percentage of non-zero codes); ``inner_codes``,
        ``inner_dictionary``, ``inner_encoder`` (iterations of each step: FISTA
        iterations, or the largest number of full sweeps of the
        coordinate-descent Z step; 0 if skipped); ``stop_codes``,
        ``stop_dictionary``, ``stop_encoder`` (their stop reasons, "" if
        skipped); ``seconds`` (wall time of the iteration, its checkpoint
        excluded) and ``seconds_codes`` (of its Z step); ``lambda_d``,
        ``lambda_z``, ``lambda_g``, ``lambda_e`` (the weights of the objective
        measured); ``balanced`` (True on the iteration after which the weights
        were rescaled, see `rebalance`).
    n_iter : int
        Outer iterations performed (resumed ones included).
    stop_reason : {"rtol", "max_outer"}
    config : ModelConfig or None
        The configuration the model was trained with: the one given, with the
        rescaled weights when ``balance_lambdas`` is set (to encode new data
        with the same objective).
    """

    components: np.ndarray
    encoder: np.ndarray | None
    codes: Any
    history: list[dict[str, Any]]
    n_iter: int
    stop_reason: str
    config: ModelConfig | None = None


class Backend(Protocol):
    """Where the frames and the codes live, for `alternate`.

    ``codes`` is whatever the backend holds the codes as.  Sums over frames
    are the backend's (in memory, or reduced over blocks in block order).
    """

    logger: logging.Logger  #: where `alternate` logs one line per outer iteration
    n_samples: int  #: N

    def code_step(self, codes: Any, components: np.ndarray, encoder: np.ndarray | None, config: ModelConfig,
                  iteration: int) -> tuple[Any, dict[str, Any]]:
        """The Z step from ``codes``: the new codes and the step's ``n_iter``, ``stop_reason`` (and what
        `terms` needs of it)."""

    def statistics(self, codes: Any) -> dict[str, Any]:
        """What the D and E steps need: ``ZtZ`` = ``Z^T Z`` (m, m), ``ZtX`` = ``Z^T X`` (m, n) and ``Z_sq`` =
        ``||Z||_F^2`` (and whatever else `terms` will want)."""

    def data_statistics(self) -> dict[str, Any]:
        """``XtX`` = ``X^T X`` (n, n) and ``X_sq`` = ``||X||_F^2``."""

    def terms(self, codes: Any, components: np.ndarray, encoder: np.ndarray | None, step: dict[str, Any] | None,
              statistics: dict[str, Any] | None) -> dict[str, float]:
        """The unweighted terms and ``nnz`` (`history_record`) at ``codes``; ``step`` and ``statistics``: of
        this iteration, None at the start."""

    def save(self, iteration: int, codes: Any, components: np.ndarray, encoder: np.ndarray | None,
             history: list[dict[str, Any]], stop_reason: str) -> Any:
        """After outer iteration ``iteration`` (``history`` ends with its record; ``stop_reason`` is "" unless it
        is the last): keep what a resume needs, if anything; returns the codes to go on from."""


def alternate(
    backend: Backend,
    config: ModelConfig,
    components: np.ndarray,
    encoder: np.ndarray | None,
    codes: Any,
    history: list[dict[str, Any]] | None = None,
    *,
    callback: Callable[[FitState], None] | None = None,
) -> FitResult:
    """The outer loop (module docstring) from ``components``, ``encoder`` and ``codes``, on ``backend``.

    ``history``: the records of a run being resumed (it goes on after its last
    iteration, with the weights it was trained with when they were
    balanced), or None to start with the record of the initial point.  The
    Z step stops on ``config.inner_tolerance``, the D and E steps on
    ``config.dictionary_tolerance``, all on ``config.atol`` and
    ``config.max_inner``.  One log line per outer iteration on
    ``backend.logger``, then ``callback(FitState(...))``.
    """
    C, E, Z = components, encoder, codes
    size = backend.n_samples * config.n_atoms
    if history:
        history = list(history)
        if config.balance_lambdas and any(record.get("balanced") for record in history):
            config = config.model_copy(  # the weights the resumed history was trained with
                update={name: float(history[-1][name]) for name in ("lambda_d", "lambda_g", "lambda_e")}
            )
    else:
        history = [history_record(0, config, backend.terms(Z, C, E, None, None), size, None, {})]
        history[0]["seconds"] = 0.0
    data = backend.data_statistics() if (config.lambda_d > 0 or E is not None) else None
    statistics_kw = inner_options(config) | {"rtol": config.dictionary_tolerance}  # the D and E steps
    stop_reason = "max_outer"
    iteration = start = history[-1]["iteration"]
    for iteration in range(start + 1, config.max_outer + 1):
        tic = time.perf_counter()
        steps: dict[str, dict[str, Any] | None] = {}
        Z, steps["codes"] = backend.code_step(Z, C, E, config, iteration)
        code_seconds = time.perf_counter() - tic
        stats = backend.statistics(Z)
        if config.lambda_d > 0:
            result = solve_dictionary(stats["ZtZ"], stats["ZtX"], C, lambda_d=config.lambda_d,
                                      data_sq_norm=data["X_sq"], **statistics_kw)
            C = result.solution
            steps["dictionary"] = {"n_iter": result.n_iter, "stop_reason": result.stop_reason}
        if E is not None:
            result = solve_encoder(data["XtX"], stats["ZtX"], E, lambda_e=config.lambda_e,
                                   codes_sq_norm=stats["Z_sq"], **statistics_kw)
            E = result.solution
            steps["encoder"] = {"n_iter": result.n_iter, "stop_reason": result.stop_reason}
        terms = backend.terms(Z, C, E, steps["codes"], stats)
        record = history_record(iteration, config, terms, size, history[-1]["total"], steps)
        if config.balance_lambdas and iteration == 1:
            config = rebalance(history + [record], config)
        converged = record["relative_change"] <= config.rtol and not record.get("balanced")
        if converged:
            stop_reason = "rtol"
        last = converged or iteration == config.max_outer
        record["seconds"] = time.perf_counter() - tic
        record["seconds_codes"] = code_seconds
        history.append(record)
        Z = backend.save(iteration, Z, C, E, history, stop_reason if last else "")
        log_outer(backend.logger, record)
        if callback is not None:
            callback(FitState(iteration=iteration, codes=Z, components=C, encoder=E, record=record))
        if converged:
            break
    return FitResult(components=C, encoder=E, codes=Z, history=history, n_iter=iteration, stop_reason=stop_reason,
                     config=config)
