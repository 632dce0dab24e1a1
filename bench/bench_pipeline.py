"""Benchmark of the whole pipeline, stage by stage, up to GTZAN scale (1,000 clips of 30 s, 1,288,000 frames).

Runs the pipeline the way ``sae run --data <audio> --cluster <address>`` does
(`flows.pipeline`'s stage functions, each stage a Prefect flow whose tasks run
on a Dask cluster of single-threaded workers started by ``deploy/cluster.py``
on 127.0.0.1), with 1 and with 2 workers, on the built-in dataset generated at
GTZAN's size (`sae.datasets.make_builtin_dataset`: 10 genres x 100 clips of
30 s, passed as the user's audio folder, so that no built-in sizing applies:
every clip whole, 1288 frames each).  The stages:

- ingest: CQT of every clip into the frames of the store;
- preprocess: log compression and min-max scaling (the graph stage's first task);
- graph: the kNN graph and its Laplacian (the graph stage's second task; the two
  are told apart by the creation time of ``graph/<key>``, to the second);
- train: the structured auto-encoder (default: m = 512 atoms, lambda_g = 100,
  the thesis's schedule: rtol = 1e-5, up to 50 outer and 500 inner iterations);
- classify: cross-validated classification of the baseline and of the codes
  (the default preset's recipe).

Per stage it prints the wall time, the CPU share (CPU seconds of every process
/ wall time / cores), the peak resident memory summed over every process at
one sample (client, Prefect's temporary server, Dask scheduler, nannies and
workers; psutil every 0.2 s; `_timing.PeakMemory`) and the sum of each
process's peak, and frames per second; and the whole run's totals.  "idle" is
the memory of these processes before the first stage.  One cluster per number
of workers serves every size and repeat; it first runs the pipeline on 4 clips
of 10 s (the warm-up, timed apart), so that the measured stages do not include
the workers' compilation of numba kernels (pynndescent's are compiled in every
new process: ~1 min), a fixed cost per cluster.

``--store DIR`` keeps the generated audio (``DIR/audio-<hash>``) and the first
ingestion of it (``DIR/frames-<key>.zarr``) for the next runs with the same
parameters; every measured run works on a fresh store (``DIR/runs/...``, a
copy of those frames when ingest is not among ``--stages``), deleted after it
unless ``--keep``.  ``--scaling 50000,200000`` runs every stage at several
numbers of frames (clips per genre chosen accordingly), prints one markdown
table, the growth exponent of each stage's time between consecutive sizes and
its extrapolation to ``--target-frames``, and draws time and memory against N
(``--figure``).

    python bench/bench_pipeline.py --n-genres 2 --clips-per-genre 2 --duration 10 --n-atoms 32 \\
        --max-outer 2 --set classify.n_splits=2 --set classify.n_repeats=1      # tiny
    python bench/bench_pipeline.py --scaling 51520,128800 --rtol 1e-3 --max-outer 10 --store DIR
    python bench/bench_pipeline.py --store DIR                   # GTZAN scale, thesis tolerance: ~2 h
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from _timing import PeakMemory, Usage
from flows import pipeline
from flows._server import prefect_api
from flows._cli_config import apply_override
from sae import store as sae_store
from sae.audio import frames_per_clip
from sae.config import BuiltinDatasetConfig, CQTConfig, PipelineConfig
from sae.distributed import open_model
from sae.store import keys

STAGES = ("ingest", "preprocess", "graph", "train", "classify")
"""Measured stages; preprocess and graph are the two tasks of the pipeline's graph stage."""

CLUSTER_SCRIPT = Path(__file__).resolve().parent.parent / "deploy" / "cluster.py"
GTZAN_BATCHES = 16
"""Ingest batches of GTZAN with the default chunk_clips = 64: the automatic chunk keeps that many at any size."""


# --------------------------------------------------------------------------- the cluster


class Cluster:
    """A Dask scheduler and ``n_workers`` single-threaded workers started by ``deploy/cluster.py`` on 127.0.0.1."""

    def __init__(self, state: Path, n_workers: int, memory_limit: str) -> None:
        self.state = state
        self.n_workers = n_workers
        self.memory_limit = memory_limit
        self.address = ""

    def _command(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(CLUSTER_SCRIPT), *args, "--state", str(self.state)],
                              check=True, capture_output=True, text=True)

    def pids(self) -> list[int]:
        """The services' pids (their trees hold the nannies' worker processes)."""
        found = []
        for path in (self.state / "pids").glob("*.pid"):
            try:
                found.append(int(path.read_text()))
            except (OSError, ValueError):
                continue
        return found

    def __enter__(self) -> Cluster:
        self._command("start", "--no-prefect", "--workers", str(self.n_workers), "--threads", "1",
                      "--ports", "auto", "--memory-limit", self.memory_limit)
        self.address = json.loads((self.state / "ports.json").read_text())["dask_address"]
        return self

    def __exit__(self, *exc) -> None:
        self._command("stop")


