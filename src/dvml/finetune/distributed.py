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
  gradient *average* over ranks gives back exactly the single-process full-batch gradient (tested). The
  other batch statistics are gathered the same way (:func:`gather_batch`): the heads' class scale and class
  centring of z_V and the gaussian likelihood's s² (the mean squared error) are the global batch's.

Everything here degrades to a no-op in a single process, so the training loop has one code path.
"""

from __future__ import annotations

import datetime
import gc
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from dvml.devices import resolve_device
from dvml.errors import DvmlError
from dvml.heads.sampler import ClassBalancedSampler

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
        device: "cpu", "cuda", "cuda:K" or "mps"; None (or "auto") picks CUDA, then MPS, then the CPU
            (:func:`dvml.devices.resolve_device`). Under torchrun on CUDA the process uses ``cuda:LOCAL_RANK``
            whatever index was given; MPS is single-process only.
        timeout_s: collective timeout.

    Returns:
        A :class:`DistContext`. Call :func:`shutdown` at the end (it only acts if this call created the group).

    Raises:
        DvmlError: the device is not available, or torchrun asked for more processes than there are GPUs on
            this machine (or for several processes on MPS).
    """
    chosen = resolve_device("auto" if device is None else str(device))
    want_cuda = chosen.type == "cuda"
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return DistContext(device=chosen)
    if chosen.type == "mps":
        raise DvmlError("torchrun with several processes needs CUDA or the CPU; MPS trains in one process")
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
    """Leave the process group created by :func:`init_distributed` (no-op in a single process).

    Call it once the DistributedDataParallel wrapper is out of reach: a DDP reducer still alive when the group is
    destroyed can abort the process as it exits (gloo, torch 2.14: "terminate called without an active exception",
    SIGABRT, after all the work is done; about 1 two-process run in 10 here, none in 100 with the wrapper freed
    first). The unreachable ones (held in reference cycles) are collected here, before the group goes."""
    if ctx.backend is not None and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    ``torch.distributed.nn.functional.all_gather``'s gloo backward (``_AlltoAll`` built on ``dist.scatter``)
    allocates its buffers with ``empty_like(grad)``, which keeps a strided gradient's layout, and gloo's scatter
    fills non-contiguous tensors wrongly (pytorch/pytorch#24836, #192920): a gradient that reaches the gather
    through a transpose came back scrambled (about 70% error on the (T, B, E) synthetic batch; caught by
    ``test_against_single_process_full_batch_gradient``). Slicing a contiguous gradient along dim 0 (the
    backward of ``cat``) keeps it contiguous.
    """

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def gather_with_grad(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Concatenate ``x`` from every rank along ``dim`` (rank order): (..., B_local, ...) -> (..., W·B_local, ...).

    Gradients flow back to every rank's slice (summed over the ranks that used it). All ranks must pass
    tensors of the same shape. Identity in a single process.
    """
    if not _active():
        return x
    from torch.distributed.nn.functional import all_gather

    moved = x.movedim(dim, 0).contiguous()
    out = _ContiguousGrad.apply(torch.cat(all_gather(moved), dim=0))
    return out.movedim(0, dim)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Like :func:`gather_with_grad` for tensors that need no gradient (labels)."""
    if not _active():
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def gather_batch(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of ``x`` concatenated (rank order): :func:`gather_with_grad` for a tensor that carries a
    gradient, :func:`gather_no_grad` otherwise (labels, detached statistics). What the heads' batch statistics
    and the gaussian likelihood's s² use (:data:`dvml.heads.model.Gather`). Identity in a single process."""
    return gather_with_grad(x) if x.requires_grad else gather_no_grad(x)


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


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s batch order (a 63-bit integer derived from ``(seed, epoch)``)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0] >> 1)


class DistributedClassBalancedSampler:
    """Batch sampler for ``DataLoader(batch_sampler=...)``: this rank's shard of each global class-balanced batch.

    Every rank draws the same global batch order — fit-heads' :class:`~dvml.heads.sampler.ClassBalancedSampler`
    (``batch_size / samples_per_class`` distinct classes, ``samples_per_class`` images each, laid out class by
    class) with a generator seeded from ``(seed, epoch)`` (:func:`epoch_seed`) — and
    takes the contiguous slice ``[rank·b, (rank+1)·b)`` of each batch, ``b = batch_size / world_size``; the
    shards of one step are disjoint and together form the global batch. When ``classes per batch`` is a
    multiple of ``world_size`` every shard holds whole classes. Call :meth:`set_epoch` before each epoch;
    ``start`` skips the first batches of the epoch (resuming mid-epoch).

    Args:
        labels: (N,) class ids of the training split.
        batch_size: the *global* batch size (all ranks together); a multiple of ``world_size`` and of
            ``samples_per_class``.
        samples_per_class: images per class in a global batch.
        seed: seeds the order; epoch e uses ``torch.Generator().manual_seed(epoch_seed(seed, e))``.
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
        # raises DvmlError on too few classes, ValueError on a batch that is not a multiple of samples_per_class
        self._base = ClassBalancedSampler(torch.from_numpy(self.labels), batch_size, samples_per_class,
                                          torch.Generator())
        self._base.n_batches = self.num_batches

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
        self._base.generator = torch.Generator().manual_seed(epoch_seed(self.seed, e))
        return self._base.epoch().numpy()

    def __iter__(self) -> Iterator[list[int]]:
        b = self.local_batch_size
        for batch in self.global_batches()[self.start:]:
            yield batch[self.rank * b:(self.rank + 1) * b].tolist()

    def __len__(self) -> int:
        return self.num_batches - self.start
