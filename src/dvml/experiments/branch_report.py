"""The report of a finished fit-heads run's variational branch, for ``dvml analyze``, and the checks it must pass.

Alive is not useful: a branch whose draws are no better than noise of the same size passes any check that only asks
whether the synthetic samples move, are hard or stay in their class. So the checks that concern the *draws* compare
the learned ẑ with **norm-matched isotropic noise** — each learned draw's displacement ẑ − b (b = the embedding it is
added to) replaced by a uniformly random direction of the same length
(:func:`~dvml.heads.diagnostics.norm_matched_noise`) — and pass only when the learned draws beat the noise by the
margin :data:`CHECKS` states:

* **class consistency** (:func:`~dvml.heads.diagnostics.loo_consistency`): share of normalised draws whose nearest
  class centre is their source's class, the centres over the *whole* training split (the run's training classes,
  view 0) with leave-one-out own centres; printed beside the same share for the real embeddings z_I and for the
  noise. Passes when learned − noise ≥ 0.02.
* **hardness** (:func:`~dvml.heads.diagnostics.triplet_hardness`): mean violation per active triplet of
  class-balanced batches (the run's classes per batch × images per class; the draws batched on their own, as
  Lm(ẑ) does), in units of the margin (the loss's margin where it has one, else the triplet loss's 0.2), for
  z_I, the learned draws and the noise; for an N-pair run, its own comparisons instead
  (:func:`~dvml.heads.diagnostics.pair_hardness`: per active anchor–positive–negative comparison of raw dot
  products, in logits). Any zero-mean perturbation makes triplets harder (the hinge is convex); the
  learned draws must be harder than noise of their own size: learned / noise ≥ 1.10.
* **gradient** (at the run's final weights, phase-2 λ, T draws, :data:`GRAD_BATCHES` batches): the
  cosine of the expected gradient of λ3·Lm(ẑ) + λ4·Lm(z_I) on the embedding layer with the *baseline's*
  gradient at the same weights (∇Lm(z_I), weight 1), for the learned draws and for the noise (the same
  expression with the noise in place of ẑ). The reconstruction's gradient is left out of both: the decoder was
  trained on the learned draws only. Passes when the learned draws turn the baseline's direction more than noise
  does, cos_noise − cos_learned ≥ 0.01, in *each* half of the batches (the estimate moves with the batches
  drawn: on wordnet_dev, 9 and 16 batches gave 0.001 and 0.023).

The posterior's own figures (active units, KL) keep their absolute thresholds: they say whether the branch is alive
at all (the noise control arm has none by construction).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dvml import runs as R
from dvml.heads import diagnostics as D
from dvml.losses import LOSS_PARAM_DEFAULTS
from dvml.losses.names import LossName

#: Acceptance thresholds of a DVML run: (key, comparison, threshold, meaning). The ``*_vs_noise`` ones compare
#: the learned draws with norm-matched noise (module docstring); the value compared is given in the meaning.
CHECKS = (
    ("active_frac", ">=", 0.10, "posterior not collapsed: share of dimensions with Var_x[mu_j] > 0.01"),
    ("kl_sum", ">=", 1.0, "KL(q(z_V|x) || N(0, I)) in nats per image, clearly above 0"),
    ("consistency_vs_noise", ">=", 0.02, "class consistency (leave-one-out centres): learned - noise"),
    ("hardness_vs_noise", ">=", 1.10, "violation per active triplet (N-pair: per active comparison): "
                                      "learned / noise"),
    ("grad_vs_noise", ">=", 0.01, "cos(noise's gradient, baseline's) - cos(learned's, baseline's), the smaller "
                                  "over two halves of the batches"),
)
#: Batches of the gradient check (seeded class-balanced passes over the report's images, as many as make this).
GRAD_BATCHES = 16


def _compare(value, op: str, thr: float) -> bool | None:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return None
    return bool(value >= thr if op == ">=" else value > thr if op == ">" else value < thr)


def noise_comparison(model, x: torch.Tensor, y: torch.Tensor, cfg, *, samples: int = 2, seed: int = 0,
                     metric=None) -> dict:
    """The learned-vs-noise figures of a DVML model on images ``x`` (N, D) with labels ``y`` (N,).

    Args:
        model: :class:`~dvml.heads.model.DVMLHeads` (dvml=True), its weights as trained.
        cfg: the run's :class:`~dvml.heads.config.HeadsConfig` (loss, margin, batch shape, λ, T).
        samples: draws per image for consistency and hardness.
        seed: seeds the draws, the noise and the batches.
        metric: the run's metric loss (with its trained state) for the gradient check; None skips it.
    Returns:
        ``consistency`` {real, learned, noise}, ``hardness`` {real, learned, noise: {per_active, active}},
        ``margin``, ``n_images``, and with ``metric`` ``grad`` {cos_learned, cos_noise, batches}.
    """
    g = torch.Generator().manual_seed(seed)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.synthesize(x, samples=samples, generator=g, labels=y)
            base = model.variance_base(out.z_i)
            noise = D.norm_matched_noise(out.z_syn, base, g)
        u = F.normalize(out.z_i.float(), dim=-1)
        n, t = len(y), out.z_syn.shape[0]
        src = torch.arange(n).repeat(t)
        flat = lambda z: F.normalize(z.reshape(-1, z.shape[-1]).float(), dim=-1)  # noqa: E731
        cons = {"real": D.loo_consistency(u, torch.arange(n), u, y),
                "learned": D.loo_consistency(flat(out.z_syn), src, u, y),
                "noise": D.loo_consistency(flat(noise), src, u, y)}
        margin = float(cfg.margin) if cfg.margin is not None and cfg.loss in (LossName.triplet, LossName.triplet_dws,
                                                                             LossName.dr_triplet) \
            else LOSS_PARAM_DEFAULTS[LossName.triplet]["margin"]
        batches = D.class_balanced_batches(y, cfg.classes_per_batch, cfg.per_class, g)
        if cfg.loss is LossName.npair:  # its own comparisons: raw dot products, no margin
            hardness = lambda z: D.pair_hardness(z, y, batches)  # noqa: E731
            unit = "logits"
        else:
            hardness = lambda z: D.triplet_hardness(z, y, batches, margin)  # noqa: E731
            unit = "margins"
        hard = {"real": hardness(out.z_i), "learned": hardness(out.z_syn), "noise": hardness(noise),
                "unit": unit}
        result = {"n_images": n, "samples": t, "margin": margin, "consistency": cons, "hardness": hard,
                  "batches": int(len(batches))}
        if metric is not None and len(batches):
            passes = [batches] + [D.class_balanced_batches(y, cfg.classes_per_batch, cfg.per_class, g)
                                  for _ in range(-(-GRAD_BATCHES // len(batches)) - 1)]
            result["grad"] = _gradient_vs_baseline(model, metric, x, y, cfg, torch.cat(passes)[:GRAD_BATCHES], g)
        return result
    finally:
        model.train(was)


def _gradient_vs_baseline(model, metric, x, y, cfg, batches, g) -> dict:
    """cos(E[λ3∇Lm(ẑ) + λ4∇Lm(z_I)], ∇Lm(z_I)) on the embedding layer at the current weights, for the learned
    draws and for norm-matched noise, the gradients summed over ``batches`` with ``cfg.samples`` draws each; also
    for each half of the batches (``halves``: how much the estimate moves with the batches drawn)."""
    lam = cfg.lambdas(float(cfg.epochs))  # the weights at the end of the fit (phase 2 when it was reached)
    params = [model.embedding.weight, model.embedding.bias]
    half = max(1, len(batches) // 2)
    acc = [{k: [torch.zeros_like(p) for p in params] for k in ("base", "learned", "noise")} for _ in range(2)]
    for i, idx in enumerate(batches):
        xb, yb = x[idx], y[idx]
        out = model.synthesize(xb, samples=cfg.samples, generator=g, labels=yb)
        base = model.variance_base(out.z_i)
        noise = D.norm_matched_noise(out.z_syn.detach(), base.detach(), g) - base.detach() + base
        m_inv = metric(out.z_i, yb)
        terms = {"base": m_inv, "learned": lam.synthetic * metric(out.z_syn, yb) + lam.invariant * m_inv,
                 "noise": lam.synthetic * metric(noise, yb) + lam.invariant * m_inv}
        for k, v in terms.items():
            for a, gr in zip(acc[min(1, i // half)][k], torch.autograd.grad(v, params, retain_graph=True),
                             strict=True):
                a += gr

    def cosines(parts: list[dict]) -> dict:
        flat = {k: sum(torch.cat([a.flatten() for a in p[k]]) for p in parts) for k in ("base", "learned", "noise")}
        return {"cos_learned": float(F.cosine_similarity(flat["learned"], flat["base"], dim=0)),
                "cos_noise": float(F.cosine_similarity(flat["noise"], flat["base"], dim=0))}

    return {**cosines(acc), "halves": [cosines([a]) for a in acc], "batches": int(len(batches)),
            "lambdas": [lam.synthetic, lam.invariant]}


def checks_from(stats: dict, cmp: dict | None) -> dict:
    """:data:`CHECKS` evaluated on the branch statistics ``stats`` and the learned-vs-noise figures ``cmp``."""
    values = {"active_frac": stats.get("active_frac"), "kl_sum": stats.get("kl_sum")}
    if cmp is not None:
        c, h = cmp["consistency"], cmp["hardness"]
        values["consistency_vs_noise"] = c["learned"] - c["noise"]
        values["hardness_vs_noise"] = (h["learned"]["per_active"] / h["noise"]["per_active"]
                                       if h["noise"]["per_active"] > 0 else None)
        if "grad" in cmp:  # the smaller of the two halves' margins: a verdict the batches drawn cannot flip
            values["grad_vs_noise"] = min(h["cos_noise"] - h["cos_learned"] for h in cmp["grad"]["halves"])
    out = {}
    for key, op, thr, meaning in CHECKS:
        v = values.get(key)
        out[key] = {"value": v, "op": op, "threshold": thr, "ok": _compare(v, op, thr), "meaning": meaning}
    return out


def run_report(run_dir, *, samples: int = 8, max_images: int = 20000) -> dict:
    """Diagnostics of a finished fit-heads run, for ``dvml analyze``.

    Recomputes :func:`~dvml.heads.diagnostics.branch_stats` with the run's reported model on its training
    classes (view 0 of up to ``max_images`` images, 2 seeded draws each), the learned-vs-noise figures
    (:func:`noise_comparison`, ``samples`` draws per image: with fewer, the sampling noise of the two
    consistency shares nears the check's margin) for a DVML run, and reads the training-time ones from
    ``log.jsonl``: the last epoch's loss terms and the phase-2 means of the sampled gradient statistics.
    ``checks`` holds :data:`CHECKS` for a DVML run (``None`` for a baseline).
    """
    from dvml.cache import load_split
    from dvml.heads.config import FitConfig
    from dvml.heads.core import metric_loss
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
    y_raw = np.asarray(train.labels)[rows]
    y = torch.from_numpy(y_raw.astype(np.int64))
    stats = D.heads_branch_stats(model, x, y, samples=2, generator=torch.Generator().manual_seed(cfg.seed))
    log = R.read_log(run_dir)
    last = log[-1] if log else {}
    train_time = {"epochs": len(log), "kl_term": last.get("kl"), "recon_term": last.get("recon"),
                  "metric_synthetic": last.get("metric_synthetic"), "metric_invariant": last.get("metric_invariant")}
    for k in D.GRAD_KEYS + D.GRAD_DRAW_KEYS:
        train_time[f"{k}_phase2"] = D.phase2_mean(log, k)
    out = {"run_dir": str(run_dir), "dvml": cfg.dvml, "variance_source": cfg.variance_source.value,
           "n_images": int(len(rows)), "final": stats, "train_time": train_time, "checks": None, "vs_noise": None}
    if cfg.dvml:
        metric = metric_loss(cfg, len(ckpt["train_classes"]))
        loss_state = {k[len("metric."):]: v for k, v in ckpt.get("loss", {}).items() if k.startswith("metric.")}
        if loss_state:
            metric.load_state_dict(loss_state, strict=False)
        # the metric losses' class ids are 0..C-1 over the run's training classes (proxies index them)
        y_mapped = torch.from_numpy(np.searchsorted(np.asarray(ckpt["train_classes"]), y_raw).astype(np.int64))
        cmp = noise_comparison(model, x, y_mapped, cfg, samples=samples, seed=cfg.seed, metric=metric)
        out["vs_noise"] = cmp
        out["checks"] = checks_from(stats, cmp)
    return out
