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

import copy
import hashlib
import inspect
import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: Any, handler: Any) -> dict[str, Any]:
        """The JSON schema (a parameter form's fields), described by the docstring's first paragraph only.

        A note on the defaults is left out: a form shows the values it starts from.

        >>> PipelineConfig.model_json_schema()["description"]
        'The whole pipeline: ingestion, preprocessing and graph, training, classification.'
        >>> GraphConfig.model_json_schema()["description"]
        'kNN graph between frames and its Laplacian.'
        """
        schema = handler(core_schema)
        target = handler.resolve_ref_schema(schema)
        summary = " ".join(inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0].split())
        target["description"] = re.sub(r"\s*\(defaults[^)]*\)", "", summary)
        return schema

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
        None, gt=0, lt=1,
        description="Inner stop: relative change (FISTA), or relative duality gap of every frame (cd Z step); "
        "None means rtol.",
    )
    dictionary_rtol: float | None = Field(
        None, gt=0, lt=1,
        description="Stop of the D and E steps: relative change of their objective (FISTA on the (m, m) and "
        "(m, n) statistics, milliseconds per iteration whatever the number of frames); None means the inner rtol.",
    )
    atol: float = Field(0.0, ge=0, description="Inner stop: absolute change of the sub-objective.")
    max_outer: int = Field(50, ge=1, description="Cap on outer (alternating) iterations.")
    max_inner: int = Field(
        500, ge=1, description="Cap on FISTA iterations per sub-problem (cd Z step: full sweeps per frame)."
    )
    fista_restart: bool = Field(
        True, description="Adaptive restart of FISTA's momentum (False: plain FISTA as the original code)."
    )
    balance_lambdas: bool = Field(
        False,
        description="After the first outer iteration, rescale lambda_d, lambda_g and lambda_e so that every "
        "weighted term equals lambda_z ||Z||_1, then train on with them.",
    )
    dtype: Literal["float32", "float64"] = Field("float32", description="Floating point precision.")
    random_state: int | None = Field(None, ge=0, description="Seed of the initialisation.")
    init: Literal["uniform", "frames"] = Field(
        "uniform",
        description="Initial dictionary: 'uniform' (the thesis: uniform on [0, 1), rows of unit norm) or 'frames' "
        "(m distinct non-zero training frames drawn at random, scaled to unit norm).",
    )
    z_solver: Literal["auto", "fista", "cd", "lars"] = Field(
        "auto",
        description="Z-step solver: 'cd' = coordinate descent per frame (needs lambda_g = 0; the inner rtol then "
        "bounds each frame's relative duality gap), 'lars' = each frame's lasso solved exactly by its homotopy "
        "path (needs lambda_g = 0; certified by the same gap; fastest at small lambda_z), 'fista' = FISTA on all "
        "codes, 'auto' = cd if lambda_g = 0 else fista.",
    )
    fit_method: Literal["alternating", "online"] = Field(
        "alternating",
        description="How the dictionary is learned: 'alternating' = the Z, D and E steps in turn over all frames "
        "(outer iterations), 'online' = online dictionary learning by mini-batches of batch_size frames (needs "
        "lambda_g = 0; max_outer then caps the epochs, rtol stops them on the change of the epoch's objective; "
        "z_solver='lars' codes the batches fastest).",
    )
    batch_size: int = Field(256, ge=1, description="Frames per mini-batch of the online fit.")
    z_stop: Literal["gap", "change"] = Field(
        "change",
        description="Z-step stop with FISTA: 'change' = relative change of the objective <= the inner rtol (the "
        "original rule), 'gap' = relative duality gap <= the inner rtol (certified accuracy, as the cd solver's "
        "per-frame gap; with a graph, tens of times more iterations).",
    )

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict[str, Any]:
        """The fields, without ``fit_method`` and ``batch_size`` for the alternating fit and without
        ``dictionary_rtol`` when it is None: the keys of every result computed before those fields existed
        (fingerprints of the configurations that hold a model) stay."""
        data = handler(self)
        if self.dictionary_rtol is None:
            data.pop("dictionary_rtol", None)
        if self.fit_method == "alternating":
            data.pop("fit_method", None)
            data.pop("batch_size", None)
        return data

    @property
    def inner_tolerance(self) -> float:
        return self.rtol if self.inner_rtol is None else self.inner_rtol

    @property
    def dictionary_tolerance(self) -> float:
        return self.inner_tolerance if self.dictionary_rtol is None else self.dictionary_rtol

    @property
    def z_step_method(self) -> Literal["fista", "cd", "lars"]:
        """The solver the Z step of a training with this configuration takes ("auto" resolved).

        >>> ModelConfig(lambda_g=100.0).z_step_method, ModelConfig(lambda_g=0.0).z_step_method
        ('fista', 'cd')
        """
        if self.z_solver == "auto":
            return "fista" if self.lambda_g > 0 else "cd"
        return self.z_solver

    @model_validator(mode="after")
    def _check_z_solver(self) -> ModelConfig:
        if self.z_solver in ("cd", "lars") and self.lambda_g > 0:
            raise ValueError(
                f"z_solver={self.z_solver!r} needs lambda_g = 0 (frames are then independent), got "
                f"lambda_g={self.lambda_g}: "
                "use z_solver='fista' or 'auto'"
            )
        if self.fit_method == "online" and self.lambda_g > 0:
            raise ValueError(
                f"fit_method='online' needs lambda_g = 0 (the graph term couples all frames), got "
                f"lambda_g={self.lambda_g}: use fit_method='alternating'"
            )
        if self.fit_method == "online" and self.balance_lambdas:
            raise ValueError("fit_method='online' does not balance the weights: set balance_lambdas=False")
        return self


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


