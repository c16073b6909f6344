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
from pytorch_metric_learning import distances, losses, miners, reducers

from dvml.losses.dr import (
    COS_EPS,
    DR_TRIPLET_REDUCTIONS,
    PROXY_NCA_PP_TEMPERATURE,
    DRProxyNCALoss,
    DRTripletLoss,
    ProxyNCAPlusPlusLoss,
    all_triplet_indices,
)
from dvml.losses.names import MetricReduction

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


def _seed_mvr_proxy(x, y, proxies, gamma, temperature=1.0) -> float:
    """Seed 003's reference (alpoler/mohan2020 ``MVR_Proxy``) as brute-force loops, on normalised embeddings (its
    network normalises them) and unit proxies: plain distances, the positive proxy in the numerator only,
    ``−log(exp(−d_y/τ) / Σ_{c≠y} exp(−(d_c + γ·cos(p_y − x, p_c − x))/τ))``, averaged over the batch."""
    total = 0.0
    for i in range(len(y)):
        xi = x[i] / x[i].norm()
        p = [q / q.norm() for q in proxies]
        own = int(y[i])
        num = math.exp(-float((xi - p[own]).norm()) / temperature)
        den = 0.0
        for c in range(len(p)):
            if c != own:
                d = float((xi - p[c]).norm())
                den += math.exp(-(d + gamma * _cos(p[own] - xi, p[c] - xi)) / temperature)
        total += -math.log(num / den)
    return total / len(y)


