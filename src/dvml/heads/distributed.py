"""Multi-process plumbing for ``dvml finetune``: torchrun set-up, a distributed class-balanced batch sampler
and an all-gather that keeps gradients.

How a multi-GPU run is laid out (``torchrun --standalone --nproc_per_node=N --no-python dvml finetune ...``):

* torchrun starts N processes and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
  ``MASTER_PORT``. :func:`init_distributed` reads them and joins the process group: **NCCL** when the
  process has a CUDA device (one GPU per process, ``cuda:LOCAL_RANK``), **gloo** on CPU. Without those
  variables it returns a single-process context and no process group is created.
* Every rank builds the *same* global class-balanced batch order from the same seed
  (:class:`DistributedClassBalancedSampler`) and takes a disjoint contiguous shard of each global batch;
  the shards of one step together are exactly the batch a single process would have drawn.
* The metric loss sees the gathered batch: :func:`gather_with_grad` concatenates every rank's embeddings
  (``torch.distributed.nn.functional.all_gather``, whose backward sums the gradients that flow to each
  rank's slice). Every rank computes the same loss on the same gathered batch, so each rank's local
  gradient is ``world_size`` times its share of the full-batch gradient and DistributedDataParallel's
  gradient *average* over ranks gives back exactly the single-process full-batch gradient (tested).

Everything here degrades to a no-op in a single process, so the training loop has one code path.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from dvml.errors import DvmlError

log = logging.getLogger(__name__)

#: Environment variables torchrun sets in every process it starts.
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in a (possibly single-process) run.

    Attributes:
        rank: global rank, 0 .. world_size - 1.
        world_size: number of processes (1 without torchrun).
        local_rank: rank on this machine (selects the GPU).
        device: the device this process trains on.
        backend: "nccl" or "gloo" when a process group was created by :func:`init_distributed`, else None.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0 writes files, logs at INFO and drives the progress bar."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    """True when the process environment carries torchrun's rank variables."""
    return all(k in os.environ for k in TORCHRUN_ENV)


def env_rank() -> int:
    """This process's rank from the environment (0 outside torchrun); usable before any set-up."""
    return int(os.environ.get("RANK", "0"))


def init_distributed(device: str | None = None, *, timeout_s: float = 1800.0) -> DistContext:
    """Join the torchrun process group if there is one; choose this process's device.

    Args:
        device: "cpu", "cuda" or "cuda:K"; None picks CUDA when available. Under torchrun on CUDA the
            process uses ``cuda:LOCAL_RANK`` whatever index was given.
        timeout_s: collective timeout.

    Returns:
        A :class:`DistContext`. Call :func:`shutdown` at the end (it only acts if this call created the group).

    Raises:
        DvmlError: torchrun asked for more processes than there are GPUs on this machine.
    """
    want_cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    if want_cuda and not torch.cuda.is_available():
        raise DvmlError(f"device {device!r} requested but CUDA is not available")
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        dev = torch.device(device) if device is not None else torch.device("cuda" if want_cuda else "cpu")
        return DistContext(device=dev)
    rank, world, local = (int(os.environ[k]) for k in TORCHRUN_ENV)
    if want_cuda:
        if local >= torch.cuda.device_count():
            raise DvmlError(f"torchrun started local rank {local} but this machine has only "
                            f"{torch.cuda.device_count()} CUDA device(s); use --nproc_per_node <= the GPU count")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    log.debug("rank %d/%d on %s (%s)", rank, world, dev, backend)
    return DistContext(rank=rank, world_size=world, local_rank=local, device=dev, backend=backend)