# --------------------------------------------------------------------------- data and configuration


def dataset_config(args: argparse.Namespace, clips_per_genre: int) -> BuiltinDatasetConfig:
    return BuiltinDatasetConfig(n_genres=args.n_genres, clips_per_genre=clips_per_genre, duration=args.duration)


def audio_folder(root: Path, dataset: BuiltinDatasetConfig) -> Path:
    """The built-in dataset's WAV files, generated once per configuration under ``root``."""
    from sae.datasets import make_builtin_dataset

    folder = root / f"audio-{dataset.fingerprint()}"
    make_builtin_dataset(folder, dataset)  # reuses files already written with this configuration
    return folder


def pipeline_config(args: argparse.Namespace, data: Path, store: Path, address: str, n_clips: int) -> PipelineConfig:
    """The pipeline's configuration for one run: the user's data path, so the default preset without built-in sizing."""
    sample_rate = CQTConfig().sample_rate
    clip_samples = min(CQTConfig().clip_samples, int(args.duration * sample_rate))
    n_frames = n_clips * frames_per_clip(CQTConfig(clip_samples=clip_samples))
    chunk_clips = args.chunk_clips or min(64, max(1, math.ceil(n_clips / GTZAN_BATCHES)))
    block_size = args.block_size or min(50_000, math.ceil(n_frames / 8))
    values: dict[str, Any] = {
        "preset": args.preset,
        "cluster": address,
        "ingest": {"data": str(data), "store": str(store), "chunk_clips": chunk_clips,
                   "cqt": {"clip_samples": clip_samples}},
        "train": {"block_size": block_size,
                  "model": {"n_atoms": args.n_atoms, "rtol": args.rtol, "max_outer": args.max_outer,
                            "max_inner": args.max_inner, "random_state": 0}},
    }
    for assignment in args.set:
        apply_override(values, assignment)
    return pipeline.resolve_paths(PipelineConfig.model_validate(values))


def reference_frames(root: Path, config: PipelineConfig) -> Path:
    """Where the first ingestion of this configuration's clips is kept for the next runs."""
    return root / f"frames-{keys.ingest_key(config.ingest)}.zarr"


def copy_store(source: Path, target: Path) -> None:
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)


def remove_store(store: Path) -> None:
    """A store and what the pipeline writes beside it (reports, model folder, lock)."""
    for path in (store, *store.parent.glob(f"{store.name}-*"), keys.lock_path(store)):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- one run


def preprocess_completed(store: str, key: str) -> float:
    """When ``preprocess/<key>`` was completed (epoch seconds, to the second): the graph task starts then."""
    completed = sae_store.stage_group(store, keys.PREPROCESS, key, mode="r").attrs["completed"]
    return datetime.fromisoformat(completed).timestamp()


def train_detail(store: str, key: str) -> str:
    model = open_model(store, key)
    records = model["history"][1:]
    inner = sum(record["inner_codes"] for record in records)
    last = records[-1]
    return (f"{len(records)} outer, {inner} Z-step iterations, stop {model['stop_reason']}, "
            f"objective {last['total']:.6g}, non-zeros {last['sparsity_percent']:.1f}%")