def _official_proxy_nca_pp(x, y, proxies, temperature, smoothing) -> float:
    """Teh et al.'s official ``ProxyNCA_prob`` + ``binarize_and_smooth_labels`` (euwern/proxynca_pp, loss.py) as
    loops: embeddings and proxies normalised and scaled by √(1/τ), squared distances, targets 1 − ε on the own
    class and ε/(C − 1) elsewhere, ``Σ_c −t_c log softmax(−D)_c``, mean over the batch."""
    scale = math.sqrt(1.0 / temperature)
    n_cls = len(proxies)
    total = 0.0
    for i in range(len(y)):
        xi = scale * x[i] / x[i].norm()
        logits = [-float(((xi - scale * q / q.norm()) ** 2).sum()) for q in proxies]
        m = max(logits)
        lse = m + math.log(sum(math.exp(v - m) for v in logits))
        for c in range(n_cls):
            t = 1.0 - smoothing if c == int(y[i]) else smoothing / (n_cls - 1)
            total += -t * (logits[c] - lse)
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
    for margin, gamma, reduction in [(0.278, 0.492, "nonzero"), (1.0, 0.7, "mean"), (0.5, -0.3, "mean")]:
        loss = DRTripletLoss(margin, gamma, normalize_embeddings=False, reduction=reduction)(x, y)
        ref = _loop_dr_triplet(
            x, y, margin, gamma, normalize=False, nonzero=reduction == "nonzero", triplets=listed
        )
        assert _val(loss) == pytest.approx(ref, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("reduction", list(DR_TRIPLET_REDUCTIONS))
def test_dr_triplet_against_loop_random(seed, reduction):
    x, y = _batch(seed)
    loss = DRTripletLoss(0.278, 0.492, reduction=reduction)(x, y)
    ref = _loop_dr_triplet(x, y, 0.278, 0.492, nonzero=reduction is MetricReduction.nonzero)
    assert _val(loss) == pytest.approx(ref, rel=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("margin", [0.05, 0.278, 1.0])
@pytest.mark.parametrize("reduction", list(DR_TRIPLET_REDUCTIONS))
def test_against_pml_triplet_margin_loss_gamma0(seed, margin, reduction):
    x, y = _batch(seed, b=32, e=16, classes=5, dtype=torch.float32)
    reducer = reducers.AvgNonZeroReducer() if reduction is MetricReduction.nonzero else reducers.MeanReducer()
    ours = DRTripletLoss(margin=margin, gamma=0.0, reduction=reduction)(x, y)
    ref = losses.TripletMarginLoss(margin=margin, reducer=reducer)(x, y)  # LpDistance(normalize, p=2, power=1)
    assert _val(ours) == pytest.approx(_val(ref), rel=1e-5, abs=1e-6)
    # same distance without normalisation
    ours_raw = DRTripletLoss(margin=margin, gamma=0.0, normalize_embeddings=False, reduction=reduction)(x, y)
    ref_raw = losses.TripletMarginLoss(margin=margin, distance=distances.LpDistance(normalize_embeddings=False),
                                       reducer=reducer)(x, y)
    assert _val(ours_raw) == pytest.approx(_val(ref_raw), rel=1e-5, abs=1e-6)


def _seed_mvr_triplet(x, y, margin, gamma) -> float:
    """Seed 003's reference (alpoler/mohan2020 ``MVR_Triplet``) on L2-normalised embeddings (its network
    normalises them): relu(d_ap − d_an + margin − γ·cos(x_p − x_a, x_n − x_a)) averaged over *all* valid
    triplets, as brute-force python loops."""
    x = [v / v.norm() for v in x]
    vals = []
    for a, p, n in itertools.product(range(len(y)), repeat=3):
        if a != p and y[a] == y[p] and y[n] != y[a]:
            u, w = x[p] - x[a], x[n] - x[a]
            cos = float(u @ w) / (float(u.norm()) * float(w.norm()))
            vals.append(max(0.0, float(u.norm()) - float(w.norm()) + margin - gamma * cos))
    return sum(vals) / len(vals)


def test_dr_triplet_default_is_the_seed_reference_mean():
    """The defaults (margin 0.278, γ 0.492, mean over all triplets) reproduce the seed's loss, and the mean is not
    the mean over non-zero triplets here (so the comparison can fail)."""
    from dvml.losses import make_metric_loss

    x, y = _batch(8, b=16, e=6, classes=4)
    ref = _seed_mvr_triplet(x, y, 0.278, 0.492)
    assert _val(DRTripletLoss()(x, y)) == pytest.approx(ref, rel=1e-10)
    made = make_metric_loss("dr-triplet", num_classes=4, embedding_size=6)
    assert _val(made(x, y)) == pytest.approx(ref, rel=1e-10)
    assert _val(DRTripletLoss(reduction="nonzero")(x, y)) > ref * 1.05


@pytest.mark.parametrize("gamma", [0.0, 0.492])
@pytest.mark.parametrize("reduction", list(DR_TRIPLET_REDUCTIONS))
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
    nonzero = reduction is MetricReduction.nonzero
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
    ours = DRTripletLoss(0.2, 0.0, miner=miner, reduction="nonzero")(x, y)
    assert _val(ours) == pytest.approx(_val(losses.TripletMarginLoss(0.2)(x, y, triplets)), rel=1e-10)
    listed = list(zip(*[t.tolist() for t in triplets], strict=True))
    ours = DRTripletLoss(0.2, 0.492, miner=miner, reduction="nonzero")(x, y)
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
    for reduction in DR_TRIPLET_REDUCTIONS:
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


def _unit_proxies(loss):
    with torch.no_grad():
        loss.proxies.div_(loss.proxies.norm(dim=1, keepdim=True))  # the seed initialises them on the unit sphere
    return loss.proxies.detach()


@pytest.mark.parametrize("gamma, temperature", [(0.45, 1.0), (0.0, 1.0), (1.5, 0.25), (-0.7, 2.0)])
def test_dr_proxy_nca_against_seed_reference_loop(gamma, temperature):
    x, y = _batch(2, b=10, e=5, classes=6)
    loss = DRProxyNCALoss(6, 5, gamma=gamma, temperature=temperature, generator=torch.Generator().manual_seed(1))
    loss.double()
    ref = _seed_mvr_proxy(x, y, _unit_proxies(loss), gamma, temperature)
    assert _val(loss(x, y)) == pytest.approx(ref, rel=1e-10)
    if gamma:  # the direction term changes the loss (so the comparison above is not vacuous)
        assert ref != pytest.approx(_seed_mvr_proxy(x, y, loss.proxies.detach(), 0.0, temperature), rel=1e-6)


def test_dr_proxy_nca_hand_computed():
    """2-D: x = (0, 1) of class 0; proxies (1, 0), (−1, 0), (0, −1). d = (√2, √2, 2); x→own proxy (1, −1);
    cos with x→p1 = (−1, −1) is 0, with x→p2 = (0, −2) is 1/√2. ℓ = √2 + log(e^{−√2} + e^{−(2 + γ/√2)})."""
    loss = DRProxyNCALoss(3, 2, gamma=0.5).double()
    with torch.no_grad():
        loss.proxies.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, -1.0]]))
    x, y = torch.tensor([[0.0, 1.0]], dtype=torch.float64), torch.tensor([0])
    r2 = math.sqrt(2.0)
    assert _val(loss(x, y)) == pytest.approx(r2 + math.log(math.exp(-r2) + math.exp(-(2 + 0.5 / r2))), rel=1e-12)
    # the deviation: the old definition (squared distances, positive in the denominator, ×9 on the
    # cos term too) gives a different value on the same input
    old = -math.log(math.exp(-9 * 2) / (math.exp(-9 * 2) + math.exp(-9 * 2) + math.exp(-9 * (4 + 0.5 / r2))))
    assert _val(loss(x, y)) != pytest.approx(old, rel=1e-3)


