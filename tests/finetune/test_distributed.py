"""The distributed pieces of finetune: class-balanced sharded sampler, all-gather with gradient, gloo harness."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from dvml.errors import DvmlError
from dvml.finetune.distributed import DistributedClassBalancedSampler, epoch_seed, gather_no_grad, gather_with_grad
from dvml.heads.sampler import ClassBalancedSampler


def _labels(n_classes=6, sizes=(5, 3, 8, 4, 6, 2)):
    return np.concatenate([np.full(s, c) for c, s in zip(range(n_classes), sizes, strict=True)])


def test_against_fit_heads_sampler():
    """The global order is fit-heads' ClassBalancedSampler with a generator seeded from (seed, epoch)."""
    labels = _labels()
    s = DistributedClassBalancedSampler(labels, batch_size=8, samples_per_class=2, seed=5, num_batches=7)
    for epoch in (0, 3):
        ref = ClassBalancedSampler(torch.from_numpy(labels), 8, 2, torch.Generator().manual_seed(epoch_seed(5, epoch)))
        ref.n_batches = 7
        np.testing.assert_array_equal(s.global_batches(epoch), ref.epoch().numpy())
    for b in s.global_batches(1):
        per_class = [labels[b[i:i + 2]] for i in range(0, 8, 2)]
        assert all(len(set(pc)) == 1 for pc in per_class)  # laid out class by class
        assert len({int(pc[0]) for pc in per_class}) == 4  # distinct classes


def test_too_few_classes_is_an_error():
    with pytest.raises(DvmlError, match="needs 4 training classes"):
        DistributedClassBalancedSampler(np.array([0, 0, 1, 1, 2, 2]), batch_size=8, samples_per_class=2)


def test_shards_are_disjoint_and_form_the_global_batch():
    labels = _labels()
    world = 2
    samplers = [DistributedClassBalancedSampler(labels, batch_size=8, samples_per_class=2, seed=3, rank=r,
                                                world_size=world, num_batches=5) for r in range(world)]
    for epoch in (0, 1):
        for s in samplers:
            s.set_epoch(epoch)
        glob = samplers[0].global_batches()
        np.testing.assert_array_equal(glob, samplers[1].global_batches())  # same order on every rank
        shards = [list(s) for s in samplers]
        assert [len(x) for x in shards] == [5, 5]
        for step in range(5):
            a, b = shards[0][step], shards[1][step]
            assert len(a) == len(b) == 4
            assert a + b == glob[step].tolist()  # rank order = global order, disjoint positions
            # 4 classes x 2 over 2 ranks: each shard holds whole classes
            assert set(labels[a]).isdisjoint(set(labels[b]))
    e0 = samplers[0].global_batches(0)
    assert not np.array_equal(e0, samplers[0].global_batches(1))  # set_epoch reshuffles
    np.testing.assert_array_equal(e0, samplers[0].global_batches(0))  # deterministic


def test_resume_start_skips_batches():
    labels = _labels()
    s = DistributedClassBalancedSampler(labels, batch_size=8, samples_per_class=2, seed=0, num_batches=6)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, start=4)
    assert len(s) == 2 and list(s) == full[4:]


def test_bad_world_configuration():
    with pytest.raises(DvmlError, match="divisible by the number of processes"):
        DistributedClassBalancedSampler(_labels(), batch_size=6, samples_per_class=2, world_size=4)
    with pytest.raises(ValueError, match="outside world"):
        DistributedClassBalancedSampler(_labels(), batch_size=8, samples_per_class=2, rank=2, world_size=2)