def run_stages(config: PipelineConfig, address: str, stages: set[str],
               reference: Path | None) -> tuple[dict[str, tuple[float, float]], dict[str, str]]:
    """Every stage of the pipeline on ``config``'s store; returns each measured stage's (start, stop) and details."""
    store, stage_keys = config.ingest.store, keys.stage_keys(config)
    marks: dict[str, tuple[float, float]] = {}
    details: dict[str, str] = {}
    if "ingest" in stages:
        tic = time.perf_counter()
        summary = pipeline.run_ingest_stage(config, address)
        marks["ingest"] = (tic, time.perf_counter())
        details["ingest"] = f"{summary['counts']}, {config.ingest.chunk_clips} clips per batch"
        if reference is not None and not reference.exists():
            copy_store(Path(store), reference)
    tic, wall = time.perf_counter(), time.time()
    out = pipeline.run_graph_stage(config, address)
    toc = time.perf_counter()
    split = min(max(tic + preprocess_completed(store, stage_keys["preprocess"]) - wall, tic), toc)
    marks["preprocess"], marks["graph"] = (tic, split), (split, toc)
    graph = out.get("graph", {})
    details["graph"] = f"{config.graph.method}, nnz(L) = {graph.get('nnz')}, recall {graph.get('recall')}"
    tic = time.perf_counter()
    pipeline.run_train_stage(config, address)
    marks["train"] = (tic, time.perf_counter())
    details["train"] = train_detail(store, stage_keys["model"])
    tic = time.perf_counter()
    out = pipeline.run_classify_stage(config, address)
    marks["classify"] = (tic, time.perf_counter())
    details["classify"] = ", ".join(f"{feature} {100 * row['accuracy_mean']:.1f}%"
                                    for feature, row in out["results"].items())
    return marks, details


def warm_up(args: argparse.Namespace, root: Path, cluster: Cluster) -> float:
    """The whole pipeline on 4 clips of 10 s on a fresh cluster, so that the workers compile (or load) their
    numba kernels (pynndescent's, the training's) before the measured runs; returns its wall time.  Blocks of
    256 frames for the kNN graph, so that every worker builds one and compiles."""
    tiny = argparse.Namespace(**{**vars(args), "n_genres": 2, "duration": 10.0, "chunk_clips": 0, "block_size": 0,
                                 "max_outer": 1, "set": [*args.set, "classify.n_splits=2", "classify.n_repeats=1",
                                                         "graph.block_size=256"]})
    data = audio_folder(root, dataset_config(tiny, 2))
    store = root / "runs" / f"warm-up-w{cluster.n_workers}.zarr"
    remove_store(store)
    tic = time.perf_counter()
    config = pipeline_config(tiny, data, store, cluster.address, 4)
    run_stages(config, cluster.address, {"ingest"}, None)
    remove_store(store)
    return time.perf_counter() - tic


def run_once(args: argparse.Namespace, root: Path, data: Path, n_clips: int, cluster: Cluster, name: str,
             stages: set[str]) -> dict[str, Any]:
    """Every stage of the pipeline on a fresh store, on ``cluster``; returns the measures."""
    store = root / "runs" / f"{name}.zarr"
    remove_store(store)
    store.parent.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    config = pipeline_config(args, data, store, cluster.address, n_clips)
    reference = reference_frames(root, config)
    if "ingest" not in stages:
        if not reference.exists():
            print(f"  ingesting {n_clips} clips once into {reference} (not measured)", flush=True)
            pipeline.run_ingest_stage(config.model_copy(update={"ingest": config.ingest.model_copy(
                update={"store": str(reference)})}), cluster.address)
        copy_store(reference, store)
    pipeline.preflight("run", config)
    with PeakMemory(cluster.pids) as memory:
        time.sleep(1.0)
        idle = memory.usage(memory.samples[0][0], time.perf_counter())
        marks, details = run_stages(config, cluster.address, stages, reference)
    n_frames = n_clips * frames_per_clip(config.ingest.cqt)
    if not args.keep:
        remove_store(store)
    rows = {stage: measured(memory.usage(*marks[stage]), cores, n_frames) for stage in STAGES if stage in marks}
    total = memory.usage(min(mark[0] for mark in marks.values()), max(mark[1] for mark in marks.values()))
    rows["total"] = measured(Usage(sum(row["seconds"] for row in rows.values()), total.cpu_seconds,
                                   total.peak_total, total.sum_of_peaks), cores, n_frames)
    rows["idle"] = measured(idle, cores, n_frames)
    return {"n_frames": n_frames, "n_clips": n_clips, "workers": cluster.n_workers, "rows": rows,
            "details": details, "load": os.getloadavg()}


def measured(usage: Usage, cores: int, n_frames: int) -> dict[str, float]:
    return {"seconds": usage.seconds, "cpu_share": usage.cpu_share(cores), "peak": usage.peak_total,
            "sum_of_peaks": usage.sum_of_peaks, "frames_per_second": n_frames / usage.seconds}


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The runs' measures, median per stage and field."""
    rows = {}
    for stage in runs[0]["rows"]:
        rows[stage] = {field: statistics.median(run["rows"][stage][field] for run in runs)
                       for field in runs[0]["rows"][stage]}
    return {**runs[-1], "rows": rows, "repeats": len(runs)}


