"""The learned codes against their input and against scikit-learn's dictionary learning, on a store.

For a pipeline configuration whose stages a ``sae run`` (or ``sae experiment``) has computed, prints,
under the configuration's classification (pooling, classifier, protocol and the store's groups):

- the baseline: the preprocessed frames themselves (``preprocess/<key>``);
- the codes of the trained model (``model/<key>``);
- the codes of scikit-learn's ``MiniBatchDictionaryLearning`` with the same number of atoms and the
  same objective without graph and encoder terms (``alpha = lambda_z / lambda_d``: sklearn minimises
  ``1/2 ||x - z D||^2 + alpha ||z||_1`` per frame, atoms of unit norm), fitted on the same frames
  (``--fit-rows`` of them at most, taken evenly) and encoded by lasso: scikit-learn's coordinate descent, or
  with ``--peer-encoding lars`` the same lasso solved by ``sae.lars`` (exact to a relative duality gap of 1e-5
  per frame, much faster where the codes are dense); ``--no-peer`` leaves it out;
- with ``--recode``, the dictionary held apart from the coder: that peer's dictionary and the model's own
  initial dictionary (``train.model.init`` and ``random_state``, before any learning) each coded by the model's
  own Z step from zero codes (graph term, solver and stopping rule of its configuration, in memory), so that
  the rows differ by their dictionary alone;
- when the model has a graph term, the input smoothed on the same graph without any dictionary:
  ``Y = argmin lambda_d/2 ||Y - X||^2 + lambda_g/2 tr(Y^T L Y)``, i.e. ``(I + lambda_g/lambda_d L) Y = X``
  (solved by conjugate gradients, all columns at once), which tells what the graph term alone gives;

with each one's accuracy (mean ± std over the folds), its paired difference with the baseline on the same
splits (mean ± std of the per-split differences, and the splits it wins), fitting time, the objective
``lambda_d/2 ||X - Z C||^2 + lambda_z ||Z||_1`` of its codes and dictionary, and the peak RSS.

    sae run --data sae-devset/manifest.csv --store dev.zarr --set train.model.lambda_g=0
    python bench/bench_features.py --data sae-devset/manifest.csv --store dev.zarr --set train.model.lambda_g=0
"""

from __future__ import annotations

import argparse
import resource
import time
import warnings
from pathlib import Path

import numpy as np
from sklearn.decomposition import MiniBatchDictionaryLearning
from sklearn.exceptions import ConvergenceWarning

from flows._cli_config import build_config
from flows.pipeline import resolve_paths
from sae.classify import cross_validate
from sae.distributed import open_model
from sae.lars import lars_codes
from sae.model import code_step_options, initial_dictionary, solve_codes
from sae.pooling import aggregate_clips, aggregate_options
from sae.preprocess import open_preprocessed
from sae.report import paired_difference
from sae.stages.results import open_rows
from sae.store.keys import stage_keys


def reconstruction_objective(X: np.ndarray, Z: np.ndarray, C: np.ndarray, lambda_d: float, lambda_z: float) -> float:
    """``lambda_d/2 ||X - Z C||_F^2 + lambda_z ||Z||_1`` in float64, by chunks of rows."""
    total = 0.0
    for start in range(0, X.shape[0], 65536):
        x = X[start : start + 65536].astype(np.float64)
        z = Z[start : start + 65536].astype(np.float64)
        total += 0.5 * lambda_d * float(np.sum((x - z @ C) ** 2)) + lambda_z * float(np.abs(z).sum())
    return total


