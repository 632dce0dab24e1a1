"""Typed configuration shared by the estimator, the flows and the command line.

Every stage of the pipeline has one pydantic model here.  The models forbid
unknown keys and validate ranges, so a bad value fails before any work starts,
with a message that names the parameter, the allowed range and the value
received.  They are plain data: JSON round-trips them (``model_dump(mode="json")``)
and the store records them as attributes.

>>> ModelConfig(n_atoms=64).lambda_d
10.0
>>> ModelConfig(lambda_z=-1)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig
lambda_z
  Input should be greater than or equal to 0 ...
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def fingerprint(self) -> str:
        """A short stable hash of the configuration, to name and reuse results."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


class ModelConfig(_Config):
    """Hyper-parameters of the structured auto-encoder (defaults: the thesis's).

    A weight of 0 removes its term from the objective: ``lambda_e = 0`` means no
    encoder is learned, ``lambda_g = 0`` that no graph is needed, ``lambda_d = 0``
    that the dictionary is not learned.
    """

    n_atoms: int = Field(128, ge=1, description="Number of atoms m of the dictionary.")
    lambda_d: float = Field(10.0, ge=0, description="Weight of the reconstruction term.")
    lambda_z: float = Field(1.0, ge=0, description="Weight of the l1 sparsity term.")
    lambda_g: float = Field(0.0, ge=0, description="Weight of the graph (Dirichlet) term.")
    lambda_e: float = Field(0.0, ge=0, description="Weight of the encoder term.")
    rtol: float = Field(1e-5, gt=0, lt=1, description="Outer stop: relative change of the objective.")
    inner_rtol: float | None = Field(
        None, gt=0, lt=1, description="Inner (FISTA) stop: relative change; None means rtol."
    )
    atol: float = Field(0.0, ge=0, description="Inner stop: absolute change of the sub-objective.")
    max_outer: int = Field(50, ge=1, description="Cap on outer (alternating) iterations.")
    max_inner: int = Field(500, ge=1, description="Cap on FISTA iterations per sub-problem.")
    dtype: Literal["float32", "float64"] = Field("float32", description="Floating point precision.")
    random_state: int | None = Field(None, ge=0, description="Seed of the initialisation.")

    @property
    def inner_tolerance(self) -> float:
        return self.rtol if self.inner_rtol is None else self.inner_rtol


class CQTConfig(_Config):
    """Audio loading and constant-Q transform (defaults: the thesis's)."""

    sample_rate: int = Field(22050, ge=1000, description="Audio is resampled to this rate (Hz).")
    clip_samples: int = Field(660000, ge=2048, description="Clips are truncated to this many samples.")
    pad_short: bool = Field(False, description="Zero-pad clips shorter than clip_samples instead of rejecting them.")
    hop_length: int = Field(1024, ge=32, description="CQT hop in samples, per frame set.")
    n_bins: int = Field(96, ge=1, description="Number of CQT bins.")
    bins_per_octave: int = Field(24, ge=1, description="CQT bins per octave.")
    fmin: float = Field(65.41, gt=0, description="Frequency of the lowest bin (Hz); 65.41 Hz is C2.")
    n_shifts: int = Field(
        2, ge=1, description="Interleaved frame sets, shifted by hop_length / n_shifts samples each."
    )

    @model_validator(mode="after")
    def _check(self) -> CQTConfig:
        if self.hop_length % self.n_shifts:
            raise ValueError(
                f"hop_length ({self.hop_length}) must be a multiple of n_shifts ({self.n_shifts})"
            )
        top = self.fmin * 2 ** ((self.n_bins - 1) / self.bins_per_octave)
        if top >= self.sample_rate / 2:
            raise ValueError(
                f"the highest CQT bin ({top:.0f} Hz) must lie below Nyquist ({self.sample_rate / 2:.0f} Hz): "
                "lower n_bins or fmin, or raise sample_rate"
            )
        return self


class PreprocessConfig(_Config):
    """Which frames the model sees and how they are scaled and perturbed.

    The graph, the model and the baseline classifier all read the same
    preprocessed frames (scaled, then optionally noisy), computed once.
    """

    frames_per_clip: int | None = Field(
        None, ge=1, description="Keep the first N frames of every clip (None: all). The thesis used 298 (2 x 149)."
    )
    labels: tuple[str, ...] | None = Field(None, description="Keep only these labels (None: all).")
    scaling: Literal["minmax", "standard", "none"] = Field(
        "minmax", description="Per-feature scaling over the dataset."
    )
    noise_std: float = Field(0.0, ge=0, description="Std of i.i.d. Gaussian noise added after scaling.")
    noise_seed: int = Field(0, ge=0, description="Seed of the noise.")


class GraphConfig(_Config):
    """kNN graph between frames and its Laplacian (defaults: the thesis's)."""

    n_neighbors: int = Field(10, ge=1, description="K, neighbours per frame (self excluded).")
    metric: Literal["euclidean", "cosine"] = Field("euclidean", description="Distance between frames.")
    kernel: Literal["exp", "gaussian"] = Field(
        "exp", description="exp: exp(-d/sigma) as the original code; gaussian: exp(-d^2/(2 sigma^2)) as the report."
    )
    sigma_factor: float = Field(1.0, gt=0, description="sigma = factor x mean distance to the K-th neighbour.")
    self_loops: bool = Field(True, description="Keep self-loops (weight 1).")
    laplacian: Literal["normalized", "combinatorial"] = Field("normalized", description="Laplacian kind.")
    method: Literal["approximate", "exact"] = Field(
        "approximate", description="pynndescent (approximate) or blocked brute force (exact)."
    )
    block_size: int = Field(50_000, ge=16, description="Frames per block of the blocked kNN.")
    recall_sample: int = Field(2000, ge=0, description="Queries used to measure recall against exact kNN.")
    random_state: int = Field(0, ge=0, description="Seed of the approximate search and of the recall sample.")