def test_dr_proxy_nca_scale_free_in_proxy_norm():
    """Proxies are normalised in the loss: scaling them changes nothing (the seed's start on the unit sphere)."""
    x, y = _batch(3, b=8, e=4, classes=5)
    loss = DRProxyNCALoss(5, 4).double()
    before = _val(loss(x, y))
    with torch.no_grad():
        loss.proxies.mul_(7.0)
    assert _val(loss(x, y)) == pytest.approx(before, rel=1e-12)


def test_dr_proxy_nca_degenerate_finite_gradients():
    loss = DRProxyNCALoss(3, 4, generator=torch.Generator().manual_seed(0))
    p = loss.proxies.detach()
    # embeddings equal to their own proxy, to another proxy, and zero vectors
    x = torch.stack([p[0], p[1], p[1], torch.zeros(4)]).requires_grad_(True)
    y = torch.tensor([0, 1, 0, 2])
    out = loss(x, y)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(x.grad).all() and torch.isfinite(loss.proxies.grad).all()


def test_dr_proxy_nca_defaults_are_the_seeds():
    loss = DRProxyNCALoss(4, 3)
    assert (loss.gamma, loss.temperature) == (0.45, 1.0)  # seed 003: --mvr_reg 0.45, no scale


# ---------------------------------------------------------------- ProxyNCA++


@pytest.mark.parametrize("temperature, smoothing", [(1 / 9, 0.0), (1 / 9, 0.1), (0.25, 0.0), (0.5, 0.3)])
def test_proxy_nca_pp_against_official_formula(temperature, smoothing):
    x, y = _batch(4, b=20, e=8, classes=7)
    loss = ProxyNCAPlusPlusLoss(7, 8, temperature=temperature, label_smoothing=smoothing).double()
    ref = _official_proxy_nca_pp(x, y, loss.proxies.detach(), temperature, smoothing)
    assert _val(loss(x, y)) == pytest.approx(ref, rel=1e-10)


