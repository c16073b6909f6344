"""How alive DVML's variational branch is: cheap diagnostics logged every epoch (issue 14).

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


#: Issue 14's acceptance thresholds for a DVML run: (key, comparison, threshold, meaning).
CHECKS = (
    ("active_frac", ">=", 0.10, "posterior not collapsed: share of dimensions with Var_x[mu_j] > 0.01"),
    ("kl_sum", ">=", 1.0, "KL(q(z_V|x) || N(0, I)) in nats per image, clearly above 0"),
    ("hardness", ">", 0.0, "synthetic samples are hard: Lm(z_hat) - Lm(z_I) at the last epoch"),
    ("syn_consistency", ">=", 0.80, "synthetic samples are class-consistent: nearest training-class centre is own"),
    ("grad_cos_phase2", "<", 0.95, "DVML changes how z_I learns: cos(total, Lm(z_I)) gradient, phase-2 mean"),
)


def run_report(run_dir, *, samples: int = 2, max_images: int = 20000) -> dict:
    """Diagnostics of a finished fit-heads run, for ``dvml analyze``.

    Recomputes :func:`branch_stats` with the run's reported model on its training classes (view 0 of up to
    ``max_images`` images, seeded noise) and reads the training-time ones from ``log.jsonl``: the last epoch's
    loss terms and the phase-2 means of the sampled gradient statistics. ``checks`` holds issue 14's acceptance
    tests (:data:`CHECKS`) for a DVML run (``None`` for a baseline).
    """
    from pathlib import Path

    import numpy as np

    from dvml import runs as R
    from dvml.cache import load_split
    from dvml.heads.config import FitConfig
    from dvml.heads.model import DVMLHeads

    run_dir = Path(run_dir)
    ckpt = R.load_checkpoint(run_dir)
    if ckpt.get("kind", "heads") != "heads":
        raise R.RunError(f"{run_dir}: a {ckpt.get('kind')} run; the branch diagnostics need a fit-heads run")
    cfg = FitConfig.from_dict({**ckpt["config"], "overwrite": False, "resume": False})
    model = DVMLHeads(int(ckpt["in_dim"]), **cfg.heads_kwargs())
    model.load_state_dict(ckpt["model"])
    train = load_split(Path(ckpt["cache"]), "train", views=[0])
    keep = np.isin(train.labels, np.asarray(ckpt["train_classes"]))
    rows = np.nonzero(keep)[0]
    if len(rows) > max_images:
        rows = np.sort(np.random.default_rng(cfg.seed).choice(rows, max_images, replace=False))
    x = torch.from_numpy(np.ascontiguousarray(train.features[rows, 0], dtype=np.float32))
    y = torch.from_numpy(np.asarray(train.labels)[rows].astype(np.int64))
    stats = heads_branch_stats(model, x, y, samples=samples, generator=torch.Generator().manual_seed(cfg.seed))
    log = R.read_log(run_dir)
    last = log[-1] if log else {}
    train_time = {"epochs": len(log), "kl_term": last.get("kl"), "recon_term": last.get("recon"),
                  "metric_synthetic": last.get("metric_synthetic"), "metric_invariant": last.get("metric_invariant")}
    for k in GRAD_KEYS + GRAD_DRAW_KEYS:
        train_time[f"{k}_phase2"] = phase2_mean(log, k)
    out = {"run_dir": str(run_dir), "dvml": cfg.dvml, "n_images": int(len(rows)), "final": stats,
           "train_time": train_time, "checks": None}
    if cfg.dvml:
        values = {**stats, "grad_cos_phase2": train_time["grad_cos_invariant_phase2"],
                  "hardness": (None if last.get("metric_synthetic") is None else
                               float(last["metric_synthetic"] - last["metric_invariant"]))}
        checks = {}
        for key, op, thr, meaning in CHECKS:
            v = values.get(key)
            ok = None if v is None else bool(v >= thr if op == ">=" else v > thr if op == ">" else v < thr)
            checks[key] = {"value": v, "op": op, "threshold": thr, "ok": ok, "meaning": meaning}
        out["checks"] = checks
    return out