def shutdown(ctx: DistContext) -> None:
    """Leave the process group created by :func:`init_distributed` (no-op in a single process)."""
    if ctx.backend is not None and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (B_local, ...) from every rank along dim 0 -> (world_size · B_local, ...), rank order.

    Gradients flow back to every rank's slice (summed over the ranks that used it). All ranks must pass
    tensors of the same shape. Identity in a single process.
    """
    if not _active():
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Like :func:`gather_with_grad` for tensors that need no gradient (labels)."""
    if not _active():
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """All-reduce-average the ``.grad`` of parameters that DDP does not manage (e.g. a loss's proxies)."""
    if not _active():
        return
    world = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(world)


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of a tensor (a copy; identity in a single process). For logging losses."""
    if not _active():
        return values
    out = values.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def barrier() -> None:
    if _active():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s python object on every rank (identity in a single process)."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def class_balanced_batches(labels: np.ndarray, *, batch_size: int, samples_per_class: int,
                           rng: np.random.Generator, num_batches: int | None = None) -> np.ndarray:
    """A class-balanced batch order: ``num_batches`` batches of ``batch_size // samples_per_class`` distinct
    classes with ``samples_per_class`` images each, laid out class by class.

    Classes are visited in reshuffled rounds (every class is used about equally often) and each class's images
    in reshuffled rounds (every image is seen before any repeats); a class with fewer images than
    ``samples_per_class`` repeats images within the batch.

    Args:
        labels: (N,) class ids.
        batch_size: images per batch; a multiple of ``samples_per_class``.
        samples_per_class: images per class in a batch (>= 2 so every anchor has a positive).
        rng: the only source of randomness.
        num_batches: default ``N // batch_size`` (at least 1).

    Returns:
        (num_batches, batch_size) int64 indices into ``labels``.
    """
    labels = np.asarray(labels)
    if samples_per_class < 1 or batch_size % samples_per_class:
        raise DvmlError(f"batch size {batch_size} must be a positive multiple of samples per class "
                        f"{samples_per_class}")
    classes, inverse = np.unique(labels, return_inverse=True)
    m = batch_size // samples_per_class
    if m > classes.size:
        raise DvmlError(f"a batch of {batch_size} with {samples_per_class} per class needs {m} classes but the "
                        f"training split has only {classes.size}; lower --batch-size or raise --samples-per-class")
    if num_batches is None:
        num_batches = max(1, labels.size // batch_size)
    members = [np.flatnonzero(inverse == c) for c in range(classes.size)]
    queues: list[list[int]] = [[] for _ in members]

    def take(c: int, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            if not queues[c]:
                queues[c] = rng.permutation(members[c]).tolist()
            # within one batch never take the same image twice unless the class is too small
            fresh = [i for i in queues[c] if i not in out] if len(members[c]) >= k else queues[c]
            i = fresh[0]
            queues[c].remove(i)
            out.append(i)
        return out

    class_queue: list[int] = []
    batches = np.empty((num_batches, batch_size), dtype=np.int64)
    for b in range(num_batches):
        chosen: list[int] = []
        while len(chosen) < m:
            if not class_queue:
                class_queue = rng.permutation(classes.size).tolist()
            c = next((c for c in class_queue if c not in chosen), None)
            if c is None:  # the rest of this round is already in the batch: start a new round
                class_queue = []
                continue
            class_queue.remove(c)
            chosen.append(c)
        batches[b] = np.concatenate([take(c, samples_per_class) for c in chosen])
    return batches


class DistributedClassBalancedSampler:
    """Batch sampler for ``DataLoader(batch_sampler=...)``: this rank's shard of each global class-balanced batch.

    Every rank draws the same global batch order from ``(seed, epoch)`` (:func:`class_balanced_batches`) and
    takes the contiguous slice ``[rank·b, (rank+1)·b)`` of each batch, ``b = batch_size / world_size``; the
    shards of one step are disjoint and together form the global batch. When ``classes per batch`` is a
    multiple of ``world_size`` every shard holds whole classes. Call :meth:`set_epoch` before each epoch;
    ``start`` skips the first batches of the epoch (resuming mid-epoch).

    Args:
        labels: (N,) class ids of the training split.
        batch_size: the *global* batch size (all ranks together); a multiple of ``world_size`` and of
            ``samples_per_class``.
        samples_per_class: images per class in a global batch.
        seed: seeds the order; epoch e uses ``numpy.random.default_rng([seed, e])``.
        rank, world_size: this process's place.
        num_batches: global batches per epoch (default ``N // batch_size``).
    """

    def __init__(self, labels: Sequence[int] | np.ndarray, *, batch_size: int, samples_per_class: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1, num_batches: int | None = None):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        if batch_size % world_size:
            raise DvmlError(f"the global batch size {batch_size} must be divisible by the number of processes "
                            f"{world_size}")
        self.labels = np.asarray(labels, dtype=np.int64)
        self.batch_size = batch_size
        self.samples_per_class = samples_per_class
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_batches = num_batches if num_batches is not None else max(1, self.labels.size // batch_size)
        self.epoch = 0
        self.start = 0
        # validate now (raises DvmlError on too few classes) rather than at the first iteration
        class_balanced_batches(self.labels, batch_size=batch_size, samples_per_class=samples_per_class,
                               rng=np.random.default_rng(0), num_batches=1)

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.world_size

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the batch order of ``epoch``; iteration begins at global batch ``start``."""
        if not 0 <= start <= self.num_batches:
            raise ValueError(f"start {start} outside 0..{self.num_batches}")
        self.epoch, self.start = epoch, start

    def global_batches(self, epoch: int | None = None) -> np.ndarray:
        """(num_batches, batch_size) indices of ``epoch`` (default: the current one); identical on every rank."""
        e = self.epoch if epoch is None else epoch
        return class_balanced_batches(self.labels, batch_size=self.batch_size,
                                      samples_per_class=self.samples_per_class,
                                      rng=np.random.default_rng([self.seed, e]), num_batches=self.num_batches)

    def __iter__(self) -> Iterator[list[int]]:
        b = self.local_batch_size
        for batch in self.global_batches()[self.start:]:
            yield batch[self.rank * b:(self.rank + 1) * b].tolist()

    def __len__(self) -> int:
        return self.num_batches - self.start
