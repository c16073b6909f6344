"""``dvml.losses.dr`` against independent references: plain loops over hand-listed triplets and
samples, pytorch-metric-learning's TripletMarginLoss / ProxyNCALoss at γ = 0, and
``torch.nn.functional.cross_entropy`` for ProxyNCA++."""

from __future__ import annotations

import io
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import distances, losses, miners

from dvml.losses.dr import (
    COS_EPS,
    PROXY_LR_MULTIPLIER,
    DRProxyNCALoss,
    DRTripletLoss,
    ProxyNCAPlusPlusLoss,
    TripletReduction,
    all_triplet_indices,
)

torch.set_num_threads(2)


def _batch(seed: int, b: int = 12, e: int = 6, classes: int = 4, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, e, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (b,), generator=g)
    return x, y


# ---------------------------------------------------------------- plain references


def _val(t: torch.Tensor) -> float:
    return t.detach().item()


def _cos(u: torch.Tensor, v: torch.Tensor, eps: float = COS_EPS) -> float:
    nu, nv = float(u.norm()), float(v.norm())
    if nu <= eps or nv <= eps:
        return 0.0
    return float(u @ v) / (nu * nv)


def _loop_dr_triplet(x, y, margin, gamma, normalize=True, nonzero=True, triplets=None) -> float:
    """Independent reference: python loop over the listed (or all valid) triplets, python floats."""
    if normalize:
        x = x / x.norm(dim=1, keepdim=True)
    b = len(y)
    if triplets is None:
        triplets = [
            (a, p, n) for a, p, n in itertools.product(range(b), repeat=3) if a != p and y[a] == y[p] and y[n] != y[a]
        ]
    vals = []
    for a, p, n in triplets:
        d_ap = float((x[a] - x[p]).norm())
        d_an = float((x[a] - x[n]).norm())
        vals.append(max(0.0, d_ap - d_an + margin - gamma * _cos(x[p] - x[a], x[n] - x[a])))
    if nonzero:
        vals = [v for v in vals if v > 0]
    return sum(vals) / len(vals) if vals else 0.0


def _loop_dr_proxy_nca(x, y, proxies, gamma, scale) -> float:
    """Independent reference: per-sample, per-proxy loop with explicit difference vectors."""
    total = 0.0
    for i in range(len(y)):
        xi = x[i] / x[i].norm()
        p = [q / q.norm() for q in proxies]
        own = int(y[i])
        logits = []
        for c in range(len(p)):
            d = float(((xi - p[c]) ** 2).sum())
            if c != own:
                d += gamma * _cos(p[own] - xi, p[c] - xi)
            logits.append(-scale * d)
        m = max(logits)
        lse = m + math.log(sum(math.exp(v - m) for v in logits))
        total += lse - logits[own]
    return total / len(y)


# ---------------------------------------------------------------- DR-Triplet


def test_all_triplet_indices_against_loop():
    _, y = _batch(0, b=10, classes=3)
    got = set(zip(*[t.tolist() for t in all_triplet_indices(y)], strict=True))
    want = {(a, p, n) for a, p, n in itertools.product(range(10), repeat=3) if a != p and y[a] == y[p] and y[n] != y[a]}
    assert got == want and len(got) > 0


