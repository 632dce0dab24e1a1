"""Benchmark of the numerical core against its peers, on the same data in one run.

Prints, for the Z sub-problem (lambda_g = lambda_e = 0, fixed dictionary) and for a
full fit (lambda_g = lambda_e = 0), the time each solver needs to reach the same
objective, and the ratios.  "Same objective" means: a peer runs with its usual
settings; its solution is scored with *our* objective in float64; then we time our
solver stopped at the first iteration whose objective is at least as good.  The same
is done for pyunlocbox's FISTA (the original implementation's solver) on the Z step.
SPAMS's ``lasso`` (LARS homotopy, an exact solver: package spams-bin, row skipped if
``spams`` does not import) is a peer of the Z step: it minimises, per frame x (a column
of its (n, N) Fortran-ordered float64 input, dictionary D = C^T (n, m)),
``1/2 ||x - D z||^2 + lambda1 ||z||_1`` (mode 2), which is our objective divided by
lambda_d: lambda1 = lambda_z / lambda_d, as scikit-learn's alpha.  The target objective
is the best of all peers (scikit-learn and SPAMS), so every solver is timed to the
same tolerance.
SPAMS's ``trainDL`` (online dictionary learning, Mairal et al. 2010) is a peer of the full
fit: with mode 2 and modeD 0 it minimises ``sum_x 1/2 ||x - D z||^2 + lambda1 ||z||_1``
subject to ``||d_j||_2 <= 1`` (plus ``lambda2/2 ||z||^2``, lambda2 = 1e-9 by default), our
objective with lambda_g = lambda_e = 0 divided by lambda_d: lambda1 = lambda_z / lambda_d.
It returns the dictionary only: its solution is scored with the codes SPAMS's ``lasso``
gives for it (exact), and its time is trainDL's plus lasso's.  It runs for a few numbers of
epochs (``--spams-epochs``, mini-batches of 256, from the dictionary our online fit starts from:
m frames drawn at random); our alternating fit is timed to the first outer iteration whose
objective is at least as good as each, and our online fit (``fit_method="online"``, the same
algorithm, ``--online-epochs``) to the first of its runs of 1, 2, 3, ... epochs that is.
Our coordinate-descent Z step (`sae.coordinate`, the default when lambda_g = 0) and our
homotopy path (`sae.lars`, z_solver="lars") stop on a per-frame duality gap: each is timed
with the loosest rtol of 1e-2, 1e-3, ... whose objective is at least as good as the target;
our FISTA stays as a peer row.  ``--lambda-z 0.03`` (the default preset's weight) makes
the codes dense, where coordinate descent is slow and the paths are long.

    python bench/bench_core.py                    # N = 20,000, n = 96, m = 128 and 512
    python bench/bench_core.py --n-samples 5000 --atoms 64 --repeats 1   # quick
    python bench/bench_core.py --fista-dtypes --skip-pyunlocbox           # without the slow FISTA rows
    python bench/bench_core.py --fista-dtypes --skip-pyunlocbox --skip-fit  # the Z step against sklearn and SPAMS
    python bench/bench_core.py --fista-dtypes --skip-pyunlocbox --skip-fit --lambda-z 0.03
    python bench/bench_core.py --fista-dtypes --skip-pyunlocbox --skip-fit --skip-cd --n-samples 2000 \
        --sklearn-algorithms lasso_lars --store dev.zarr --model KEY   # frames and dictionary of real music

Medians over --repeats runs (FISTA and pyunlocbox: --slow-repeats, they take minutes);
peak RSS of the process at the end.  Targets: Z step >= 5x faster than scikit-learn's
sparse_encode, >= 3x faster than pyunlocbox; full fit >= 5x faster than DictionaryLearning.
"""

from __future__ import annotations

import argparse
import resource
import warnings

import numpy as np
from sklearn.decomposition import DictionaryLearning, MiniBatchDictionaryLearning, sparse_encode

from _timing import timed
from sae.config import ModelConfig
from sae.coordinate import coordinate_descent_codes
from sae.lars import lars_codes
from sae.model import fit_sae, objective_terms, sample_dictionary, solve_codes

