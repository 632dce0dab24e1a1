"""sae: structured auto-encoders for music, at cluster scale.

Array orientation
-----------------
Everything in this package stores and passes arrays **samples by features**, as
scikit-learn does:

================  ========================  =====================================
name              shape                     meaning
================  ========================  =====================================
``X``             (n_samples, n_features)   data, one spectrogram frame per row
``Z`` (codes)     (n_samples, n_atoms)      sparse representation, a row a frame
``components``    (n_atoms, n_features)     the dictionary, one atom per row
``encoder``       (n_atoms, n_features)     the encoder, one filter per row
``L``             (n_samples, n_samples)    graph Laplacian between frames
================  ========================  =====================================

The thesis writes the same model features by samples (``X`` is n x N, ``D`` is
n x m, ``Z`` is m x N, ``E`` is m x n).  With ``X_thesis = X.T``,
``Z_thesis = Z.T``, ``D = components.T`` and ``E = encoder`` its objective

    lambda_d/2 ||X - D Z||_F^2 + lambda_z ||Z||_1 + lambda_g/2 tr(Z L Z^T)
        + lambda_e/2 ||Z - E X||_F^2,    s.t. ||d_i||_2 <= 1, ||e_k||_2 <= 1

reads, in our orientation,

    lambda_d/2 ||X - Z C||_F^2 + lambda_z ||Z||_1 + lambda_g/2 tr(Z^T L Z)
        + lambda_e/2 ||Z - X E^T||_F^2,  s.t. every row of C and of E in the unit ball

with ``C = components`` and ``E = encoder``.  Docstrings that write the maths
say which orientation they use; the code never swaps it.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sae")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+unknown"

from sae.artifact import load_model  # noqa: E402
from sae.estimator import StructuredAutoEncoder  # noqa: E402
from sae.model import (  # noqa: E402
    FitResult,
    encode_direct,
    fit_sae,
    objective_terms,
    solve_codes,
    solve_dictionary,
    solve_encoder,
)
from sae.solvers import SolverResult, fista, spectral_norm  # noqa: E402

__all__ = [
    "__version__",
    "load_model",
    "StructuredAutoEncoder",
    "FitResult",
    "SolverResult",
    "fit_sae",
    "objective_terms",
    "solve_codes",
    "solve_dictionary",
    "solve_encoder",
    "encode_direct",
    "fista",
    "spectral_norm",
]