def test_proxy_nca_pp_smoothing_spreads_over_negatives_not_all_classes():
    """ε/(C − 1) on each negative (official) differs from F.cross_entropy's ε/C on every class."""
    x, y = _batch(5, b=12, e=6, classes=4)
    loss = ProxyNCAPlusPlusLoss(4, 6, temperature=0.25, label_smoothing=0.2).double()
    xn = x / x.norm(dim=1, keepdim=True)
    pn = loss.proxies.detach() / loss.proxies.detach().norm(dim=1, keepdim=True)
    logits = -((xn[:, None, :] - pn[None, :, :]) ** 2).sum(-1) / 0.25
    target = torch.full((12, 4), 0.2 / 3, dtype=torch.float64).scatter_(1, y[:, None], 0.8)
    assert _val(loss(x, y)) == pytest.approx(_val(F.cross_entropy(logits, target)), rel=1e-10)
    assert _val(loss(x, y)) != pytest.approx(_val(F.cross_entropy(logits, y, label_smoothing=0.2)), rel=1e-4)


@pytest.mark.parametrize("temperature", [1 / 9, 0.25])
def test_proxy_nca_pp_without_smoothing_is_pml_proxy_nca(temperature):
    """ε = 0: pml's ProxyNCALoss (normalised squared distances, softmax over all proxies) with scale 1/τ."""
    x, y = _batch(6, b=16, e=8, classes=5, dtype=torch.float32)
    ref = losses.ProxyNCALoss(num_classes=5, embedding_size=8, softmax_scale=1 / temperature)
    ours = ProxyNCAPlusPlusLoss(5, 8, temperature=temperature, label_smoothing=0.0)
    with torch.no_grad():
        ours.proxies.copy_(ref.proxies)
    xo, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    lo, lr = ours(xo, y), ref(xr, y)
    assert lo.item() == pytest.approx(lr.item(), rel=1e-5)
    lo.backward()
    lr.backward()
    torch.testing.assert_close(xo.grad, xr.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours.proxies.grad, ref.proxies.grad, rtol=1e-4, atol=1e-6)


def test_proxy_nca_pp_defaults():
    loss = ProxyNCAPlusPlusLoss(4, 3)
    assert loss.label_smoothing == 0.0  # the official training's smoothing_const
    assert loss.temperature == PROXY_NCA_PP_TEMPERATURE == 0.25


# ---------------------------------------------------------------- shared proxy behaviour


def _proxy_losses():
    return [DRProxyNCALoss(9, 6), ProxyNCAPlusPlusLoss(9, 6)]


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


def test_proxy_init_seeded():
    a = DRProxyNCALoss(5, 4, generator=torch.Generator().manual_seed(3))
    b = DRProxyNCALoss(5, 4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.proxies, b.proxies)
    assert not torch.equal(a.proxies, DRProxyNCALoss(5, 4, generator=torch.Generator().manual_seed(4)).proxies)


@pytest.mark.parametrize("cls", [DRProxyNCALoss, ProxyNCAPlusPlusLoss])
@pytest.mark.parametrize("temperature", [0.0, -0.5])
def test_proxy_losses_reject_a_temperature_not_above_zero(cls, temperature):
    with pytest.raises(ValueError, match=rf"^temperature must be > 0, got {temperature}$"):
        cls(5, 4, temperature=temperature)
    assert cls(5, 4, temperature=0.5).temperature == 0.5


@pytest.mark.parametrize("idx", [0, 1])
def test_proxy_losses_reject_bad_labels(idx):
    loss = _proxy_losses()[idx]
    with pytest.raises(ValueError, match=r"\[0, 9\)"):
        loss(torch.randn(3, 6), torch.tensor([0, 9, 1]))
    with pytest.raises(ValueError, match="size"):
        loss(torch.randn(3, 5), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="shape"):
        loss.forward_batched(torch.randn(3, 6), torch.tensor([0, 1, 1]))


def test_dr_triplet_takes_the_triplet_losses_reduction_enum():
    assert DRTripletLoss(reduction="nonzero").reduction is MetricReduction.nonzero
    with pytest.raises(ValueError, match="^reduction must be one of nonzero, mean, got 'sum'$"):
        DRTripletLoss(reduction="sum")