def smooth_on_graph(X: np.ndarray, L, ratio: float, rtol: float = 1e-6, max_iter: int = 1000) -> tuple[np.ndarray, int]:
    """``Y`` solving ``(I + ratio L) Y = X`` (L symmetric positive semi-definite) by conjugate gradients on
    every column at once, in float64, to ``||residual|| <= rtol ||x||`` per column; returns Y and the iterations."""
    B = np.asarray(X, dtype=np.float64)
    Y = B.copy()
    R = B - (Y + ratio * (L @ Y))
    P = R.copy()
    rs = np.einsum("ij,ij->j", R, R)
    target = (rtol * np.linalg.norm(B, axis=0)) ** 2
    for iteration in range(1, max_iter + 1):
        AP = P + ratio * (L @ P)
        alpha = rs / np.maximum(np.einsum("ij,ij->j", P, AP), np.finfo(np.float64).tiny)
        Y += alpha * P
        R -= alpha * AP
        new = np.einsum("ij,ij->j", R, R)
        if np.all(new <= target):
            return Y, iteration
        P = R + (new / np.maximum(rs, np.finfo(np.float64).tiny)) * P
        rs = new
    raise RuntimeError(f"conjugate gradients did not reach rtol {rtol} in {max_iter} iterations")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", "-c", type=Path, default=None, help="YAML/TOML configuration, as for sae run")
    parser.add_argument("--data", default=None)
    parser.add_argument("--store", default=None)
    parser.add_argument("--set", "-s", action="append", default=[], dest="overrides")
    parser.add_argument("--preset", default=None)
    parser.add_argument("--fit-rows", type=int, default=200_000, help="frames MiniBatchDictionaryLearning is fitted on")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3, help="passes of MiniBatchDictionaryLearning over its rows")
    parser.add_argument("--no-peer", action="store_true", help="leave MiniBatchDictionaryLearning out")
    parser.add_argument("--peer-encoding", choices=("lasso_cd", "lars"), default="lasso_cd",
                        help="how the peer's codes are computed (the same lasso): scikit-learn or sae.lars")
    parser.add_argument("--recode", action="store_true",
                        help="also code the peer's and the initial dictionary with the model's own Z step")
    args = parser.parse_args()

    config = resolve_paths(build_config(args.config, args.overrides, data=args.data, store=args.store,
                                        preset=args.preset))
    store, keys, model_config = config.ingest.store, stage_keys(config), config.train.model
    X = open_preprocessed(store, keys["preprocess"])["X"][:]
    model = open_model(store, keys["model"])
    if not model["complete"]:
        raise SystemExit(f"model/{keys['model']} is not complete in {store}: run sae run with this configuration")
    row_clips, clip_labels, _, clip_groups = open_rows(store, keys["preprocess"])
    print(f"store {store}: {X.shape[0]} frames x {X.shape[1]} features, {np.unique(row_clips).size} clips, "
          f"{np.unique(clip_groups[np.unique(row_clips)]).size} groups; m = {model_config.n_atoms}, "
          f"lambda_d = {model_config.lambda_d}, lambda_z = {model_config.lambda_z}, lambda_g = {model_config.lambda_g}")

    ours_seconds = float(sum(record.get("seconds", 0.0) for record in model["history"]))
    table = _Table(X, row_clips, clip_labels, clip_groups, config, model_config)
    table.add("baseline (preprocessed input)", X, None, None)
    table.add(f"sae codes (model/{keys['model']})", model["codes"][:], model["components"], ours_seconds)
    laplacian = None
    if model_config.lambda_g > 0:
        from sae import store as sae_store
        from sae.graph import open_graph

        laplacian = sae_store.read_sparse(open_graph(store, keys["graph"]), "laplacian")
        start = time.perf_counter()
        smoothed, iterations = smooth_on_graph(X, laplacian.astype(np.float64),
                                               model_config.lambda_g / model_config.lambda_d)
        seconds = time.perf_counter() - start
        print(f"input smoothed on graph/{keys['graph']}: {iterations} conjugate-gradient iterations, {seconds:.1f} s")
        table.add("input smoothed on the graph (no dictionary)", smoothed.astype(np.float32), None, seconds)
        del smoothed
    dictionaries = {}
    if not args.no_peer:
        codes, components, seconds = _peer(X, model_config, args)
        table.add("MiniBatchDictionaryLearning codes", codes, components, seconds)
        dictionaries["MiniBatchDictionaryLearning's dictionary"] = components
        del codes
    if args.recode:
        dictionaries["initial dictionary (not learned)"] = initial_dictionary(
            X, model_config, np.random.default_rng(model_config.random_state), X.dtype)
        for name, components in dictionaries.items():
            table.add(f"{name}, coded by the model's Z step", *_recode(X, components, laplacian, model_config))
    table.differences()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\npeak RSS of this process: {peak:.2f} GiB")