# --------------------------------------------------------------------------- output


def gib(value: float) -> str:
    return f"{value / 2**30:.2f} GiB"


def duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 600 else f"{seconds / 60:.1f} min"


def table(results: list[dict[str, Any]]) -> str:
    """One markdown table: a row per size, number of workers and stage."""
    lines = ["| N | workers | stage | wall | CPU share | peak (all processes) | sum of process peaks | frames/s |",
             "|---|---|---|---|---|---|---|---|"]
    for result in results:
        for stage, row in result["rows"].items():
            frames = "" if stage == "idle" else f"{row['frames_per_second']:,.0f}"
            wall = "" if stage == "idle" else duration(row["seconds"])
            share = "" if stage == "idle" else f"{100 * row['cpu_share']:.0f}%"
            lines.append(f"| {result['n_frames']:,} | {result['workers']} | {stage} | {wall} | {share} "
                         f"| {gib(row['peak'])} | {gib(row['sum_of_peaks'])} | {frames} |")
    return "\n".join(lines)


def extrapolation(results: list[dict[str, Any]], target: int) -> str:
    """Each stage's time and memory at ``target`` frames, from its two largest sizes.

    Time grows as N^b with b = log(t2 / t1) / log(N2 / N1) (the exponent measured
    between them); memory linearly through the two points.
    """
    lines = [f"| workers | stage | growth exponent of the time | time at {target:,} | peak at {target:,} |",
             "|---|---|---|---|---|"]
    for workers in sorted({result["workers"] for result in results}):
        sizes = sorted((r for r in results if r["workers"] == workers), key=lambda r: r["n_frames"])
        if len(sizes) < 2:
            continue
        small, large = sizes[-2], sizes[-1]
        ratio = large["n_frames"] / small["n_frames"]
        for stage in [*STAGES, "total"]:
            if stage not in large["rows"] or stage == "total":
                continue
            a, b = small["rows"][stage], large["rows"][stage]
            exponent = math.log(b["seconds"] / a["seconds"]) / math.log(ratio)
            seconds = b["seconds"] * (target / large["n_frames"]) ** exponent
            slope = (b["peak"] - a["peak"]) / (large["n_frames"] - small["n_frames"])
            peak = b["peak"] + slope * (target - large["n_frames"])
            lines.append(f"| {workers} | {stage} | {exponent:.2f} | {duration(seconds)} | {gib(peak)} |")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: str) -> None:
    """Time and peak memory of each stage against N (log-log), a line per stage and number of workers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {1: "--", 2: "-"}
    for index, stage in enumerate([*STAGES, "total"]):
        for workers in sorted({result["workers"] for result in results}):
            points = sorted((r["n_frames"], r["rows"][stage]) for r in results
                            if r["workers"] == workers and stage in r["rows"])
            if not points:
                continue
            n = [p[0] for p in points]
            label = f"{stage}, {workers} worker{'s' if workers > 1 else ''}"
            kwargs = {"color": f"C{index}", "linestyle": styles.get(workers, ":"), "marker": "o", "label": label}
            left.plot(n, [p[1]["seconds"] for p in points], **kwargs)
            right.plot(n, [p[1]["peak"] / 2**30 for p in points], **kwargs)
    left.set(xscale="log", yscale="log", xlabel="frames N", ylabel="wall time (s)", title="time per stage")
    right.set(xscale="log", xlabel="frames N", ylabel="peak RSS, all processes (GiB)", title="memory per stage")
    right.legend(fontsize=7, ncol=2)
    for axis in (left, right):
        axis.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"figure: {path}")


# --------------------------------------------------------------------------- main


def main() -> None:
    # a kill (SIGTERM) unwinds like Ctrl-C, so every cluster this run started is stopped on the way out
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-genres", type=int, default=10)
    parser.add_argument("--clips-per-genre", type=int, default=100)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per clip")
    parser.add_argument("--workers", default="1,2", help="numbers of Dask workers, comma-separated")
    parser.add_argument("--n-atoms", type=int, default=512)
    parser.add_argument("--rtol", type=float, default=1e-5, help="outer (and inner) stop; the thesis's: 1e-5")
    parser.add_argument("--max-outer", type=int, default=50, help="the thesis's: 50")
    parser.add_argument("--max-inner", type=int, default=500, help="the thesis's: 500")
    parser.add_argument("--preset", default="default", choices=("default", "thesis"))
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override of the pipeline's configuration, as `sae run --set`")
    parser.add_argument("--chunk-clips", type=int, default=0,
                        help=f"clips per ingest batch (default: min(64, clips / {GTZAN_BATCHES}), GTZAN's batches)")
    parser.add_argument("--block-size", type=int, default=0,
                        help="training frames per block (default: min(50,000, N/8))")
    parser.add_argument("--stages", default="ingest,graph,train,classify",
                        help="measured stages; without ingest, the frames come from the kept first ingestion")
    parser.add_argument("--memory-limit", default="auto", help="per Dask worker")
    parser.add_argument("--store", default=None, help="folder for audio, frames and run stores (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep every run's store")
    parser.add_argument("--repeats", type=int, default=1, help="runs per size and number of workers (medians)")
    parser.add_argument("--scaling", default="", help="numbers of frames, comma-separated, e.g. 50000,200000")
    parser.add_argument("--target-frames", type=int, default=1_288_000, help="extrapolation target of --scaling")
    parser.add_argument("--figure", default="", help="PNG of time and memory against N (--scaling)")
    parser.add_argument("--no-warm-up", action="store_true",
                        help="measure the first runs with the workers' compilation (numba) in them")
    parser.add_argument("--json", default="", help="write every run's measures to this file")
    args = parser.parse_args()

    root = Path(args.store or tempfile.mkdtemp(prefix="bench_pipeline_")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    workers = [int(value) for value in args.workers.split(",")]
    stages = set(args.stages.split(","))
    clip_frames = frames_per_clip(CQTConfig(clip_samples=min(CQTConfig().clip_samples,
                                                             int(args.duration * CQTConfig().sample_rate))))
    sizes = ([max(1, round(int(n) / (args.n_genres * clip_frames))) for n in args.scaling.split(",")]
             if args.scaling else [args.clips_per_genre])
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} "
          f"{os.getloadavg()[2]:.2f}; folder {root}", flush=True)
    logging.getLogger("distributed").setLevel(logging.WARNING)
    pipeline.show_library_logs()
    datasets = {}
    for clips_per_genre in sizes:
        tic = time.perf_counter()
        datasets[clips_per_genre] = audio_folder(root, dataset_config(args, clips_per_genre))
        print(f"audio of {args.n_genres * clips_per_genre} clips of {args.duration:g} s: "
              f"{datasets[clips_per_genre]} ({time.perf_counter() - tic:.1f} s to generate or find)", flush=True)
    runs_by_size: dict[tuple[int, int], list[dict[str, Any]]] = {}
    with prefect_api():
        for n_workers in workers:
            with Cluster(root / "runs" / f"cluster-w{n_workers}", n_workers, args.memory_limit) as cluster:
                if not args.no_warm_up:
                    print(f"\n{n_workers} worker(s): warm-up (4 clips, numba kernels compiled or loaded): "
                          f"{warm_up(args, root, cluster):.1f} s", flush=True)
                for clips_per_genre in sizes:
                    n_clips = args.n_genres * clips_per_genre
                    for repeat in range(args.repeats):
                        name = f"n{n_clips}-w{n_workers}-r{repeat}"
                        run = run_once(args, root, datasets[clips_per_genre], n_clips, cluster, name, stages)
                        runs_by_size.setdefault((n_clips, n_workers), []).append(run)
                        print(f"\n{n_clips} clips, {n_workers} worker(s), run {repeat + 1} of {args.repeats}, "
                              f"load average after {run['load'][0]:.2f} {run['load'][1]:.2f} {run['load'][2]:.2f}:")
                        for stage, detail in run["details"].items():
                            print(f"  {stage}: {detail}")
                        print(table([run]), flush=True)
    results = [medians(runs) for _, runs in sorted(runs_by_size.items())]
    runs_json = [run for runs in runs_by_size.values() for run in runs]
    print(f"\n== medians of {args.repeats} run(s); load average at the end {os.getloadavg()[0]:.2f} "
          f"{os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} ==\n")
    print(table(results))
    if len(sizes) > 1:
        print(f"\nextrapolation to {args.target_frames:,} frames (time: power law of the two largest sizes; "
              "memory: linear through them):\n")
        print(extrapolation(results, args.target_frames))
        if args.figure:
            plot(results, args.figure)
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs_json, "medians": results}, indent=1, default=str))


if __name__ == "__main__":
    main()
