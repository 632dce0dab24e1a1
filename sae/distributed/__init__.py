"""Distributed training of the structured auto-encoder on a Dask cluster.

The algorithm is :func:`sae.model.fit_sae`'s, run by the same outer loop
(:func:`sae.outer.alternate`): the frames ``X`` (N, n) are cut into row blocks
held by the workers, the Z step runs as block tasks (with the graph term one
global FISTA whose iterations are per-block tasks exchanging halo rows;
without it one task per block), and the D and E steps run on the client from
statistics reduced over blocks in block order.  Same objective, initialisation,
step sizes, stopping rules and history as in memory; the result does not depend
on the number of workers.

Modules, in the order they build on each other:

- `blocks`: row blocks, graph blocks of ``L`` (own and halo parts) and the halo
  plan, compact (CSR or dense) code blocks, per-block statistics and I/O;
- `kernel`: the compiled pass of one block iteration (tiles, named arguments);
- `memory`: the workers' array pool for dense iterates, and the sizes Dask
  counts for block states; `offload`: previous iterates in worker-local files
  (``offload_previous``); `budget`: what a training holds on each worker,
  checked against Dask's thresholds before and during the training;
- `order`: the frames grouped by k-means cluster into blocks (a smaller halo),
  and the moves of rows between the store's chunks and the blocks;
- `zstep`: the block problem and state, the block FISTA iteration task, the
  client's loop of the global FISTA and its stopping rules;
- `checkpoints`: the checkpoint slots of a ``model/<key>`` group;
- `trainer`: the outer loop's backend on a cluster (`ClusterBackend`),
  `fit_distributed`, the work-stealing pause;
- `stage`: the training stage in a store (`train_model`, `open_model`; its key is
  `sae.store.keys.model_key`).

Measured (``bench/bench_train.py``, GTZAN scale: 1,288,000 x 96, m = 512,
lambda_g = 100, 8 blocks, 15 outer x 20 inner iterations, 2 single-threaded
workers on 2 cores): 18 min 56 s, 3.21 s per FISTA iteration (38 % of the two
cores' float32 GEMM throughput), 10.25 GiB summed peak RSS (while the codes
are dense: per worker two generations of its blocks' iterates, the one being
written and the pool's spares); 1 -> 2 workers 1.81-1.95x.  What the systems
code earns, per FISTA iteration at full scale: the array pool 20-23 % of the
time against ``np.empty``; the work-stealing pause 5-8 % when the blocks do
not divide evenly among the workers (nothing when they do); ``offload_previous``
1.7 GiB (17 %) of memory for 13-20 % more time, where Dask's spilling saves
2.3 GiB for 2.7x the time.  (README, "Benchmarks".)

>>> block_bounds(10, 4)
[(0, 4), (4, 8), (8, 10)]
"""

from sae.distributed.blocks import LaplacianRef, block_bounds
from sae.distributed.checkpoints import checkpoint_arrays, ends_training, read_checkpoint
from sae.distributed.stage import open_model, train_model
from sae.distributed.trainer import DistributedFit, fit_distributed
from sae.distributed.zstep import Tuning

__all__ = [
    "train_model",
    "open_model",
    "LaplacianRef",
    "DistributedFit",
    "Tuning",
    "block_bounds",
    "fit_distributed",
    "read_checkpoint",
    "checkpoint_arrays",
    "ends_training",
]