LAMBDA_D, LAMBDA_Z = 10.0, 1.0
ALPHA = LAMBDA_Z / LAMBDA_D  # sklearn's 1/2||x - z D||^2 + alpha ||z||_1 is ours divided by lambda_d


def make_data(n_samples: int, n_features: int, seed: int) -> np.ndarray:
    """Spectrogram-like frames: sparse non-negative mixtures of smooth spectra, min-max scaled."""
    rng = np.random.default_rng(seed)
    n_sources = 40
    bins = np.arange(n_features)
    centres = rng.uniform(0, n_features, size=(n_sources, 3))
    widths = rng.uniform(1.0, 6.0, size=(n_sources, 3))
    spectra = np.exp(-((bins[None, None, :] - centres[..., None]) ** 2) / (2 * widths[..., None] ** 2)).sum(1)
    activations = rng.exponential(1.0, size=(n_samples, n_sources)) * (rng.random((n_samples, n_sources)) < 0.15)
    X = activations @ spectra + 0.05 * rng.random((n_samples, n_features))
    X = (X - X.min(0)) / (X.max(0) - X.min(0))
    return X


def dictionary_from(X: np.ndarray, n_atoms: int, seed: int) -> np.ndarray:
    """Atoms drawn from the data (unit norm): coherent and realistic, unlike random atoms."""
    rng = np.random.default_rng(seed)
    atoms = X[rng.choice(len(X), n_atoms, replace=False)].copy()
    return atoms / np.linalg.norm(atoms, axis=1, keepdims=True)


