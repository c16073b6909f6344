"""How alive DVML's variational branch is: cheap diagnostics logged every epoch, and the measures that compare
the learned draws with noise (:func:`norm_matched_noise`, :func:`loo_consistency`, :func:`triplet_hardness`).
The report of a finished run and its pass/fail thresholds are :mod:`dvml.experiments.branch_report`.

Two kinds, both read-only (they never change the fit's trajectory: no optimizer state, no draw from the fit's
random generators):

* **Embedding/posterior statistics** (:func:`branch_stats`), once per epoch on a fixed subset of the training
  images (view 0), from the current heads with noise drawn from a dedicated generator:

  ==========================  ===================================================================================
  ``z_i_norm``                mean ‖z_I‖
  ``mu_norm``                 mean ‖μ‖
  ``sigma_mean``              mean σ over images and dimensions
  ``active_units``            dimensions j with Var_x[μ_j] > 0.01 (across images; the usual posterior-collapse
                              measure, Burda et al. 2016), and ``active_frac`` = that count / E
  ``kl_sum``                  KL(q(z_V|x) ‖ N(0, I)) summed over E, mean over images (nats)
  ``z_v_norm``                mean ‖ẑ − b‖, b the embedding the draw is added to (z_I, or z_I/‖z_I‖ when the
                              variance lives on the unit sphere): the size of what the draw adds
  ``cos_syn``                 mean cos(ẑ, z_I)
  ``syn_to_source``           mean ‖n(ẑ) − n(z_I)‖, n = L2 normalisation (what every metric loss sees)
  ``img_to_centre``           mean ‖n(z_I) − c_y‖, c_y = mean of n(z_I) over the subset's images of class y
  ``syn_consistency``         share of draws n(ẑ) whose nearest centre (euclidean, all subset classes) is c_y
  ``img_consistency``         the same for n(z_I) (the reference the synthetic samples are compared with)
  ==========================  ===================================================================================

* **Gradient statistics** (:func:`term_gradients`), sampled during training (the first step of every epoch and
  every ``grad_every`` steps): the gradient of each weighted term (λ·term) with respect to the embedding
  layer's weight and bias, its norm (``grad_norm_<term>``), and the cosine of the total gradient with that of
  Lm(z_I) alone (``grad_cos_invariant``: the baseline's gradient direction; 1.0 means DVML changes nothing in
  how z_I learns). Computed from the step's own graph with ``torch.autograd.grad`` before the step's
  ``backward``, so the step itself is unchanged. DVML fits only: the baseline's gradient is Lm(z_I)'s.
  ``grad_ratio_other`` = ‖total − Lm(z_I)'s‖ / ‖Lm(z_I)'s‖ bounds that cosine from below (√(1 − r²) for r < 1).
  ``grad_cos_synthetic``: the same cosine with the reconstruction's gradient left out (what Lm(ẑ) alone turns).
  That turn has two factors, kept apart by ``grad_ratio_synthetic`` = ‖λ3·∇Lm(ẑ)‖ / ‖λ4·∇Lm(z_I)‖ (how much
  weight the synthetic term has) and ``grad_cos_syn_term`` = cos(∇Lm(ẑ), ∇Lm(z_I)) (where the synthetic samples
  alone would move the embedding layer, whatever their weight): with ρ and θ, the cosine of the sum with Lm(z_I)'s
  is (1 + ρ cos θ) / √(1 + ρ² + 2ρ cos θ).
  Part of what turns the total away from Lm(z_I)'s is the draws' own noise (z_V is random; its noise averages
  out over steps like any minibatch noise); what DVML changes *systematically* is the gradient's expectation
  over the draws. From the step's two halves of the T draws (independent given the batch): ``grad_cos_expected``
  = the cosine of that expectation with Lm(z_I)'s gradient (unbiased estimates of the dot products:
  ⟨E g, g_inv⟩ ≈ mean_h ⟨g_h, g_inv⟩, ‖E g‖² ≈ ⟨g_1, g_2⟩), and ``grad_noise_ratio`` = the draws' noise in the
  step's gradient over its expected norm (‖g_1 − g_2‖ / 2 / √⟨g_1, g_2⟩). T ≥ 2 only.
  ``grad_cos_syn_term_expected``: the same estimate for Lm(ẑ)'s gradient alone, cos(E ∇Lm(ẑ), ∇Lm(z_I)) — the
  direction the synthetic samples teach once their draws' noise is averaged out (not logged on a step whose two
  halves' Lm(ẑ) gradients have ⟨s_1, s_2⟩ ≤ 0, where noise swamps the expectation; an estimate, so a step's
  value can leave [−1, 1] when the noise is large).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dvml.heads.model import class_means

ACTIVE_VAR = 0.01
GRAD_TERMS = ("recon", "metric_synthetic", "metric_invariant")
BRANCH_KEYS = ("z_i_norm", "mu_norm", "sigma_mean", "active_units", "active_frac", "kl_sum", "z_v_norm", "cos_syn",
               "syn_to_source", "img_to_centre", "syn_consistency", "img_consistency")
GRAD_KEYS = tuple(f"grad_norm_{t}" for t in GRAD_TERMS) + ("grad_cos_invariant", "grad_ratio_other",
                                                             "grad_cos_synthetic", "grad_cos_syn_term",
                                                             "grad_ratio_synthetic")
#: Logged besides :data:`GRAD_KEYS` when T ≥ 2 (:func:`term_gradients` with ``halves``);
#: ``grad_cos_syn_term_expected`` only where the halves' Lm(ẑ) gradients agree enough to estimate it.
GRAD_DRAW_KEYS = ("grad_cos_expected", "grad_noise_ratio", "grad_cos_syn_term_expected")


def nearest_centre_share(points: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor,
                         classes: torch.Tensor) -> float:
    """Share of ``points`` (M, E) whose nearest row of ``centres`` (C, E) (euclidean) has class ``labels`` (M,)."""
    d2 = (points.square().sum(1, keepdim=True) - 2.0 * points @ centres.T + centres.square().sum(1)[None, :])
    return float((classes[d2.argmin(dim=1)] == labels).float().mean())


@torch.no_grad()
def branch_stats(z_i: torch.Tensor, labels: torch.Tensor, mu: torch.Tensor | None = None,
                 logvar: torch.Tensor | None = None, z_syn: torch.Tensor | None = None,
                 base: torch.Tensor | None = None) -> dict[str, float]:
    """The per-epoch statistics (table above) of one set of images.

    Args:
        z_i: (N, E) embeddings. labels: (N,) class ids.
        mu, logvar: (N, E) posterior parameters (DVML only).
        z_syn: (T, N, E) synthetic embeddings of the same images (DVML only).
        base: (N, E) what the draws were added to (default ``z_i``).
    Returns:
        the table's keys as floats (only ``z_i_norm``, ``img_to_centre`` and ``img_consistency`` for the
        baseline).
    """
    z_i = z_i.float()
    u = F.normalize(z_i, dim=-1)
    classes, centres, inv = class_means(u, labels)
    own = centres[inv]
    out = {"z_i_norm": float(z_i.norm(dim=-1).mean()),
           "img_to_centre": float((u - own).norm(dim=-1).mean()),
           "img_consistency": nearest_centre_share(u, labels, centres, classes)}
    if mu is None:
        return out
    mu, logvar = mu.float(), logvar.float()
    var_mu = mu.var(dim=0, unbiased=False)
    out["mu_norm"] = float(mu.norm(dim=-1).mean())
    out["sigma_mean"] = float((0.5 * logvar).exp().mean())
    out["active_units"] = int((var_mu > ACTIVE_VAR).sum())
    out["active_frac"] = out["active_units"] / mu.shape[1]
    out["kl_sum"] = float((0.5 * (logvar.exp() + mu.square() - 1.0 - logvar)).sum(dim=-1).mean())
    if z_syn is not None:
        z_syn = z_syn.float()
        t = z_syn.shape[0]
        b = z_i if base is None else base.float()
        out["z_v_norm"] = float((z_syn - b).norm(dim=-1).mean())
        out["cos_syn"] = float(F.cosine_similarity(z_syn, z_i.expand_as(z_syn), dim=-1).mean())
        us = F.normalize(z_syn, dim=-1)
        out["syn_to_source"] = float((us - u).norm(dim=-1).mean())
        out["syn_consistency"] = nearest_centre_share(us.reshape(-1, us.shape[-1]), labels.repeat(t), centres,
                                                      classes)
    return out


@torch.no_grad()
def heads_branch_stats(model, x: torch.Tensor, labels: torch.Tensor, *, samples: int = 2,
                       generator: torch.Generator | None = None, batch_labels: bool = True) -> dict[str, float]:
    """:func:`branch_stats` of a :class:`~dvml.heads.model.DVMLHeads` on features ``x`` (N, D), ``samples``
    draws per image from ``generator`` (the decoder is not run)."""
    was = model.training
    model.eval()
    try:
        if not model.dvml:
            return branch_stats(model.embed(x), labels)
        out = model.synthesize(x, samples=samples, generator=generator, labels=labels if batch_labels else None)
        return branch_stats(out.z_i, labels, out.mu, out.logvar, out.z_syn, model.variance_base(out.z_i))
    finally:
        model.train(was)


def weighted_terms(terms: dict, lam, dvml: bool) -> dict:
    """The step's terms as they enter the total (λ·term) by name; the baseline's total is Lm(z_I) alone."""
    if not dvml:
        return {"metric_invariant": terms["metric_invariant"]}
    return {"recon": lam.recon * terms["recon"], "metric_synthetic": lam.synthetic * terms["metric_synthetic"],
            "metric_invariant": lam.invariant * terms["metric_invariant"]}


def draw_halves(out):
    """A :class:`~dvml.heads.model.HeadsOutput` of T ≥ 2 draws → the two outputs of its first and its next
    ⌊T/2⌋ draws (``z_syn`` and ``x_hat`` sliced along T; the middle draw of an odd T left out); None for T < 2
    or the baseline."""
    if out.z_syn is None or out.z_syn.shape[0] < 2:
        return None
    h = out.z_syn.shape[0] // 2
    return tuple(out._replace(z_syn=out.z_syn[part], x_hat=None if out.x_hat is None else out.x_hat[part])
                 for part in (slice(0, h), slice(h, 2 * h)))


def _flat_grad(v: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    gs = torch.autograd.grad(v, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(gs, params, strict=True)])


def term_gradients(terms: dict[str, torch.Tensor], params: list[torch.Tensor],
                   halves: tuple[dict, dict] | None = None) -> dict[str, float]:
    """Norms of each weighted term's gradient on ``params`` and the cosine of their sum with Lm(z_I)'s.

    Args:
        terms: weighted terms (λ·term) by name, at least ``"metric_invariant"``; the others of
            :data:`GRAD_TERMS` that are present and require grad are included. Their graphs are retained.
        params: the parameters to differentiate (the embedding layer's weight and bias).
        halves: the same step's weighted terms computed from each half of its T draws (:func:`draw_halves`);
            their ``recon`` and ``metric_synthetic`` (Lm(z_I)'s gradient is the step's) give
            :data:`GRAD_DRAW_KEYS`.
    Returns:
        ``grad_norm_<term>`` for each present term, ``grad_cos_invariant``, ``grad_cos_synthetic`` (the cosine of
        Lm(z_I)'s + Lm(ẑ)'s gradient with Lm(z_I)'s), ``grad_cos_syn_term`` and ``grad_ratio_synthetic`` (the
        direction of Lm(ẑ)'s gradient against Lm(z_I)'s, and its norm over Lm(z_I)'s), and ``grad_ratio_other`` =
        r = ‖g_total − g_inv‖ / ‖g_inv‖, how large the other terms' gradient is next to Lm(z_I)'s. It bounds how
        far DVML can turn the baseline's direction: for r < 1, cos(g_total, g_inv) ≥ √(1 − r²) whatever the
        other terms' direction, so a cosine below 0.95 needs r > 0.31 (with the paper's phase-2 λ3/λ4 = 1/4,
        Lm(ẑ)'s own gradient must then be ≥ 1.25× Lm(z_I)'s even when orthogonal to it).
    """
    flat: dict[str, torch.Tensor] = {}
    for name in GRAD_TERMS:
        v = terms.get(name)
        if v is None or not v.requires_grad:
            continue
        flat[name] = _flat_grad(v, params)
    out = {f"grad_norm_{k}": float(v.norm()) for k, v in flat.items()}
    inv = flat.get("metric_invariant")
    if inv is not None:
        total = torch.stack(list(flat.values())).sum(0)
        out["grad_cos_invariant"] = float(F.cosine_similarity(total, inv, dim=0))
        inv_norm = inv.norm().clamp_min(1e-30)
        out["grad_ratio_other"] = float((total - inv).norm() / inv_norm)
        syn = flat.get("metric_synthetic")
        if syn is not None:  # Lm(ẑ)'s share of the change alone (the reconstruction's left out), and its factors
            out["grad_cos_synthetic"] = float(F.cosine_similarity(inv + syn, inv, dim=0))
            out["grad_cos_syn_term"] = float(F.cosine_similarity(syn, inv, dim=0))
            out["grad_ratio_synthetic"] = float(syn.norm() / inv_norm)
        if halves is not None:
            others = [{k: _flat_grad(h[k], params) for k in GRAD_TERMS
                       if k != "metric_invariant" and k in h and h[k].requires_grad} for h in halves]
            g1, g2 = (inv + sum(o.values(), torch.zeros_like(inv)) for o in others)
            out.update(_expected_cosine(g1, g2, inv, inv_norm, "grad_cos_expected", "grad_noise_ratio"))
            if all("metric_synthetic" in o for o in others):
                s1, s2 = (o["metric_synthetic"] for o in others)
                if float(s1 @ s2) > 0:
                    out.update(_expected_cosine(s1, s2, inv, inv_norm, "grad_cos_syn_term_expected"))
    return out


def _expected_cosine(g1: torch.Tensor, g2: torch.Tensor, inv: torch.Tensor, inv_norm: torch.Tensor, cos_key: str,
                     noise_key: str | None = None) -> dict[str, float]:
    """cos(E g, inv) from two independent halves g1, g2 of the draws (unbiased dot products: ⟨E g, inv⟩ ≈ the
    halves' mean, ‖E g‖² ≈ ⟨g1, g2⟩) and, under ``noise_key``, the draws' noise over ‖E g‖."""
    expected_sq = (g1 @ g2).clamp_min(1e-30)
    out = {cos_key: float(0.5 * (g1 + g2) @ inv / expected_sq.sqrt() / inv_norm)}
    if noise_key is not None:
        out[noise_key] = float(0.5 * (g1 - g2).norm() / expected_sq.sqrt())
    return out


def step_gradients(loss_fn, out, x: torch.Tensor, labels: torch.Tensor, lam, terms: dict[str, torch.Tensor],
                   params: list[torch.Tensor], generator: torch.Generator | None = None) -> dict[str, float]:
    """One training step's gradient statistics (:func:`term_gradients` with the halves of its T draws).

    Args:
        loss_fn: the step's :class:`~dvml.heads.objective.DVMLLoss`; out: its heads output for ``x``;
        labels: (B,); lam: the step's weights; terms: ``loss_fn(out, x, labels, lam)`` (graphs retained);
        params: the embedding layer's parameters; generator: the loss's random generator (triplet-dws draws
            negatives from it): its state is put back after the halves, so the fit is unchanged.
    """
    halves = draw_halves(out)
    if halves is not None:
        state = None if generator is None else generator.get_state()
        halves = tuple(weighted_terms(loss_fn(h, x, labels, lam), lam, True) for h in halves)
        if generator is not None:
            generator.set_state(state)
    return term_gradients(weighted_terms(terms, lam, True), params, halves)


def phase2_mean(log: list[dict], key: str) -> float | None:
    """The mean of ``key`` over the phase-2 records of a run's ``log.jsonl`` that hold it (the sampled gradient
    statistics); None where none does (a baseline, or a run that never reached phase 2)."""
    vals = [r[key] for r in log if r.get("phase") == 2 and key in r]
    return sum(vals) / len(vals) if vals else None


# ------------------------------------------------------------------------------------------------------------
# the learned draws against noise: measures a check can fail on (used by dvml.experiments.branch_report)


def norm_matched_noise(z_syn: torch.Tensor, base: torch.Tensor, generator: torch.Generator | None = None
                       ) -> torch.Tensor:
    """Isotropic noise with the learned draws' norms: ``base + ‖ẑ_t − base‖ · ε/‖ε‖`` per draw and image,
    ε ~ N(0, I) from ``generator``. z_syn: (T, N, E) draws added to base (N, E) → (T, N, E). Each noise sample
    moves its embedding exactly as far as the learned one, in a uniformly random direction: what is left to tell
    them apart is the direction the learned distribution chose."""
    disp = (z_syn - base).norm(dim=-1, keepdim=True)
    eps = torch.randn(z_syn.shape, generator=generator, device=z_syn.device, dtype=z_syn.dtype)
    return base + disp * F.normalize(eps, dim=-1)


@torch.no_grad()
def loo_consistency(points: torch.Tensor, source: torch.Tensor, u: torch.Tensor, labels: torch.Tensor,
                    chunk: int = 4096) -> float:
    """Share of ``points`` whose nearest class centre is their source image's class, with **leave-one-out**
    centres: the centres are the mean unit embeddings ``u`` (N, E) of every image of each class, and the own
    class's centre leaves the source image out (so a point derived from an image is never judged against a
    centre that contains that image). points: (M, E) unit vectors; source: (M,) the row of ``u`` each derives
    from (``u`` itself: ``arange(N)``). Points whose class has a single image (no centre left) are not counted.
    Euclidean distance."""
    classes, inv = torch.unique(labels, return_inverse=True)
    u = u.float()
    sums = torch.zeros((len(classes), u.shape[1]), dtype=u.dtype, device=u.device).index_add(0, inv, u)
    counts = torch.bincount(inv, minlength=len(classes)).to(u.dtype)
    centres = sums / counts[:, None]
    hits, total = 0, 0
    for lo in range(0, points.shape[0], chunk):
        p, src = points[lo:lo + chunk].float(), source[lo:lo + chunk]
        own = inv[src]
        keep = counts[own] > 1
        p, src, own = p[keep], src[keep], own[keep]
        loo = (sums[own] - u[src]) / (counts[own] - 1)[:, None]
        d_own = (p - loo).square().sum(1)
        d2 = p.square().sum(1, keepdim=True) - 2.0 * p @ centres.T + centres.square().sum(1)[None, :]
        d2[torch.arange(len(own), device=own.device), own] = float("inf")
        hits += int((d_own < d2.min(dim=1).values).sum())
        total += len(own)
    return hits / total if total else float("nan")


def class_balanced_batches(labels: torch.Tensor, classes_per_batch: int, per_class: int,
                           generator: torch.Generator) -> torch.Tensor:
    """(K, classes_per_batch · per_class) rows of ``labels``: each batch ``per_class`` images of each of
    ``classes_per_batch`` classes (classes with fewer images left out), every eligible class once per pass,
    seeded. Empty (0, B) when fewer than two classes are eligible."""
    classes, inv = torch.unique(labels.cpu(), return_inverse=True)
    rows = [torch.nonzero(inv == c).flatten() for c in range(len(classes))]
    rows = [r[torch.randperm(len(r), generator=generator)[:per_class]] for r in rows if len(r) >= per_class]
    order = torch.randperm(len(rows), generator=generator).tolist()
    cpb = min(classes_per_batch, len(rows))
    if cpb < 2:
        return torch.zeros((0, cpb * per_class), dtype=torch.long)
    batches = [torch.cat([rows[c] for c in order[i:i + cpb]]) for i in range(0, len(order) - cpb + 1, cpb)]
    return torch.stack(batches).to(labels.device)


def _violations(z: torch.Tensor, labels: torch.Tensor, batches: torch.Tensor, violation) -> tuple[float, float, float]:
    """Over the batches, the sum, the number of positive and the number of all entries of
    ``violation(zb)[:, mask]``: ``zb`` (T, B, E) a batch's embeddings, ``violation`` returning (T, B, B, B) indexed
    [t, a, p, n], ``mask`` the (a, p, n) with y_a = y_p, a ≠ p, y_n ≠ y_a."""
    total = active = vsum = 0.0
    for idx in batches:
        y = labels[idx]
        same = y[:, None] == y[None, :]
        pos = same & ~torch.eye(len(idx), dtype=torch.bool, device=y.device)
        mask = pos[:, :, None] & ~same[:, None, :]  # (B, B, B): a, p, n
        v = violation(z[:, idx])[:, mask]  # (T, K)
        vsum += float(v.sum())
        active += float((v > 0).sum())
        total += v.numel()
    return vsum, active, total


@torch.no_grad()
def pair_hardness(z: torch.Tensor, labels: torch.Tensor, batches: torch.Tensor) -> dict[str, float]:
    """How hard embeddings make the N-pair loss's comparisons of class-balanced batches, in logits.

    z: (N, E) or (T, N, E) raw embeddings (N-pair compares raw dot products; each of the T sets batched on its own);
    labels: (N,); batches: (K, B) rows. For every anchor a, positive p (y_p = y_a, p ≠ a) and negative n
    (y_n ≠ y_a) of a batch, with s = the dot product, the violation is v = max(0, s(a, n) − s(a, p)): the logit by
    which n outranks a's positive in the N-pair loss's softmax. Returns ``per_active`` = mean v over the comparisons
    with v > 0 (in logits; the loss has no margin) and ``active`` = the share of comparisons with v > 0.
    """
    zz = z.float()
    zz = zz[None] if zz.dim() == 2 else zz

    def violation(zb):
        s = zb @ zb.transpose(1, 2)  # (T, B, B)
        return F.relu(s[:, :, None, :] - s[:, :, :, None])  # s(a, n) − s(a, p)

    vsum, active, total = _violations(zz, labels, batches, violation)
    return {"per_active": vsum / active if active else 0.0, "active": active / total if total else 0.0}


def triplet_hardness(z: torch.Tensor, labels: torch.Tensor, batches: torch.Tensor, margin: float
                     ) -> dict[str, float]:
    """How hard embeddings make the triplets of class-balanced batches, in units of the margin.

    z: (N, E) or (T, N, E) embeddings (each of the T sets is batched on its own, like Lm(ẑ) within a synthetic
    batch); labels: (N,); batches: (K, B) rows (:func:`class_balanced_batches`). For every triplet (a, p, n) of a
    batch (y_a = y_p, a ≠ p, y_n ≠ y_a), on unit vectors with the squared euclidean distance D (the triplet loss's),
    the violation is v = max(0, D(a, p) − D(a, n) + m). Returns ``per_active`` = mean v over the triplets with
    v > 0, divided by m (how far an active triplet is violated, in margins: comparable across sets, losses and
    batch sizes, unlike a sum over a batch's triplets), and ``active`` = the share of triplets with v > 0.
    """
    u = F.normalize(z.float(), dim=-1)
    u = u[None] if u.dim() == 2 else u

    def violation(ub):
        d = (ub[:, :, None, :] - ub[:, None, :, :]).square().sum(-1)  # (T, B, B)
        return F.relu(d[:, :, :, None] - d[:, :, None, :] + margin)  # D(a, p) − D(a, n) + m

    vsum, active, total = _violations(u, labels, batches, violation)
    return {"per_active": vsum / active / margin if active else 0.0, "active": active / total if total else 0.0}