def _peer(X: np.ndarray, model_config, args) -> tuple[np.ndarray, np.ndarray, float]:
    """MiniBatchDictionaryLearning fitted and encoded as the module docstring says: codes, components, seconds."""
    alpha = model_config.lambda_z / model_config.lambda_d
    step = max(1, X.shape[0] // args.fit_rows)
    fit_rows = X[::step]
    peer = MiniBatchDictionaryLearning(
        n_components=model_config.n_atoms, alpha=alpha, batch_size=args.batch_size,
        max_iter=args.epochs, transform_algorithm="lasso_cd", transform_alpha=alpha, random_state=0,
    )
    # scikit-learn's lasso warns for every batch whose float32 duality gap misses its (tiny) tolerance: counted.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        start = time.perf_counter()
        peer.fit(fit_rows)
        peer_fit = time.perf_counter() - start
        start = time.perf_counter()
        if args.peer_encoding == "lars":
            components = np.ascontiguousarray(peer.components_, dtype=X.dtype)
            peer_codes = lars_codes(X, components, None, np.zeros((X.shape[0], components.shape[0]), X.dtype),
                                    lambda_d=model_config.lambda_d, lambda_z=model_config.lambda_z).solution
        else:
            peer_codes = peer.transform(X).astype(np.float32)
        peer_encode = time.perf_counter() - start
    n_unconverged = sum(issubclass(w.category, ConvergenceWarning) for w in caught)
    print(f"MiniBatchDictionaryLearning: fit {peer_fit:.1f} s on {fit_rows.shape[0]} rows, encode "
          f"({args.peer_encoding}) {peer_encode:.1f} s, {100 * np.count_nonzero(peer_codes) / peer_codes.size:.1f} % "
          f"non-zeros "
          f"({n_unconverged} lasso calls stopped short of scikit-learn's tolerance)")
    return peer_codes, peer.components_, peer_fit + peer_encode


def _recode(X: np.ndarray, components: np.ndarray, laplacian, model_config) -> tuple[np.ndarray, np.ndarray, float]:
    """The codes of ``components`` by the model's Z step (`sae.model.solve_codes` with its configuration's
    weights, solver and stopping rule) from zero codes: codes, components, seconds."""
    components = np.ascontiguousarray(components, dtype=X.dtype)
    start = time.perf_counter()
    result = solve_codes(X, components, None, laplacian, np.zeros((X.shape[0], components.shape[0]), X.dtype),
                         **{**code_step_options(model_config), "lambda_e": 0.0})
    seconds = time.perf_counter() - start
    print(f"recoded in {seconds:.1f} s: {result.n_iter} iterations ({result.stop_reason}), "
          f"{100 * np.count_nonzero(result.solution) / result.solution.size:.1f} % non-zeros")
    return result.solution, components, seconds


class _Table:
    """The table of the module docstring, a row printed as soon as its features are classified (the features
    are then let go: only the per-split scores are kept)."""

    def __init__(self, X, row_clips, clip_labels, clip_groups, config, model_config) -> None:
        self.X, self.row_clips, self.clip_labels, self.clip_groups = X, row_clips, clip_labels, clip_groups
        self.config, self.model_config = config, model_config
        self.scores: dict[str, np.ndarray] = {}
        print(f"\n| features | accuracy % ({config.classify.protocol}) | minus baseline, paired (splits won) "
              "| objective (no graph) | seconds |")
        print("|---|---|---|---|---|", flush=True)

    def add(self, name: str, features: np.ndarray, components: np.ndarray | None, seconds: float | None) -> None:
        config, model_config = self.config, self.model_config
        aggregated = aggregate_clips(features, self.row_clips, clip_labels=self.clip_labels,
                                     **aggregate_options(config.classify))
        summary = cross_validate(aggregated, config.classify, clip_groups=self.clip_groups)
        objective = (
            f"{reconstruction_objective(self.X, features, components, model_config.lambda_d, model_config.lambda_z):.6g}"
            if components is not None else "-"
        )
        self.scores[name] = np.asarray(summary["scores"])
        paired = "-" if len(self.scores) == 1 else paired_difference(self.scores[name], next(iter(self.scores.values())))
        print(f"| {name} | {100 * summary['accuracy_mean']:.1f} ± {100 * summary['accuracy_std']:.1f} "
              f"(grouped by {summary['grouping']}) | {paired} | {objective} | "
              f"{'-' if seconds is None else f'{seconds:.1f}'} |", flush=True)

    def differences(self) -> None:
        """Our codes (the second row) minus every later row, paired."""
        ours, *others = list(self.scores)[1:]
        for other in others:
            print(f"\n{ours} minus {other}, paired (splits won): "
                  f"{paired_difference(self.scores[ours], self.scores[other])}")


if __name__ == "__main__":
    main()