def test_gather_is_identity_in_one_process():
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_with_grad(x) is x and gather_no_grad(x) is x


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _contrastive(emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A batch loss coupling every pair (so a per-rank loss would give different gradients)."""
    e = torch.nn.functional.normalize(emb, dim=1)
    sim = e @ e.T
    same = (labels[:, None] == labels[None, :]).float()
    eye = torch.eye(len(labels))
    pos = ((1 - sim) * (same - eye)).sum() / (same - eye).sum()
    neg = (torch.relu(sim - 0.2) * (1 - same)).sum() / (1 - same).sum()
    return pos + neg


def _ddp_worker(rank: int, world: int, port: int, x: torch.Tensor, y: torch.Tensor, state: dict, out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from dvml.finetune.distributed import init_distributed, shutdown

    ctx = init_distributed("cpu")
    assert ctx.backend == "gloo" and ctx.world_size == world
    model = torch.nn.Linear(x.shape[1], 4)
    model.load_state_dict(state)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    b = x.shape[0] // world
    xs, ys = x[rank * b:(rank + 1) * b], y[rank * b:(rank + 1) * b]
    emb = ddp(xs)
    # a per-sample term (mean over the local shard; DDP averages it) + batch terms on the gathered batch, one
    # of them on T stacked batches (T, B, E) gathered along dim 1 (strided gradients, see _ContiguousGrad)
    z3 = torch.stack([emb, emb.flip(1) * 2.0])
    y_all = gather_no_grad(ys)
    g3 = gather_with_grad(z3, dim=1)
    loss = emb.pow(2).mean() + _contrastive(gather_with_grad(emb), y_all) + _contrastive(g3[1], y_all)
    loss.backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.named_parameters()}, out)
    del ddp, emb, z3, g3, loss  # as finetune does: the DDP wrapper is gone before the group (see shutdown)
    shutdown(ctx)


def test_against_single_process_full_batch_gradient(tmp_path: Path):
    """2 gloo processes (DDP + gathered metric loss) give the gradient of one process on the whole batch."""
    torch.manual_seed(0)
    x = torch.randn(8, 5)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    model = torch.nn.Linear(5, 4)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    emb = model(x)
    (emb.pow(2).mean() + _contrastive(emb, y) + _contrastive(emb.flip(1) * 2.0, y)).backward()
    out = str(tmp_path / "grads.pt")
    mp.start_processes(_ddp_worker, args=(2, free_port(), x, y, state, out), nprocs=2, join=True,
                       start_method="spawn")
    got = torch.load(out, weights_only=True)
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-5, atol=1e-6)


def _dvml_setup(pairs: str, tmp: str):
    """A finetune config with every gathered batch statistic on (class scale, class centring, gaussian s²), a
    linear "backbone" under DVML heads (so phase 1 recomputes μ on a detached x), and its two losses."""
    from dvml.finetune import FinetuneConfig
    from dvml.finetune.model import FinetuneNet, metric_loss
    from dvml.heads.model import DVMLHeads

    cfg = FinetuneConfig(dataset="cub", root=tmp, out=tmp, weights="none", embedding_size=4, decoder_hidden=8,
                         samples=3, batch_size=6, per_class=2, centre_mu=True, synthetic_pairs=pairs)
    torch.manual_seed(0)
    net = FinetuneNet(torch.nn.Linear(5, 6), DVMLHeads(6, **cfg.heads_kwargs()))
    return cfg, net, metric_loss(cfg, 3)


def _dvml_grads(net, loss, x, y, eps, cfg, mean=lambda t: t) -> dict:
    """Per phase (1 at epoch 15, 2 at epoch 30): the loss terms (``mean``: over processes, as finetune logs them)
    and the gradient of every parameter."""
    out = {}
    for epoch in (15.0, 30.0):
        lam = cfg.lambdas(epoch)
        net.zero_grad()
        feats, heads_out = net(x, y, samples=cfg.samples, stop_recon_grad=lam.stop_recon_grad, eps=eps)
        terms = loss(heads_out, feats.detach(), y, lam)
        terms["total"].backward()
        module = getattr(net, "module", net)
        out[lam.phase] = ({k: float(mean(v.detach())) for k, v in terms.items()},
                          {n: p.grad.clone() for n, p in module.named_parameters()})
    return out


def _dvml_worker(rank: int, world: int, port: int, tmp: str, x, y, eps, out: str, pairs: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from dvml.finetune.distributed import all_reduce_mean, gather_batch, init_distributed, shutdown
    from dvml.finetune.model import GatheredMetric, dvml_loss

    ctx = init_distributed("cpu")
    cfg, net, metric = _dvml_setup(pairs, tmp)
    loss = dvml_loss(cfg, GatheredMetric(metric), gather=gather_batch)  # as finetune's training loss
    b = len(y) // world
    sl = slice(rank * b, (rank + 1) * b)
    got = _dvml_grads(torch.nn.parallel.DistributedDataParallel(net), loss, x[sl], y[sl], eps[:, sl], cfg,
                      all_reduce_mean)
    if rank == 0:
        torch.save(got, out)
    shutdown(ctx)


@pytest.mark.parametrize("pairs", ["within", "cross"])
def test_dvml_batch_statistics_against_single_process_full_batch(tmp_path: Path, pairs: str):
    """The heads' class scale and class centring of z_V and the gaussian likelihood's s² are the global batch's:
    2 gloo processes give the single-process loss terms and gradients, in both phases, also when a class is
    split over the processes (3 classes x 2 images over 2 ranks: class 1 on both); with cross synthetic pairs the
    anchors z_I are gathered too."""
    from dvml.finetune.model import dvml_loss

    torch.manual_seed(1)
    x, y = torch.randn(6, 5), torch.tensor([0, 0, 1, 1, 2, 2])
    eps = torch.randn(3, 6, 4)
    cfg, net, metric = _dvml_setup(pairs, str(tmp_path))
    want = _dvml_grads(net, dvml_loss(cfg, metric), x, y, eps, cfg)
    out = str(tmp_path / "grads.pt")
    mp.start_processes(_dvml_worker, args=(2, free_port(), str(tmp_path), x, y, eps, out, pairs), nprocs=2, join=True,
                       start_method="spawn")
    got = torch.load(out, weights_only=True)
    for phase in (1, 2):
        (terms_w, grads_w), (terms_g, grads_g) = want[phase], got[phase]
        for k, v in terms_w.items():
            assert terms_g[k] == pytest.approx(v, rel=1e-5, abs=1e-6), (phase, k)
        for n, g in grads_w.items():
            torch.testing.assert_close(grads_g[n], g, rtol=1e-4, atol=1e-6, msg=f"phase {phase} {n}")