def test_dr_triplet_against_hand_listed_triplets():
    # 2-D points, labels 0,0,1,1: the valid triplets are listed by hand.
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, 0.2], [2.0, -1.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1])
    listed = [(0, 1, 2), (0, 1, 3), (1, 0, 2), (1, 0, 3), (2, 3, 0), (2, 3, 1), (3, 2, 0), (3, 2, 1)]
    assert set(zip(*[t.tolist() for t in all_triplet_indices(y)], strict=True)) == set(listed)
    for margin, gamma, reduction in [(0.278, 0.492, "nonzero-mean"), (1.0, 0.7, "mean"), (0.5, -0.3, "mean")]:
        loss = DRTripletLoss(margin, gamma, normalize_embeddings=False, reduction=reduction)(x, y)
        ref = _loop_dr_triplet(
            x, y, margin, gamma, normalize=False, nonzero=reduction == "nonzero-mean", triplets=listed
        )
        assert _val(loss) == pytest.approx(ref, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("reduction", list(TripletReduction))
def test_dr_triplet_against_loop_random(seed, reduction):
    x, y = _batch(seed)
    loss = DRTripletLoss(0.278, 0.492, reduction=reduction)(x, y)
    ref = _loop_dr_triplet(x, y, 0.278, 0.492, nonzero=reduction is TripletReduction.nonzero_mean)
    assert _val(loss) == pytest.approx(ref, rel=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("margin", [0.05, 0.278, 1.0])
def test_against_pml_triplet_margin_loss_gamma0(seed, margin):
    x, y = _batch(seed, b=32, e=16, classes=5, dtype=torch.float32)
    ours = DRTripletLoss(margin=margin, gamma=0.0)(x, y)
    ref = losses.TripletMarginLoss(margin=margin)(x, y)  # LpDistance(normalize, p=2, power=1), AvgNonZero
    assert _val(ours) == pytest.approx(_val(ref), rel=1e-5, abs=1e-6)
    # same distance without normalisation
    ours_raw = DRTripletLoss(margin=margin, gamma=0.0, normalize_embeddings=False)(x, y)
    ref_raw = losses.TripletMarginLoss(margin=margin, distance=distances.LpDistance(normalize_embeddings=False))(x, y)
    assert _val(ours_raw) == pytest.approx(_val(ref_raw), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("gamma", [0.0, 0.492])
@pytest.mark.parametrize("reduction", list(TripletReduction))
def test_balanced_dense_path_against_gather_path_and_loop(gamma, reduction):
    """Class-balanced batches (shuffled, 3 classes x 4) take the dense block path; it must equal the
    gathered listed-triplet path (values and gradients) and the plain loop."""
    g = torch.Generator().manual_seed(11)
    y = torch.arange(3).repeat_interleave(4)[torch.randperm(12, generator=g)]
    z = torch.randn(3, 12, 5, generator=g, dtype=torch.float64)
    loss = DRTripletLoss(0.278, gamma, reduction=reduction)
    a, p, n = all_triplet_indices(y)
    zd, zg = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    dense = loss.forward_batched(zd, y)
    gather = loss._reduce(loss.triplet_losses(zg, a, p, n), len(a), zg)
    assert dense.item() == pytest.approx(gather.item(), rel=1e-12)
    dense.backward()
    gather.backward()
    torch.testing.assert_close(zd.grad, zg.grad)
    nonzero = reduction is TripletReduction.nonzero_mean
    ref = sum(_loop_dr_triplet(z[t], y, 0.278, gamma, nonzero=nonzero) for t in range(3)) / 3
    assert dense.item() == pytest.approx(ref, rel=1e-10)
    if gamma == 0.0 and nonzero:
        pml = sum(_val(losses.TripletMarginLoss(0.278)(z[t], y)) for t in range(3)) / 3
        assert dense.item() == pytest.approx(pml, rel=1e-10)


def test_against_pml_with_pml_miner_gamma0_and_loop_gamma_nonzero():
    x, y = _batch(3, b=24, e=8, classes=4, dtype=torch.float64)
    miner = miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard")
    triplets = miner(x, y)
    assert len(triplets[0]) > 0
    ours = DRTripletLoss(0.2, 0.0, miner=miner)(x, y)
    assert _val(ours) == pytest.approx(_val(losses.TripletMarginLoss(0.2)(x, y, triplets)), rel=1e-10)
    listed = list(zip(*[t.tolist() for t in triplets], strict=True))
    ours = DRTripletLoss(0.2, 0.492, miner=miner)(x, y)
    assert _val(ours) == pytest.approx(_loop_dr_triplet(x, y, 0.2, 0.492, triplets=listed), rel=1e-10)


def test_dr_triplet_no_triplet_is_exact_zero_in_graph():
    x = torch.randn(4, 3, requires_grad=True)
    for y in (torch.tensor([0, 1, 2, 3]), torch.tensor([1, 1, 1, 1])):
        loss = DRTripletLoss()(x, y)
        assert loss.item() == 0.0
        loss.backward()
        assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize(
    "n_on, n_off",
    [
        ((0.5, 0.0), (0.0, 0.5)),  # both active: the on-line one lacks the perpendicular push
        ((1.2, 0.0), (0.0, 1.2)),  # the cosine switches the on-line one off, the off-line one stays active
    ],
)
def test_gradient_moves_on_line_negative_less(n_on, n_off):
    """Anchor (0,0), positive (1,0); two negatives at the same distance from the anchor, one on the
    anchor-positive line, one perpendicular to it. Only the (a, p, n) triplets are used, so the triplet
    part of the gradient on n is the same unit vector for both; DR must move the on-line one less."""
    a, p = [0.0, 0.0], [1.0, 0.0]
    y = torch.tensor([0, 0, 1, 2])
    triplets = (torch.tensor([0, 0]), torch.tensor([1, 1]), torch.tensor([2, 3]))

    def grad_norms(gamma):
        x = torch.tensor([a, p, list(n_on), list(n_off)], dtype=torch.float64, requires_grad=True)
        DRTripletLoss(0.278, gamma, normalize_embeddings=False, reduction="mean")(x, y, triplets).backward()
        return float(x.grad[2].norm()), float(x.grad[3].norm())

    on0, off0 = grad_norms(0.0)
    assert on0 == pytest.approx(off0) and on0 > 0  # the plain triplet loss treats both alike
    on, off = grad_norms(0.492)
    assert on < off


def test_dr_triplet_degenerate_identical_points_finite_gradients():
    base = torch.randn(2, 5, generator=torch.Generator().manual_seed(0))
    # identical anchor/positive, negatives identical to anchors, all points identical
    cases = [base[[0, 0, 1, 1]], base[[0, 0, 0, 1]], base[[0, 0, 0, 0]], torch.zeros(4, 5)]
    # balanced labels take the dense path, unbalanced ones the gather path
    for y, pts, normalize in itertools.product(
        (torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 0, 1])), cases, (True, False)
    ):
        x = pts.clone().requires_grad_(True)
        loss = DRTripletLoss(normalize_embeddings=normalize)(x, y)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
        xs = pts.expand(3, 4, 5).clone().requires_grad_(True)
        DRTripletLoss(normalize_embeddings=normalize).forward_batched(xs, y).backward()
        assert torch.isfinite(xs.grad).all()


def test_dr_triplet_batched_equals_loop_over_t():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(5, 16, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (16,), generator=g)
    for reduction in TripletReduction:
        loss = DRTripletLoss(0.278, 0.492, reduction=reduction)
        zb = z.clone().requires_grad_(True)
        zl = z.clone().requires_grad_(True)
        batched = loss.forward_batched(zb, y)
        looped = torch.stack([loss(zl[t], y) for t in range(5)]).mean()
        assert batched.item() == pytest.approx(looped.item(), rel=1e-12)
        batched.backward()
        looped.backward()
        torch.testing.assert_close(zb.grad, zl.grad)
    miner = miners.TripletMarginMiner(margin=0.3, type_of_triplets="all")
    mined = DRTripletLoss(miner=miner)
    looped = torch.stack([mined(z[t], y) for t in range(5)]).mean()
    assert _val(mined.forward_batched(z, y)) == pytest.approx(_val(looped), rel=1e-12)


def test_dr_triplet_dvml_size_memory_and_grad():
    """T = 20 synthetic batches of 128 with 512-D embeddings (DVML's shapes), 8 classes x 16: 215,040
    triplets per batch, 4.3M in all (the dense class-block path: (20, 8, 16, 16, 128) floats); finite
    gradients, and the batched loss of one batch agrees with the per-batch loss."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20, 128, 512, generator=g, requires_grad=True)
    y = torch.arange(8).repeat_interleave(16)
    loss = DRTripletLoss()
    out = loss.forward_batched(z, y)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    assert _val(loss(z[0].detach(), y)) == pytest.approx(_val(loss.forward_batched(z[:1].detach(), y)), rel=1e-6)


def test_dr_triplet_rejects_bad_input():
    loss = DRTripletLoss()
    with pytest.raises(ValueError, match="shape"):
        loss(torch.randn(4, 2, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        loss(torch.randn(4, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="triplet"):
        loss(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]), (torch.tensor([0]),) * 4)
    with pytest.raises(ValueError):
        DRTripletLoss(reduction="median")


# ---------------------------------------------------------------- DR-ProxyNCA


@pytest.mark.parametrize("scale", [1.0, 3.0, 9.0])
def test_dr_proxy_nca_against_pml_proxy_nca_gamma0(scale):
    torch.manual_seed(0)
    x, y = _batch(1, b=32, e=16, classes=10, dtype=torch.float32)
    ref = losses.ProxyNCALoss(num_classes=10, embedding_size=16, softmax_scale=scale)
    ours = DRProxyNCALoss(10, 16, gamma=0.0, softmax_scale=scale)
    with torch.no_grad():
        ours.proxies.copy_(ref.proxies)
    xo, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    lo, lr = ours(xo, y), ref(xr, y)
    assert lo.item() == pytest.approx(lr.item(), rel=1e-5)
    lo.backward()
    lr.backward()
    torch.testing.assert_close(xo.grad, xr.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours.proxies.grad, ref.proxies.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("gamma, scale", [(0.492, 1.0), (1.5, 4.0), (-0.7, 2.0)])
def test_dr_proxy_nca_against_loop(gamma, scale):
    x, y = _batch(2, b=10, e=5, classes=6)
    loss = DRProxyNCALoss(6, 5, gamma=gamma, softmax_scale=scale, generator=torch.Generator().manual_seed(1))
    loss.double()
    ref = _loop_dr_proxy_nca(x, y, loss.proxies.detach(), gamma, scale)
    assert _val(loss(x, y)) == pytest.approx(ref, rel=1e-10)
    # the direction term changes the loss (so the comparison above is not vacuous)
    assert ref != pytest.approx(_loop_dr_proxy_nca(x, y, loss.proxies.detach(), 0.0, scale), rel=1e-6)


def test_dr_proxy_nca_degenerate_finite_gradients():
    loss = DRProxyNCALoss(3, 4, gamma=0.492, generator=torch.Generator().manual_seed(0))
    p = loss.proxies.detach()
    # embeddings equal to their own proxy, to another proxy, and zero vectors
    x = torch.stack([p[0], p[1], p[1], torch.zeros(4)]).requires_grad_(True)
    y = torch.tensor([0, 1, 0, 2])
    out = loss(x, y)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(x.grad).all() and torch.isfinite(loss.proxies.grad).all()


# ---------------------------------------------------------------- ProxyNCA++


@pytest.mark.parametrize("temperature, smoothing", [(1 / 9, 0.0), (1 / 9, 0.1), (0.5, 0.3)])
def test_proxy_nca_pp_against_cross_entropy(temperature, smoothing):
    x, y = _batch(4, b=20, e=8, classes=7)
    loss = ProxyNCAPlusPlusLoss(7, 8, temperature=temperature, label_smoothing=smoothing).double()
    # independent route: explicit difference vectors for the squared distances, torch's cross entropy
    xn = x / x.norm(dim=1, keepdim=True)
    pn = loss.proxies.detach() / loss.proxies.detach().norm(dim=1, keepdim=True)
    d2 = ((xn[:, None, :] - pn[None, :, :]) ** 2).sum(-1)
    ref = F.cross_entropy(-d2 / temperature, y, label_smoothing=smoothing)
    assert _val(loss(x, y)) == pytest.approx(_val(ref), rel=1e-10)


def test_proxy_nca_pp_is_scaled_proxy_nca_without_smoothing():
    x, y = _batch(6, b=16, e=8, classes=5)
    pp = ProxyNCAPlusPlusLoss(5, 8, temperature=1 / 9, label_smoothing=0.0).double()
    nca = DRProxyNCALoss(5, 8, gamma=0.0, softmax_scale=9.0).double()
    with torch.no_grad():
        nca.proxies.copy_(pp.proxies)
    assert _val(pp(x, y)) == pytest.approx(_val(nca(x, y)), rel=1e-10)


# ---------------------------------------------------------------- shared proxy behaviour


def _proxy_losses():
    return [DRProxyNCALoss(9, 6, gamma=0.492), ProxyNCAPlusPlusLoss(9, 6, label_smoothing=0.1)]


@pytest.mark.parametrize("idx", [0, 1])
def test_proxy_losses_batched_equals_loop_over_t(idx):
    loss = _proxy_losses()[idx].double()
    g = torch.Generator().manual_seed(7)
    z = torch.randn(4, 10, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 9, (10,), generator=g)
    batched = loss.forward_batched(z, y)
    batched.backward()
    grad_b = loss.proxies.grad.clone()
    loss.proxies.grad = None
    looped = torch.stack([loss(z[t], y) for t in range(4)]).mean()
    looped.backward()
    assert batched.item() == pytest.approx(looped.item(), rel=1e-12)
    torch.testing.assert_close(grad_b, loss.proxies.grad)


@pytest.mark.parametrize("idx", [0, 1])
def test_proxies_survive_state_dict_save_load(idx):
    loss = _proxy_losses()[idx]
    assert [n for n, _ in loss.named_parameters()] == ["proxies"]
    buf = io.BytesIO()
    torch.save({"loss": loss.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = type(loss)(9, 6)
    assert not torch.equal(fresh.proxies, loss.proxies)
    fresh.load_state_dict(state["loss"])
    torch.testing.assert_close(fresh.proxies, loss.proxies, rtol=0, atol=0)
    x, y = torch.randn(5, 6), torch.tensor([0, 3, 3, 8, 1])
    assert _val(fresh(x, y)) == _val(loss(x, y))


def test_proxy_init_seeded_and_lr_multiplier():
    a = DRProxyNCALoss(5, 4, generator=torch.Generator().manual_seed(3))
    b = DRProxyNCALoss(5, 4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.proxies, b.proxies)
    assert a.proxy_lr_multiplier == PROXY_LR_MULTIPLIER == ProxyNCAPlusPlusLoss.proxy_lr_multiplier
    assert ProxyNCAPlusPlusLoss(5, 4, proxy_lr_multiplier=10.0).proxy_lr_multiplier == 10.0


@pytest.mark.parametrize("idx", [0, 1])
def test_proxy_losses_reject_bad_labels(idx):
    loss = _proxy_losses()[idx]
    with pytest.raises(ValueError, match=r"\[0, 9\)"):
        loss(torch.randn(3, 6), torch.tensor([0, 9, 1]))
    with pytest.raises(ValueError, match="size"):
        loss(torch.randn(3, 5), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="shape"):
        loss.forward_batched(torch.randn(3, 6), torch.tensor([0, 1, 1]))