class BuiltinDatasetConfig(_Config):
    """The built-in synthetic dataset (see `sae.datasets`): labelled clips in GTZAN layout."""

    n_genres: int = Field(5, ge=2, le=10, description="Number of synthetic genres (at most 10).")
    clips_per_genre: int = Field(20, ge=1, description="Clips generated per genre.")
    duration: float = Field(
        30.0, gt=0, description="Clip length in seconds; 30 s at 22050 Hz covers the default clip_samples."
    )
    sample_rate: int = Field(22050, ge=8000, description="Sample rate of the WAV files (Hz).")
    crossover: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Probability that a clip borrows each trait (timbre, rhythm, harmony, tempo) from another genre.",
    )
    seed: int = Field(0, ge=0, description="Seed: same seed, same bytes.")


class IngestConfig(_Config):
    """Ingestion: audio files (or the built-in dataset) to the frames of a store."""

    data: str | None = Field(
        None,
        description="GTZAN-style folder (root/label/file) or CSV manifest (columns path,label); "
        "None generates the built-in dataset into 'store-data' beside the store.",
    )
    store: str = Field("sae.zarr", min_length=1, description="Path of the Zarr store to create or resume.")
    cqt: CQTConfig = Field(default_factory=CQTConfig, description="Audio loading and CQT.")
    chunk_clips: int = Field(
        64, ge=1, description="Clips per frames chunk and per batch task (64 x 1288 x 96 float32 = 32 MB)."
    )
    strict: bool = Field(False, description="Fail the run (after writing everything) if any clip is in error.")
    retries: int = Field(2, ge=0, description="Retries of a batch task after an unexpected (I/O) failure.")
    overwrite: bool = Field(False, description="Replace an existing store instead of resuming it.")
    dataset: BuiltinDatasetConfig = Field(
        default_factory=BuiltinDatasetConfig, description="The built-in dataset, used when data is None."
    )

    @model_validator(mode="after")
    def _check(self) -> IngestConfig:
        if self.data is None and not self.cqt.pad_short:
            samples = round(self.dataset.duration * self.cqt.sample_rate)
            if samples < self.cqt.clip_samples:
                raise ValueError(
                    f"dataset.duration ({self.dataset.duration} s = {samples} samples at {self.cqt.sample_rate} Hz) "
                    f"must cover cqt.clip_samples ({self.cqt.clip_samples}); lengthen the clips, "
                    "lower clip_samples or set cqt.pad_short"
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
    compression: Literal["none", "log", "power"] = Field(
        "none",
        description="Compression of the CQT magnitudes of every frame: none (the thesis), log: log(1 + log_gain x), "
        "power: x ** power.",
    )
    log_gain: float = Field(10.0, gt=0, description="Gain of the 'log' compression, log(1 + log_gain x).")
    power: float = Field(0.5, gt=0, le=1, description="Exponent of the 'power' compression, x ** power.")
    contrast: Literal["none", "local"] = Field(
        "none",
        description="Local contrast normalisation of every frame across frequency: local = subtract the Gaussian-"
        "weighted mean of the neighbouring bins, divide by their Gaussian-weighted std (floored).",
    )
    contrast_width: float = Field(
        4.0, gt=0, description="Std (in bins) of the Gaussian window of the local contrast normalisation."
    )
    context: int = Field(
        1, ge=1, le=64,
        description="Temporal context: every row is the frame and the context - 1 frames before it "
        "(context_stride apart), concatenated: n_bins x context features.",
    )
    context_stride: int = Field(1, ge=1, description="Frames between two frames of a context.")
    scaling: Literal["minmax", "percentile", "standard", "none"] = Field(
        "minmax",
        description="Per-feature scaling over the dataset: minmax (the thesis), percentile (min-max between the "
        "p-th and (100-p)-th percentiles: one extreme clip cannot squeeze the others), standard, none.",
    )
    percentile: float = Field(
        1.0, gt=0, lt=50, description="p of the 'percentile' scaling, in percent (estimated on <= 100,000 rows)."
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
    method: Literal["approximate", "exact", "faiss"] = Field(
        "approximate",
        description="pynndescent (approximate), blocked brute force (exact) or one faiss HNSW index over all "
        "frames in one process (faiss, optional: pip install 'sae[faiss]').",
    )
    block_size: int = Field(50_000, ge=16, description="Frames per block of the blocked kNN.")
    n_neighbors_build: int = Field(
        30,
        ge=1,
        description="Approximate: neighbours of each block's pynndescent graph and of the cross-block "
        "queries (max(this, n_neighbors) is used); more is slower and more accurate.",
    )
    search_epsilon: float = Field(0.1, ge=0, description="Approximate: pynndescent query search width (epsilon).")
    hnsw_m: int = Field(16, ge=2, description="faiss: links per frame of the HNSW graph (M); memory N x 8 M bytes.")
    hnsw_ef_construction: int = Field(64, ge=1, description="faiss: candidate list width of the HNSW build.")
    hnsw_ef_search: int = Field(
        40, ge=1, description="faiss: candidate list width of the HNSW search (raised to n_neighbors + 1 if lower)."
    )
    recall_sample: int = Field(2000, ge=0, description="Queries used to measure recall against exact kNN.")
    random_state: int = Field(0, ge=0, description="Seed of the approximate search and of the recall sample.")


class TrainConfig(_Config):
    """Distributed training: the model's hyper-parameters plus how the work is split.

    ``model`` is the one :class:`ModelConfig` shared with the estimator; the
    other fields only say how :func:`sae.distributed.fit_distributed` runs it.

    >>> TrainConfig(model=ModelConfig(n_atoms=512), block_size=20_000).model.n_atoms
    512
    """

    model: ModelConfig = Field(default_factory=ModelConfig, description="The model's hyper-parameters.")
    block_size: int = Field(
        50_000, ge=1, description="Frames per block: the unit of parallel work and the chunk of the stored codes."
    )
    laplacian_norm: Literal["power", "bound"] = Field(
        "power",
        description="||L||_2 for the Z step's step size: 'power' = distributed power iteration (as the "
        "in-memory fit), 'bound' = Gershgorin bound max_i sum_j |L_ij| (an upper bound: smaller steps).",
    )
    lookahead: int = Field(
        2, ge=1, description="Z-step iterations submitted ahead of the stopping test (hides the round trip)."
    )
    offload_previous: bool = Field(
        False,
        description="Keep the previous FISTA iterate of dense code blocks (Z step with a graph) in files on the "
        "workers' local disks (direct I/O) instead of their memory: one generation of codes in memory instead of "
        "two, the same result, ~20% more time per iteration (2 workers, one disk). A training that does not fit "
        "otherwise takes it by itself (with lookahead 1) and says so.",
    )
    order: Literal["cluster", "stored"] = Field(
        "cluster",
        description="Order of the frames in the blocks of a graph training: 'cluster' groups them by k-means cluster "
        "of their features, so most kNN neighbours share a block (half the halo rows on a real graph of 1.29M "
        "frames); 'stored' keeps the store's order. Codes are stored in the store's order either way.",
    )
    memory_check: Literal["refuse", "warn"] = Field(
        "refuse",
        description="Before training, estimate what each worker will hold (halo plan, iterates, packs) and refuse "
        "when it exceeds what the worker can give before Dask spills or pauses; during training, stop as soon as "
        "a worker nears that threshold, spills or pauses. 'warn': log both and go on.",
    )
    checkpoint: bool = Field(True, description="Write a checkpoint to the store after every outer iteration.")


class ClassifyConfig(_Config):
    """Genre classification of per-frame features (defaults: the thesis's, but the protocol).

    Frames of a clip are aggregated into ``n_windows`` window vectors (plus as
    many shifted by half a window, `sae.pooling`), each classified on its own
    (`sae.classify`; the inductive protocol: `sae.inductive`).  ``protocol`` is how the vectors are split into training
    and test sets:

    - "thesis": ``ShuffleSplit(n_splits, test_size)`` over vectors, repeated
      ``n_repeats`` times, as published; vectors of one clip fall on both sides
      (a leak);
    - "grouped" (default): ``StratifiedGroupKFold(n_splits)`` with the clips as
      groups, repeated ``n_repeats`` times with different shuffles;
    - "inductive": the grouped folds, and in every fold the auto-encoder
      (``model``) and its graph (``graph``) are fitted on the training clips'
      frames only; then, for each of ``encode_methods``, the test clips are
      encoded as a model folder encodes new music (each on its own, by
      `sae.inference.encode_frames`) and classified by a classifier fitted on
      the training clips coded as that method codes new music
      (`sae.inference.classifier_codes`).

    >>> ClassifyConfig().n_windows, ClassifyConfig().classifier, ClassifyConfig().protocol
    (6, 'svc', 'grouped')
    >>> ClassifyConfig(protocol="inductive", encode_methods=("encoder",))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    pydantic_core._pydantic_core.ValidationError: 1 validation error for ClassifyConfig
      Value error, encode_methods contains 'encoder', which needs an encoder: model.lambda_e must be > 0, got 0.0 ...
    """

    n_windows: int = Field(6, ge=1, description="Windows per clip (the thesis's Nvectors).")
    window_frames: int | None = Field(
        None, ge=1, description="Frames per window; None: floor(F / (n_windows + 0.5)) for a clip of F frames."
    )
    shifted: bool = Field(True, description="Add a second set of windows shifted by half a window (2 x n_windows vectors).")
    pooling: tuple[Literal["sum_abs", "sum", "mean", "mean_abs", "std", "max", "max_abs", "mean_pos", "mean_neg"],
                   ...] = Field(
        ("sum_abs",), min_length=1,
        description="Statistics of a window's frames, concatenated (sae.pooling.POOLINGS): sum_abs = sum of "
        "|x| (the thesis), mean, std, max, ... ",
    )
    classifier: Literal["svc", "linear_svc", "logistic_regression", "ridge"] = Field(
        "svc", description="svc: SVC(kernel='linear') (libsvm, one-vs-one) as the thesis; the others are linear too."
    )
    C: float = Field(1.0, gt=0, description="Inverse regularisation strength of the classifier (ridge: alpha = 1/C).")
    C_grid: tuple[float, ...] = Field(
        (),
        description="If given, C is chosen per split among these values by an inner grouped 3-fold "
        "cross-validation on the training vectors only (nested CV); C is then unused.",
    )
    scaling: Literal["none", "minmax", "standard"] = Field(
        "none", description="Scaling of the window vectors, fitted on the training vectors of each split."
    )
    voting: bool = Field(False, description="Also classify whole clips by majority vote of their test vectors.")
    protocol: Literal["thesis", "grouped", "inductive"] = Field("grouped", description="Cross-validation protocol.")
    n_splits: int = Field(10, ge=2, description="Splits (folds) per repetition.")
    test_size: float = Field(0.1, gt=0, lt=1, description="Test share of each ShuffleSplit split (protocol 'thesis').")
    n_repeats: int = Field(20, ge=1, description="Repetitions of the cross-validation, each with its own shuffle.")
    random_state: int = Field(0, ge=0, description="Seed of the splits (and of the randomised classifiers).")
    chunk_clips: int = Field(64, ge=1, description="Clips aggregated per read when streaming frames.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Auto-encoder fitted per fold ('inductive').")
    graph: GraphConfig = Field(
        default_factory=lambda: GraphConfig(method="exact"),
        description="Graph of the training frames per fold ('inductive', lambda_g > 0); exact_graph joins the test "
        "frames to it.",
    )
    encode_methods: tuple[Literal["exact", "encoder", "exact_graph"], ...] = Field(
        ("exact",), min_length=1,
        description="How test clips are encoded ('inductive'), as by a model folder (sae.inference.METHODS): the Z step "
        "without graph term, the direct encoder, the Z step with the new frames joined to the training graph.",
    )

    @model_validator(mode="after")
    def _check(self) -> ClassifyConfig:
        if "encoder" in self.encode_methods and self.model.lambda_e <= 0:
            raise ValueError(
                "encode_methods contains 'encoder', which needs an encoder: model.lambda_e must be > 0, "
                f"got {self.model.lambda_e}"
            )
        if "exact_graph" in self.encode_methods and self.model.lambda_g <= 0:
            raise ValueError(
                "encode_methods contains 'exact_graph', which needs a graph term: model.lambda_g must be > 0, "
                f"got {self.model.lambda_g}"
            )
        if len(set(self.encode_methods)) != len(self.encode_methods):
            raise ValueError(f"encode_methods must not repeat a method, got {self.encode_methods}")
        if any(not c > 0 for c in self.C_grid):
            raise ValueError(f"C_grid must hold values > 0, got {self.C_grid}")
        return self


PRESETS: dict[str, dict[str, dict]] = {
    "default": {
        "preprocess": {"compression": "log"},
        "train": {
            "model": {"n_atoms": 512, "lambda_z": 0.03, "lambda_g": 100.0, "rtol": 1e-3, "max_outer": 10,
                      "random_state": 0},
        },
        "classify": {
            "classifier": "ridge", "scaling": "standard", "pooling": ("mean", "std", "max"),
            "C_grid": (0.001, 0.01, 0.1, 1.0), "n_repeats": 5,
        },
    },
    "thesis": {
        "preprocess": {"frames_per_clip": 298},
        "train": {
            "model": {"n_atoms": 128, "lambda_d": 10.0, "lambda_z": 1.0, "lambda_g": 100.0, "lambda_e": 0.0,
                      "rtol": 1e-5, "max_inner": 500, "max_outer": 50, "fista_restart": False, "z_solver": "fista",
                      "z_stop": "change", "random_state": 0},
            "laplacian_norm": "power",
        },
        "classify": {"protocol": "thesis", "classifier": "svc", "C": 1.0, "pooling": ("sum_abs",),
                     "scaling": "none", "n_splits": 10, "test_size": 0.1, "n_repeats": 20},
    },
}
"""Named recipes (``PipelineConfig.preset``), merged under whatever is given.

"default" is the best recipe measured (README, "What each option does"): log-compressed CQT,
512 atoms (the thesis's size for its full-dataset runs; on the built-in data 10 and 6 points
above 64 and 128 atoms), lambda_z = 0.03 (nearly dense codes: on the development set's whole clips
3.2 points above lambda_z = 1; the built-in dataset's sizing puts back lambda_z = 1, its best),
rtol = 1e-3 and at most 10 outer iterations (the tolerance of every measurement on real music;
on the built-in data a tighter one lowered the accuracy), pooling of every window by mean,
std and max, standardised vectors and a ridge classifier
whose C is chosen by nested grouped cross-validation (10 folds x 5 repeats); the same preprocessing, pooling and
classifier serve the baseline, so that the gap measures what the auto-encoder learns.
"thesis" reproduces the 2015 settings (REFERENCE: magnitude CQT, min-max scaling, the first 298
frames, m = 128, lambda_d = 10, lambda_z = 1, lambda_g = 100, plain FISTA to rtol 1e-5, sum of
|z| per window, linear SVC, ShuffleSplit over vectors repeated 20 times: its leaky protocol)."""

BUILTIN_SIZING: dict[str, dict] = {
    "ingest": {"dataset": {"clips_per_genre": 20, "duration": 10.0}, "cqt": {"clip_samples": 220500}},
    "preprocess": {"frames_per_clip": 298},
    "graph": {"method": "exact", "block_size": 8192},
    "train": {"model": {"lambda_z": 1.0, "rtol": 1e-3, "max_outer": 10}, "laplacian_norm": "bound"},
    "classify": {"n_repeats": 5},
}
"""The sizing of a run on the built-in dataset (``ingest.data`` None), merged over the preset,
so that the default run takes minutes on a laptop: 5 genres x 20 clips of 10 s, the first 298
frames of each (as the thesis), an exact kNN graph (no compilation at this size),
the Gershgorin bound of ||L||_2 (no power iteration), rtol = 1e-3 and at most 10 outer
iterations, 5 x 10 grouped folds; and lambda_z = 1, which is the best measured on it (80.4 %
against 74.4 % at 0.1 and 73.5 % at 0.03), where real music wants 0.03.  A user's data gets
none of it: every clip whole, the preset's model and folds."""


def preset_values(preset: str, builtin: bool) -> dict[str, dict]:
    """The values a preset sets, with the built-in dataset's sizing over them when ``builtin``.

    >>> preset_values("default", builtin=False)["preprocess"]
    {'compression': 'log'}
    >>> preset_values("thesis", builtin=True)["train"]["model"]["n_atoms"]
    128
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    return copy.deepcopy(_merged(PRESETS[preset], BUILTIN_SIZING) if builtin else PRESETS[preset])


def _trained_model_by_default(values: dict) -> dict:
    """``values`` with ``classify.model`` set to ``train.model`` when the classify section gives none.

    The inductive protocol then fits, per fold, the model the pipeline trains on all clips.
    """
    classify, train = values.get("classify"), values.get("train", {})
    if not isinstance(classify, dict) or "model" in classify:
        return values
    model = train.model if isinstance(train, TrainConfig) else train.get("model", {}) if isinstance(train, dict) else None
    if model is None:
        return values
    return {**values, "classify": {**classify, "model": model}}


def _merged(defaults: dict, given: dict) -> dict:
    """``given`` merged over ``defaults``, recursively for nested mappings."""
    out = dict(defaults)
    for key, value in given.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


PIPELINE_DEFAULTS: dict[str, dict] = preset_values("default", builtin=True)
"""What ``sae run`` uses when nothing is given: the default preset on the built-in dataset."""


class PipelineConfig(_Config):
    """The whole pipeline: ingestion, preprocessing and graph, training, classification.

    Each section is the configuration of one stage (the models above); defaults
    are the stages' own but for the ``preset`` (`PRESETS`) and, on the built-in
    dataset (``ingest.data`` None), its sizing (`BUILTIN_SIZING`), merged under
    whatever is given; ``classify.model`` (the model the inductive protocol fits
    per fold) is ``train.model`` unless the classify section names one.
    ``cluster`` is the address of a Dask scheduler the stages run their tasks
    on (None: the environment variable ``SAE_DASK_ADDRESS`` if set, else local
    threads; "local": local threads whatever the environment says).

    >>> config = PipelineConfig(train={"model": {"n_atoms": 32}})
    >>> config.train.model.n_atoms, config.train.model.lambda_g, config.train.model.lambda_d
    (32, 100.0, 10.0)
    >>> config.classify.model == config.train.model
    True
    >>> PipelineConfig(preset="thesis").classify.protocol
    'thesis'
    >>> import tempfile
    >>> PipelineConfig(ingest={"data": tempfile.gettempdir()}).preprocess.frames_per_clip is None  # clips whole
    True
    >>> PipelineConfig(cluster="8786")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    pydantic_core._pydantic_core.ValidationError: 1 validation error for PipelineConfig
    cluster
      Value error, cluster must be 'local' or a Dask scheduler address such as 'tcp://127.0.0.1:8786', got '8786' ...
    """

    ingest: IngestConfig = Field(default_factory=IngestConfig, description="Ingestion: data, store, CQT.")
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig, description="Frames, scaling, noise.")
    graph: GraphConfig = Field(default_factory=GraphConfig, description="kNN graph and Laplacian.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="The auto-encoder and its training.")
    classify: ClassifyConfig = Field(default_factory=ClassifyConfig, description="Genre classification.")
    cluster: str | None = Field(
        None,
        description="Dask scheduler address (e.g. tcp://127.0.0.1:8786) the stages run on; None: "
        "$SAE_DASK_ADDRESS if set, else local threads; 'local': local threads.",
    )
    force: bool = Field(False, description="Recompute every stage: the store is created anew.")
    preset: Literal["default", "thesis"] = Field(
        "default",
        description="Recipe the sections start from: 'default' (the best measured) or 'thesis' (the 2015 "
        "settings and protocol); on the built-in dataset its sizing comes on top.",
    )

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, values: object) -> object:
        if not isinstance(values, dict):
            return values
        out = dict(values)
        ingest = out.get("ingest", {})
        builtin = (ingest.get("data") if isinstance(ingest, dict) else getattr(ingest, "data", None)) is None
        preset = out.get("preset", "default")
        if preset not in PRESETS:
            return out  # the field's own validation names the allowed values
        for section, defaults in preset_values(preset, builtin).items():
            given = out.get(section, {})
            if isinstance(given, dict):
                out[section] = _merged(defaults, given)
        return _trained_model_by_default(out)

    @field_validator("cluster")
    @classmethod
    def _check_cluster(cls, cluster: str | None) -> str | None:
        if cluster is not None and cluster != "local" and "://" not in cluster:
            raise ValueError(
                "cluster must be 'local' or a Dask scheduler address such as 'tcp://127.0.0.1:8786', "
                f"got {cluster!r}"
            )
        return cluster

    @model_validator(mode="after")
    def _check(self) -> PipelineConfig:
        import os

        data = self.ingest.data
        if data is not None and not os.path.exists(data):
            raise ValueError(
                f"ingest.data must be an existing GTZAN-style folder or CSV manifest, got {data!r} (no such path)"
            )
        return self