def stored_frames(store: str, model: str | None, n_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """``n_samples`` frames drawn at random (seed 0, in stored order) from the model input of ``model/<model>`` in
    ``store``, and that model's dictionary, both float64."""
    from sae import store as sae_store
    from sae.distributed import open_model
    from sae.model import _take_rows
    from sae.preprocess import open_preprocessed

    if model is None:
        raise SystemExit("--store needs --model KEY (a trained model/<KEY> of the store)")
    state = open_model(store, model)
    config = sae_store.stage_group(store, "model", model, mode="r").attrs["config"]
    if config["train"]["model"]["lambda_d"] != LAMBDA_D:
        raise SystemExit(f"model/{model} has lambda_d = {config['train']['model']['lambda_d']}: this benchmark's "
                         f"objective has lambda_d = {LAMBDA_D}")
    X = open_preprocessed(store, config["preprocess"])["X"]
    rows = np.sort(np.random.default_rng(0).choice(X.shape[0], size=min(n_samples, X.shape[0]), replace=False))
    frames = _take_rows(X, rows).astype(np.float64)
    return frames, np.asarray(state["components"], dtype=np.float64)


def codes_objective(X: np.ndarray, C: np.ndarray, Z: np.ndarray) -> float:
    residual = X - Z @ C
    return 0.5 * LAMBDA_D * float(np.sum(residual**2)) + LAMBDA_Z * float(np.abs(Z).sum())


def first_reaching(run, target, start=64, limit=8192):
    """Smallest iteration count whose objective is <= target: double max_iter until a run's
    history reaches the target, then read the first iteration that does off that history."""
    max_iter = start
    while True:
        history = run(max_iter)
        reached = np.flatnonzero(history <= target * (1 + 1e-7))
        if len(reached):
            return max(int(reached[0]), 1)
        if max_iter >= limit:
            return None
        max_iter *= 2


def ours_to_target(X, C, target, dtype, repeats):
    """Time our FISTA Z step stopped at the first iteration whose objective is <= target."""
    Xd, Cd = X.astype(dtype), C.astype(dtype)
    Z0 = np.zeros((len(X), len(C)), dtype=dtype)

    def solve(max_iter):
        return solve_codes(Xd, Cd, None, None, Z0, lambda_d=LAMBDA_D, lambda_z=LAMBDA_Z, rtol=0.0,
                           max_iter=max_iter, method="fista")

    n_iter = first_reaching(lambda k: solve(k).objective, target)
    if n_iter is None:
        return float("nan"), None, float("nan")
    seconds, result = timed(lambda: solve(n_iter), repeats)
    return seconds, n_iter, codes_objective(X, C, result.solution.astype(np.float64))


def per_frame_to_target(X, C, target, dtype, repeats, n_threads, solver=coordinate_descent_codes):
    """Time our per-frame Z step (coordinate descent, or ``solver=lars_codes``) with the loosest rtol whose
    objective is <= target."""
    Xd, Cd = X.astype(dtype), C.astype(dtype)
    Z0 = np.zeros((len(X), len(C)), dtype=dtype)

    def solve(rtol):
        return solver(Xd, Cd, None, Z0, lambda_d=LAMBDA_D, lambda_z=LAMBDA_Z, rtol=rtol, max_iter=500,
                      n_threads=n_threads)

    solve(1e-2)  # compile, or load the compiled kernel from numba's cache, outside the timing
    for rtol in (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10, 0.0):
        result = solve(rtol)
        objective = codes_objective(X, C, result.solution.astype(np.float64))
        if objective <= target * (1 + 1e-7):
            seconds, result = timed(lambda rtol=rtol: solve(rtol), repeats)
            return seconds, rtol, result.n_iter, objective
    return float("nan"), None, None, float("nan")


def pyunlocbox_to_target(X, C, target, repeats):
    """pyunlocbox's forward-backward with FISTA acceleration, as the thesis used it."""
    from pyunlocbox import acceleration, functions, solvers

    D = C.T.astype(np.float32)  # (n, m): the thesis's orientation, float32 as the thesis
    Y = X.T.astype(np.float32)  # (n, N)
    beta = LAMBDA_D * np.linalg.norm(D.T @ D, 2)

    def run(maxit: int):
        f_data = functions.norm_l2(lambda_=LAMBDA_D / 2, A=D, y=Y)
        f_l1 = functions.norm_l1(lambda_=LAMBDA_Z)
        solver = solvers.forward_backward(step=1.0 / beta, accel=acceleration.fista())
        return solvers.solve([f_data, f_l1], np.zeros((C.shape[0], X.shape[0]), np.float32), solver,
                             rtol=0.0, maxit=maxit, verbosity="NONE")

    def history(maxit: int) -> np.ndarray:
        return np.array([np.inf] + [sum(values) for values in run(maxit)["objective"]])

    n_iter = first_reaching(history, target)
    if n_iter is None:
        return float("nan"), None
    seconds, _ = timed(lambda: run(n_iter), repeats)
    return seconds, n_iter


def spams_lasso(X: np.ndarray, C: np.ndarray, n_threads: int) -> np.ndarray:
    """SPAMS's lasso (LARS, mode 2: 1/2 ||x - D z||^2 + lambda1 ||z||_1 per frame) as codes (N, m)."""
    import spams

    codes = spams.lasso(np.asfortranarray(X.T, dtype=np.float64), D=np.asfortranarray(C.T, dtype=np.float64),
                        lambda1=ALPHA, mode=2, numThreads=n_threads)
    return codes.T.toarray()


def spams_rows(X: np.ndarray, C: np.ndarray, repeats: int) -> list[tuple[str, float, float]]:
    """SPAMS lasso with all threads and with one, if spams imports."""
    try:
        import spams  # noqa: F401
    except ImportError:
        print("  (SPAMS not installed: pip install spams-bin; its rows are skipped)")
        return []
    rows = []
    for n_threads, label in ((-1, "all threads"), (1, "1 thread")):
        seconds, Z = timed(lambda n_threads=n_threads: spams_lasso(X, C, n_threads), repeats)
        rows.append((f"SPAMS lasso (LARS) {label}", seconds, codes_objective(X, C, Z)))
    return rows


def best_sklearn_seconds(rows) -> float:
    return min(seconds for _, seconds, _ in rows)


def bench_codes(X: np.ndarray, n_atoms: int, repeats: int, slow_repeats: int, fista_dtypes, pyunlocbox: bool,
                algorithms=("lasso_cd", "lasso_lars"), components: np.ndarray | None = None, cd: bool = True):
    C = dictionary_from(X, n_atoms, seed=1) if components is None else components
    print(f"\n== Z step: N={len(X)}, n={X.shape[1]}, m={n_atoms}, lambda_d={LAMBDA_D}, lambda_z={LAMBDA_Z} ==")
    rows = []
    for algorithm in algorithms:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # lasso_cd's convergence warnings on a few frames
            seconds, Z = timed(lambda: sparse_encode(X, C, algorithm=algorithm, alpha=ALPHA, n_jobs=1), repeats)
        rows.append((f"sklearn sparse_encode {algorithm}", seconds, codes_objective(X, C, Z)))
    spams = spams_rows(X, C, repeats)
    target = min(objective for _, _, objective in rows + spams)
    print(f"target objective (best of scikit-learn and SPAMS): {target:.6e}")
    for name, seconds, objective in rows + spams:
        print(f"  {name:<38} {seconds:8.3f} s   objective {objective:.6e}")
    ours = {}
    for label, solver, dtypes in (("cd", coordinate_descent_codes, (np.float32, np.float64) if cd else ()),
                                  ("lars", lars_codes, (np.float32,))):
        for dtype in dtypes:
            for n_threads in (None, 1):
                seconds, rtol, n_iter, objective = per_frame_to_target(X, C, target, dtype, repeats, n_threads, solver)
                threads = "all threads" if n_threads is None else "1 thread"
                name = f"sae {label} {np.dtype(dtype).name} {threads}"
                ours[name] = seconds
                steps = "full sweeps" if label == "cd" else "pieces of a path"
                print(f"  {name:<38} {seconds:8.3f} s   objective {objective:.6e}   (rtol {rtol:g}, "
                      f"{n_iter} {steps} at most)")
    if cd:  # the default tolerance of the fit (ModelConfig.rtol = 1e-5): gap-certified, beyond the target
        Xf, Cf = X.astype(np.float32), C.astype(np.float32)
        seconds, result = timed(lambda: coordinate_descent_codes(
            Xf, Cf, None, np.zeros((len(X), n_atoms), np.float32), lambda_d=LAMBDA_D, lambda_z=LAMBDA_Z, rtol=1e-5),
            repeats)
        objective = codes_objective(X, C, result.solution.astype(np.float64))
        print(f"  {'sae cd float32 all threads, rtol 1e-5':<38} {seconds:8.3f} s   objective {objective:.6e}   "
              f"({result.n_iter} full sweeps at most; {best_sklearn_seconds(rows) / seconds:.1f}x vs best sklearn)")
    for dtype in fista_dtypes:
        seconds, n_iter, objective = ours_to_target(X, C, target, dtype, slow_repeats)
        name = f"sae FISTA {np.dtype(dtype).name}"
        ours[name] = seconds
        print(f"  {name:<38} {seconds:8.3f} s   objective {objective:.6e}   ({n_iter} iterations)")
    seconds_ub = float("nan")
    if pyunlocbox:
        seconds_ub, n_iter_ub = pyunlocbox_to_target(X, C, target, slow_repeats)
        print(f"  {'pyunlocbox FISTA float32':<38} {seconds_ub:8.3f} s   ({n_iter_ub} iterations)")
    best_sklearn = best_sklearn_seconds(rows)
    for name, seconds in ours.items():
        ratios = ", ".join(f"{peer_seconds / seconds:6.1f}x vs {peer.split()[-1]}" for peer, peer_seconds, _ in rows)
        line = f"  speed-up of {name:<30}: {ratios}"
        if pyunlocbox:
            line += f", {seconds_ub / seconds:6.1f}x vs pyunlocbox"
        for peer, peer_seconds, _ in spams:
            line += f", {peer_seconds / seconds:6.1f}x vs SPAMS {peer.split(')')[-1].strip()}"
        print(line)
    if cd:
        default = ours["sae cd float32 all threads"]
        print(f"  -> default Z step (cd float32) vs best sparse_encode: {best_sklearn / default:.1f}x (target >= 5x)")
    if spams:
        for name in [name for name in ("sae cd float32 all threads", "sae lars float32 all threads",
                                       "sae lars float32 1 thread") if name in ours]:
            peer = spams[0] if name.endswith("all threads") else spams[-1]
            print(f"  -> {name} vs {peer[0]}: {peer[1] / ours[name]:.1f}x")


def start_dictionary(X: np.ndarray, n_atoms: int) -> np.ndarray:
    """The initial dictionary of our online fit (init="frames", random_state 0), as float64: trainDL starts from it
    too, since the objective after a few epochs depends on the start as much as on the method (1 epoch at
    lambda_z = 0.03, m = 128: 692-726 from four draws of frames, for trainDL and for ours alike)."""
    return sample_dictionary(X, n_atoms, rng=np.random.default_rng(0), dtype=np.float32).astype(np.float64)


def spams_train(X: np.ndarray, n_atoms: int, epochs: int, n_threads: int = -1,
                batch_size: int = 256) -> tuple[float, float, np.ndarray, np.ndarray]:
    """SPAMS's trainDL (mode 2, modeD 0: atoms in the unit ball) from `start_dictionary` for ``epochs`` passes,
    then lasso's codes, both with ``n_threads`` (-1: all).

    Returns trainDL's seconds, lasso's seconds, the dictionary C (m, n) and the codes Z (N, m).
    """
    import time

    import spams

    Xf = np.asfortranarray(X.T, dtype=np.float64)  # (n, N): SPAMS's orientation, one frame per column
    iterations = epochs * -(-len(X) // batch_size)
    D0 = np.asfortranarray(start_dictionary(X, n_atoms).T)
    tic = time.perf_counter()
    D = spams.trainDL(Xf, D=D0, lambda1=ALPHA, mode=2, modeD=0, iter=iterations, batchsize=batch_size,
                      numThreads=n_threads, verbose=False)
    learned = time.perf_counter() - tic
    tic = time.perf_counter()
    Z = spams_lasso(X, D.T, n_threads)
    return learned, time.perf_counter() - tic, D.T, Z


def spams_fit_rows(X: np.ndarray, n_atoms: int, epochs_list, repeats: int) -> list[tuple[str, float, float, float]]:
    """(name, trainDL seconds, lasso seconds, objective) per number of epochs, medians of ``repeats``."""
    try:
        import spams  # noqa: F401
    except ImportError:
        print("  (SPAMS not installed: pip install spams-bin; its rows are skipped)")
        return []
    rows = []
    for epochs, (n_threads, threads) in ((epochs, threads) for epochs in epochs_list
                                         for threads in ((-1, "all threads"), (1, "1 thread"))):
        runs = [spams_train(X, n_atoms, epochs, n_threads) for _ in range(repeats)]
        learned = float(np.median([run[0] for run in runs]))
        coded = float(np.median([run[1] for run in runs]))
        objective = codes_objective(X, runs[-1][2], runs[-1][3])
        name = f"SPAMS trainDL {epochs} epoch{'s' if epochs > 1 else ''} + lasso, {threads}"
        rows.append((name, learned, coded, objective))
        print(f"  {name:<38} {learned + coded:8.2f} s   objective {objective:.6e}   (trainDL {learned:.2f} s, "
              f"lasso {coded:.2f} s)")
    return rows


def bench_fit(X: np.ndarray, n_atoms: int, repeats: int, max_iter: int, spams_epochs=(), skip_sklearn=False,
              z_solvers=("auto",), online_epochs=(), online_solver="lars") -> None:
    print(f"\n== full fit (lambda_g = lambda_e = 0): N={len(X)}, n={X.shape[1]}, m={n_atoms}, medians of {repeats} ==")

    def score(model) -> float:
        code = model.transform(X)
        return codes_objective(X, model.components_, code)

    peers = []
    for name, make in () if skip_sklearn else (
        ("sklearn DictionaryLearning (cd)",
         lambda: DictionaryLearning(n_atoms, alpha=ALPHA, max_iter=max_iter, fit_algorithm="cd",
                                    transform_algorithm="lasso_cd", transform_alpha=ALPHA, random_state=0)),
        ("sklearn MiniBatchDictionaryLearning",
         lambda: MiniBatchDictionaryLearning(n_atoms, alpha=ALPHA, max_iter=max_iter, batch_size=256,
                                             transform_algorithm="lasso_cd", transform_alpha=ALPHA,
                                             random_state=0)),
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            seconds, model = timed(lambda: make().fit(X), repeats)
            objective = score(model)
        peers.append((name, seconds, objective))
        print(f"  {name:<38} {seconds:8.2f} s   objective {objective:.6e}")
    peers += [(name, learned + coded, objective)
              for name, learned, coded, objective in spams_fit_rows(X, n_atoms, spams_epochs, repeats)]

    for solver in z_solvers:
        our_fit(X, n_atoms, repeats, peers, solver)
    if online_epochs:
        our_online_fit(X, n_atoms, repeats, peers, online_epochs, online_solver)


def our_online_fit(X: np.ndarray, n_atoms: int, repeats: int, peers, epochs_list, z_solver: str) -> None:
    """fit_sae with fit_method="online" (mini-batches of 256 and the first dictionary as trainDL's:
    `start_dictionary`; every frame's codes certified to a relative gap of 1e-5, the thesis's tolerance) for
    each number of epochs, then timed to each peer's objective: the first of these runs that reaches it."""
    config = ModelConfig(n_atoms=n_atoms, lambda_d=LAMBDA_D, lambda_z=LAMBDA_Z, rtol=1e-9, inner_rtol=1e-5,
                         random_state=0, z_solver=z_solver, fit_method="online", batch_size=256, init="frames")
    fit_sae(X[:4 * n_atoms], config.model_copy(update={"max_outer": 1}))  # numba: compile or load from cache
    rows = []
    for epochs in epochs_list:
        seconds, result = timed(lambda: fit_sae(X, config.model_copy(update={"max_outer": epochs})), repeats)
        objective = codes_objective(X, result.components, result.codes)
        rows.append((epochs, seconds, objective))
        print(f"  sae online (z_solver={z_solver}) {epochs} epoch{'s' if epochs > 1 else ''}:"
              f"{'':<12}{seconds:8.2f} s   objective {objective:.6e}   (last Z step {result.history[-1]['seconds']:.2f} s)")
    for name, seconds, objective in peers:
        reached = [(epochs, ours) for epochs, ours, value in rows if value <= objective]
        if not reached:
            print(f"  vs {name}: objective {objective:.6e} not reached (ours {rows[-1][2]:.6e})")
            continue
        epochs, ours = reached[0]
        print(f"  vs {name}: ours online reaches its objective in {epochs} epoch{'s' if epochs > 1 else ''}, "
              f"{ours:.2f} s: its time / ours = {seconds / ours:.2f}x")


def our_fit(X: np.ndarray, n_atoms: int, repeats: int, peers, z_solver: str) -> None:
    """fit_sae with ``z_solver``, timed to each peer's objective."""
    config = ModelConfig(n_atoms=n_atoms, lambda_d=LAMBDA_D, lambda_z=LAMBDA_Z, rtol=1e-6, max_outer=200,
                         random_state=0, z_solver=z_solver)
    fit_sae(X[:50], config.model_copy(update={"max_outer": 1}))  # numba: compile or load from cache
    fits = [fit_sae(X, config) for _ in range(repeats)]
    result = fits[-1]
    totals = np.array([record["total"] for record in result.history])
    length = min(len(fit.history) for fit in fits)
    elapsed = np.median([np.cumsum([record["seconds"] for record in fit.history[:length]]) for fit in fits], axis=0)
    totals = totals[:length]
    print(f"  sae fit_sae float32 (z_solver={config.z_solver}): {result.n_iter} outer iterations, "
          f"{elapsed[-1]:.2f} s, final objective {totals[-1]:.6e}")
    for name, seconds, objective in peers:
        reached = np.flatnonzero(totals <= objective)
        if len(reached) == 0:
            print(f"  vs {name}: objective {objective:.6e} not reached (ours {totals[-1]:.6e})")
            continue
        ours = elapsed[reached[0]]
        target = " (target >= 5x)" if name.startswith("sklearn DictionaryLearning") else ""
        print(f"  vs {name}: ours reaches its objective after {reached[0]} outer iterations, "
              f"{ours:.2f} s: its time / ours = {seconds / ours:.2f}x{target}")
    final = objective_terms(X.astype(np.float32), result.codes, result.components, None, None, config)
    print(f"  final terms: { {key: round(float(value), 2) for key, value in final.items()} }")


def main() -> None:
    global LAMBDA_Z, ALPHA
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-samples", type=int, default=20_000)
    parser.add_argument("--n-features", type=int, default=96)
    parser.add_argument("--atoms", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--fit-atoms", type=int, default=128)
    parser.add_argument("--fit-max-iter", type=int, default=20, help="iterations of the scikit-learn fits")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slow-repeats", type=int, default=1, help="repeats of the FISTA and pyunlocbox rows")
    parser.add_argument("--fista-dtypes", nargs="*", default=["float32"], choices=["float32", "float64"],
                        help="dtypes of our FISTA peer rows (none: skip them)")
    parser.add_argument("--skip-pyunlocbox", action="store_true")
    parser.add_argument("--sklearn-algorithms", nargs="+", default=["lasso_cd", "lasso_lars"],
                        choices=["lasso_cd", "lasso_lars"], help="sparse_encode peers of the Z step")
    parser.add_argument("--skip-codes", action="store_true")
    parser.add_argument("--skip-cd", action="store_true", help="leave our coordinate-descent rows out of the Z step")
    parser.add_argument("--store", default=None,
                        help="take the Z step's frames (--n-samples drawn at random) and dictionary from a trained "
                             "model of this store (real music) instead of synthetic ones; needs --model")
    parser.add_argument("--model", default=None, help="key of model/<key> in --store (lambda_d must be 10)")
    parser.add_argument("--skip-fit", action="store_true")
    parser.add_argument("--fit-repeats", type=int, default=1, help="repeats of the full fits (medians)")
    parser.add_argument("--spams-epochs", type=int, nargs="*", default=[1, 3, 10, 30],
                        help="passes of SPAMS trainDL over the data, one peer row each (none: skip)")
    parser.add_argument("--skip-fit-sklearn", action="store_true", help="full fit without the scikit-learn peers")
    parser.add_argument("--lambda-z", type=float, default=LAMBDA_Z,
                        help="weight of the l1 term (lambda_d = 10): small values make many non-zeros per frame")
    parser.add_argument("--fit-z-solvers", nargs="*", default=["auto"], choices=["auto", "cd", "lars"],
                        help="Z-step solvers of our alternating full fit, one fit each (none: skip it)")
    parser.add_argument("--online-epochs", type=int, nargs="*", default=[1, 2, 3, 5, 10, 30],
                        help="epochs of our online fit (fit_method='online'), one row each (none: skip)")
    parser.add_argument("--online-z-solver", default="lars", choices=["cd", "lars"],
                        help="Z-step solver of the online fit's mini-batches")
    args = parser.parse_args()
    LAMBDA_Z, ALPHA = args.lambda_z, args.lambda_z / LAMBDA_D

    X = make_data(args.n_samples, args.n_features, seed=0)
    fista_dtypes = [np.dtype(name).type for name in args.fista_dtypes]
    if args.store is not None:
        frames, components = stored_frames(args.store, args.model, args.n_samples)
        bench_codes(frames, components.shape[0], args.repeats, args.slow_repeats, fista_dtypes,
                    not args.skip_pyunlocbox, args.sklearn_algorithms, components=components, cd=not args.skip_cd)
    for n_atoms in [] if args.skip_codes or args.store is not None else args.atoms:
        bench_codes(X, n_atoms, args.repeats, args.slow_repeats, fista_dtypes, not args.skip_pyunlocbox,
                    args.sklearn_algorithms, cd=not args.skip_cd)
    if not args.skip_fit:
        bench_fit(X, args.fit_atoms, args.fit_repeats, args.fit_max_iter, args.spams_epochs, args.skip_fit_sklearn,
                  args.fit_z_solvers, args.online_epochs, args.online_z_solver)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS of this process: {peak:.0f} MB")


if __name__ == "__main__":
    main()
