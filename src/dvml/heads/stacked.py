"""Stacked heads fits: M fits that differ only in their seed and continuous hyper-parameters (:data:`MEMBER_FIELDS`),
trained together as one model.

Each parameter carries a leading member axis (M, …) and every layer is a batched matmul (``torch.baddbmm``), so
M small fits cost about one fit's Python and kernel-launch overhead. Nothing couples the members:

* **initialisation**: member i's layers are built exactly as :func:`dvml.heads.fit` builds them for its seed
  (``seed_everything(seed)`` then :class:`~dvml.heads.model.DVMLHeads`), then stacked;
* **batches and views**: member i has its own CPU generator and :class:`~dvml.heads.sampler.ClassBalancedSampler`,
  consumed in the same order (views, then the epoch's batches);
* **noise**: member i's z_V draws and triplet-dws negatives come from its own device generator, in the one-by-one
  order (ε at the forward pass, then the negatives of Lm(z_I), then those of Lm(ẑ)); in the noise control arm
  (``variance_source="noise"``) ε itself is z_V, as in :class:`~dvml.heads.model.DVMLHeads` (μ ≡ 0, log σ² ≡ 0: no
  encoder rows in the stack, KL 0), at the member's own per-batch scale; a stack never mixes the two sources;
* **optimiser**: one Adam over the stacked tensors, which is member i's own Adam (Adam is elementwise: per-member
  moments, same step count); when the members' learning rates differ, the Adam has one parameter group per member
  whose parameters are that member's slices of the stacked tensors (views: the update lands in the stack). The
  losses are summed over members, so each member's gradient is its own (no gradient clipping, no statistic shared
  across members);
* **loss weights and margin**: member i's λ (both phases, ``recon_share``) and ``margin`` are its own (a value per
  member where they differ); the schedule (``phase2_epoch``, the KL warm-up) is shared;
* **batch statistics** (``variance_scale="class"``, the gaussian likelihood's s²): per member.

Metric losses run in their dense block form (:mod:`dvml.losses.dense`): class-balanced batches hold their classes
in contiguous blocks of ``per_class`` rows, so every member's anchors, positives and negatives have one fixed shape.

What stacks (:func:`stack_reason` says why not otherwise): the losses ``triplet``, ``npair`` and
``triplet-dws``, base, DVML and the noise control arm, with any variance space / scale, likelihood, reductions,
synthetic pairs, free bits and metric-gradient option; not the triplet input, validation classes (the best-epoch
selection), ``centre_mu``, standardised targets or proxy losses. Those fits run one by one.

Outputs per member are those of a one-by-one fit: ``config.json`` (plus ``"trainer": "stacked"`` and the group),
``log.jsonl`` (per-epoch terms, branch diagnostics, sampled gradient statistics, watch-only test Recall@1; the
epoch's ``seconds`` is the member's share of the group's time), ``heads.pt`` with the same entries (model, loss,
the member's own Adam state and generator states). The checkpoint is written when the group finishes, not after
every epoch (a stacked fit does not resume: an interrupted ablation refits its unfinished cells).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dvml import runs as R
from dvml.cache import Split, fingerprint, read_info
from dvml.errors import DvmlError
from dvml.files import make_dir
from dvml.heads import diagnostics as diag
from dvml.heads.batch import fit_batch
from dvml.heads.config import FitConfig, Lambdas, Likelihood, Reduction, VarianceScale, VarianceSource, VarianceSpace
from dvml.heads.core import Callback, FitEvent, dvml_loss, epoch_record, metric_loss, optimizer, start_log
from dvml.heads.model import DVMLHeads
from dvml.heads.objective import TERMS
from dvml.heads.sampler import ClassBalancedSampler
from dvml.heads.train import _check_split, _prepare_dir, _recall_at_1, resolve_device
from dvml.losses import dense
from dvml.losses.names import LossName, SyntheticPairs
from dvml.seeding import diag_seeds, noise_seed, seed_everything

log = logging.getLogger(__name__)

#: The losses with a dense stacked form.
STACKED_LOSSES = (LossName.triplet, LossName.npair, LossName.triplet_dws)
#: Fields that may differ between the members of one stack (everything else must be equal): the seed and run
#: directory, and the continuous hyper-parameters ``dvml tune`` searches that change no shape: the learning rate
#: (each member its own Adam parameter group), the λ of both phases and ``recon_share`` (a weight per member and
#: term), and the metric loss's ``margin`` (a margin per member). The schedule (``phase2_epoch``, the KL warm-up)
#: stays shared: it decides which parts of the graph carry gradient.
MEMBER_FIELDS = ("seed", "out", "lr", "lambdas_phase1", "lambdas_phase2", "recon_share", "margin")
#: The FitConfig fields the stacked trainer implements; a field added later (a new option of the heads) makes a fit
#: fall back to one by one unless it has its default value, so a stack never silently ignores an option.
STACKED_FIELDS = frozenset({
    "loss", "dvml", "embedding_size", "decoder_hidden", "samples", "epochs", "phase2_epoch", "kl_warmup_epochs",
    "lambdas_phase1", "lambdas_phase2", "recon_share", "reduction", "metric_reduction", "likelihood", "standardize",
    "free_bits", "variance_space", "variance_scale", "variance_kappa", "metric_grad_to_variance", "centre_mu",
    "variance_source", "synthetic_pairs", "lr", "proxy_lr", "weight_decay", "batch_size", "per_class", "margin",
    "gamma", "temperature", "label_smoothing", "seed", "cache", "out", "triplet_input", "device", "eval_every",
    "val_classes", "diag_images", "grad_every", "resume", "overwrite",
    "batch_size_given",  # derived from batch_size; fit_batch reads it for every member as fit() does
    "preset"})  # a label: the values it filled in are the fields above
_LOG_2PI = float(np.log(2.0 * np.pi))


def stack_reason(cfg: FitConfig) -> str | None:
    """Why ``cfg`` cannot train in a stack (a one-line reason), or None when it can."""
    if cfg.loss not in STACKED_LOSSES:
        return (f"the loss {cfg.loss.value} has no stacked form (stacked: "
                f"{', '.join(n.value for n in STACKED_LOSSES)})")
    if cfg.triplet_input:
        return "the triplet input draws triplets, not class blocks"
    if cfg.val_classes:
        return "val_classes selects each fit's best epoch on its own validation classes"
    if cfg.centre_mu:
        return "centre_mu is not stacked"
    if cfg.standardize:
        return "standardize is not stacked"
    for f in dataclasses.fields(cfg):
        if f.name not in STACKED_FIELDS and f.default is not dataclasses.MISSING and getattr(cfg, f.name) != f.default:
            return f"the option {f.name} is not stacked"
    return None


def group_key(cfg: FitConfig) -> tuple:
    """Fits with equal keys may share a stack (they differ only in :data:`MEMBER_FIELDS`)."""
    d = cfg.to_dict()
    return tuple(sorted((k, repr(v)) for k, v in d.items() if k not in MEMBER_FIELDS))


class _Stack:
    """The stacked parameters of M DVMLHeads: ``w_in`` (M, k·E, D) / ``b_in`` (M, k·E) hold the embedding, μ and
    log σ² layers (k = 3; k = 1 for the baseline and the noise arm, which have no μ, log σ² layers), ``w1, b1, w2,
    b2`` the decoder (DVML and the noise arm). ``learned``: whether the members have the μ, log σ² layers."""

    def __init__(self, models: list[DVMLHeads]):
        first = models[0]
        self.dvml, self.e = first.dvml, first.embedding_size
        self.learned = self.dvml and first.variance_source is VarianceSource.learned
        if any((m.dvml, m.variance_source) != (first.dvml, first.variance_source) for m in models):
            raise ValueError("the members of a stack share dvml and variance_source")
        layers = ["embedding", "mu", "logvar"] if self.learned else ["embedding"]

        def stack(get):
            return torch.stack([get(m) for m in models]).detach().clone().requires_grad_(True)

        self.w_in = stack(lambda m: torch.cat([getattr(m, n).weight for n in layers]))
        self.b_in = stack(lambda m: torch.cat([getattr(m, n).bias for n in layers]))
        self.params = [self.w_in, self.b_in]
        if self.dvml:
            self.w1 = stack(lambda m: m.decoder.hidden.weight)
            self.b1 = stack(lambda m: m.decoder.hidden.bias)
            self.w2 = stack(lambda m: m.decoder.out.weight)
            self.b2 = stack(lambda m: m.decoder.out.bias)
            self.params += [self.w1, self.b1, self.w2, self.b2]

    def member(self, i: int, source: dict[int, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Member i's tensors under DVMLHeads' state-dict names, from the parameters or, with ``source``
        (id(stacked parameter) → tensor of its shape, e.g. an Adam moment), from those."""
        def get(p):
            return (p if source is None else source[id(p)])[i]

        e = self.e
        w, b = get(self.w_in), get(self.b_in)
        out = {"embedding.weight": w[:e], "embedding.bias": b[:e]}
        if self.learned:
            out.update({"mu.weight": w[e:2 * e], "mu.bias": b[e:2 * e], "logvar.weight": w[2 * e:],
                        "logvar.bias": b[2 * e:]})
        if self.dvml:
            out.update({"decoder.hidden.weight": get(self.w1),
                        "decoder.hidden.bias": get(self.b1), "decoder.out.weight": get(self.w2),
                        "decoder.out.bias": get(self.b2)})
        return {k: v.detach().clone() for k, v in out.items()}

    def embed(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Member i's test-time embedding of x (N, D) → (N, E) (as ``DVMLHeads.embed``)."""
        return F.linear(x, self.w_in[i, :self.e], self.b_in[i, :self.e])


class _SquaredError(torch.autograd.Function):
    """Each member's summed squared error: x_hat (M, T, B, D), x (M, 1, B, D) (no gradient) → (M,).

    What ``(x_hat - x).square().sum(dim=(1, 2, 3))`` computes, with one full-size temporary instead of four (the
    difference; the norm is a reduction, and the backward is one product ``2 (x_hat − x) g``): on the CPU the
    decoder's output is the stacked fit's largest tensor and these passes are memory-bound."""

    @staticmethod
    def forward(ctx, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:
            raise ValueError("the reconstruction target takes no gradient")
        diff = x_hat - x
        ctx.save_for_backward(diff)
        return torch.linalg.vector_norm(diff.reshape(diff.shape[0], -1), dim=1).square()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (diff,) = ctx.saved_tensors
        return diff * (2.0 * grad).view(-1, *([1] * (diff.dim() - 1))), None


class StackedFit:
    """M heads fits trained together (see the module docstring).

    Args:
        cfgs: the members' configs: each stackable (:func:`stack_reason`), equal but for :data:`MEMBER_FIELDS`.
        train: the cache's training split, preloaded (features (N, P, D)).
        test: its test split (view 0 for the watch-only Recall@1); needed when ``eval_every`` > 0.
    Raises:
        ValueError: a config that does not stack, or configs that differ in more than :data:`MEMBER_FIELDS`.
        DvmlError: as :func:`dvml.heads.fit` (bad cache, a run directory holding a run).
    """

    def __init__(self, cfgs: list[FitConfig], train: Split, test: Split | None = None):
        if not cfgs:
            raise ValueError("a stack needs at least one fit")
        for c in cfgs:
            why = stack_reason(c)
            if why:
                raise ValueError(f"{c.out}: {why}")
        if len({group_key(c) for c in cfgs}) != 1:
            raise ValueError(f"stacked fits must differ only in {', '.join(MEMBER_FIELDS)}")
        views = train.features.shape[1]
        fitted = [fit_batch(c, train.labels, where=str(c.cache), views=views) for c in cfgs]
        self.cfgs = [c for c, _ in fitted]
        self.cfg = cfg = self.cfgs[0]
        self.m_count = len(cfgs)
        for c in self.cfgs:
            if _prepare_dir(c) is not None:
                raise DvmlError(f"{c.out}: a stacked fit does not resume a run; refit it from scratch")
        self.info = read_info(cfg.cache)
        fp = fingerprint(cfg.cache)
        self.device = device = resolve_device(cfg.device)
        self._load_data(train, test)
        n, p, d = self.dims
        self.models, self.losses, self.torch_states = [], [], []
        self.gen_cpu, self.gen_dev, self.samplers = [], [], []
        for c in self.cfgs:  # member i as dvml.heads.fit builds it
            seed_everything(c.seed)
            model = DVMLHeads(d, **c.heads_kwargs()).to(device)
            self.torch_states.append(torch.get_rng_state())
            loss_fn = dvml_loss(c, metric_loss(c, len(self.train_classes))).to(device)
            if list(loss_fn.parameters()):
                raise ValueError(f"{c.out}: a loss with parameters does not stack")
            g_cpu = torch.Generator().manual_seed(c.seed)
            g_dev = torch.Generator(device=device).manual_seed(noise_seed(c.seed))
            if hasattr(loss_fn.metric, "generator"):
                loss_fn.metric.generator = g_dev
            self.models.append(model)
            self.losses.append(loss_fn)
            self.gen_cpu.append(g_cpu)
            self.gen_dev.append(g_dev)
            self.samplers.append(ClassBalancedSampler(torch.from_numpy(self.y_mapped), c.batch_size, c.per_class,
                                                      g_cpu, views=p))
        self.stack = _Stack(self.models)
        self._optimizer_setup()
        self.margin = self._per_member([c.margin for c in self.cfgs])
        self.steps = len(self.samplers[0])
        self.m = cfg.per_class
        self._diag_setup()
        self.headers = [{"kind": R.HEADS_KIND, "cache": str(Path(c.cache).resolve()), "cache_fingerprint": fp,
                         "seed": c.seed, "versions": R.versions(), "batch": note,
                         "trainer": "stacked", "stack": {"members": [str(o.out.name) for o in self.cfgs]}}
                        for c, (_, note) in zip(self.cfgs, fitted, strict=True)]

    # -- data ------------------------------------------------------------------------------------------------
    def _load_data(self, train: Split, test: Split | None) -> None:
        cfg, info, device = self.cfg, self.info, self.device
        _check_split(train, "train", cfg.cache, info.feature_dim)
        self.test_t = self.test_y = self.test_roles = None
        if cfg.eval_every:
            if test is None:
                raise ValueError("eval_every needs the test split")
            _check_split(test, "test", cfg.cache, info.feature_dim)
            self.test_t = torch.from_numpy(np.ascontiguousarray(test.features[:, 0], dtype=np.float32)).to(device)
            self.test_y, self.test_roles = np.asarray(test.labels), getattr(test, "roles", None)
        self.dims = train.features.shape
        self.train_classes, self.y_mapped = np.unique(train.labels, return_inverse=True)
        self.feats = torch.from_numpy(np.ascontiguousarray(train.features)).to(device)
        self.labels = torch.from_numpy(self.y_mapped.astype(np.int64)).to(device)

    def _diag_setup(self) -> None:
        """Each member's diagnostic subset, as :class:`dvml.heads.train._HeadsFit` draws it."""
        self.diag = []
        for c in self.cfgs:
            idx = torch.randperm(self.dims[0], generator=torch.Generator().manual_seed(diag_seeds(c.seed)[0]))
            idx = torch.sort(idx[:c.diag_images]).values.to(self.device)
            self.diag.append((self.feats[idx, 0].float(), self.labels[idx]) if len(idx) else None)

    def _optimizer_setup(self) -> None:
        """One Adam over the stacked tensors when the members share their lr; otherwise one parameter group per
        member (``self.member_params[i]``: member i's views of the stacked tensors, its lr and weight decay)."""
        self.member_params: list[list[torch.Tensor]] | None = None
        if len({c.lr for c in self.cfgs}) == 1:
            self.optimizer = optimizer(self.cfg, self.stack.params, [], fused=True)
            return
        self.member_params = [[p.detach()[i] for p in self.stack.params] for i in range(self.m_count)]
        groups = [{"params": views, "lr": c.lr, "weight_decay": c.weight_decay}
                  for c, views in zip(self.cfgs, self.member_params, strict=True)]
        try:  # as dvml.heads.core.optimizer: the fused kernel where it exists
            self.optimizer = torch.optim.Adam(groups, fused=True)
        except (RuntimeError, TypeError):
            self.optimizer = torch.optim.Adam(groups)

    def _zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.stack.params:  # with member groups the optimiser holds views, not the stacked tensors
            p.grad = None

    def _optimizer_step(self) -> None:
        """Adam's step on the stacked gradients (each member's group reads its slice of them)."""
        if self.member_params is not None:
            for p_i, p in enumerate(self.stack.params):
                for i, views in enumerate(self.member_params):
                    views[p_i].grad = None if p.grad is None else p.grad[i]
        self.optimizer.step()

    def _per_member(self, values: list[float | None]) -> float | torch.Tensor | None:
        """A value shared by every member as itself; differing values as an (M,) float32 tensor."""
        if len(set(values)) == 1:
            return values[0]
        return torch.tensor(values, dtype=torch.float32, device=self.device)

    def lambdas(self, time_: float) -> Lambdas:
        """The members' weights at (fractional) epoch ``time_``: the shared :class:`Lambdas` when they agree, else
        each weight an (M,) tensor (the phase and the stopped reconstruction gradient are shared)."""
        lams = [c.lambdas(time_) for c in self.cfgs]
        if len(set(lams)) == 1:
            return lams[0]
        if len({(lam.stop_recon_grad, lam.phase) for lam in lams}) != 1:  # group_key makes the schedule shared
            raise RuntimeError("the members of a stack are in different phases")
        w = torch.tensor([lam[:4] for lam in lams], dtype=torch.float32, device=self.device).T  # (4, M)
        return Lambdas(*w.unbind(0), stop_recon_grad=lams[0].stop_recon_grad, phase=lams[0].phase)

    def member_model(self, i: int) -> DVMLHeads:
        """Member i's current heads as a :class:`DVMLHeads` (a copy)."""
        model = self.models[i]
        model.load_state_dict(self.stack.member(i))
        return model

    # -- the stacked step ------------------------------------------------------------------------------------
    def draw_eps(self, shape: tuple[int, ...]) -> torch.Tensor:
        """(M, T, B, E) standard-normal noise, member i's from its own generator."""
        return torch.stack([torch.randn(shape, generator=g, device=self.device) for g in self.gen_dev])

    def _margin(self, t: int, dims: int) -> float | torch.Tensor:
        """The margin of each of the M·T batches, shaped to broadcast against a (M·T, …) tensor of ``dims`` dims."""
        if not isinstance(self.margin, torch.Tensor):
            return self.margin
        return self.margin.repeat_interleave(t).view(-1, *([1] * (dims - 1)))

    def _metric(self, z: torch.Tensor, anchors: torch.Tensor | None) -> torch.Tensor:
        """Lm of each member's T batches (M, T, B, E), mean over T → (M,)."""
        cfg, m = self.cfg, self.m
        mm, t, b, e = z.shape
        flat = z.reshape(mm * t, b, e)
        anc = None if anchors is None else anchors[:, None].expand(mm, t, b, e).reshape(mm * t, b, e)
        if cfg.loss is LossName.npair:
            v = dense.block_npair(flat, anchors=anc)
        elif cfg.loss is LossName.triplet:  # the hinge is (M·T, C, m, m, B)
            v = dense.block_triplet(flat, m, margin=self._margin(t, 5), squared=True, reducer=cfg.metric_reduction,
                                    anchors=anc)
        else:
            d = dense.distances(flat, squared=False, anchors=anc)
            n, valid = dense.dws_draws(d.detach().view(mm, t, b, b), m, e, self.gen_dev)
            k = n.shape[-1]
            v = dense.dws_triplet(d, n.reshape(mm * t, k), valid.reshape(mm * t, k), m, margin=self._margin(t, 2),
                                  reducer=cfg.metric_reduction)
        return v.view(mm, t).mean(dim=1)

    def terms(self, x: torch.Tensor, y: torch.Tensor, lam, eps: torch.Tensor | None = None) -> torch.Tensor:
        """Every member's loss terms for its batch: x (M, B, D), y (M, B) in class blocks → (M, 5) in
        :data:`~dvml.heads.objective.TERMS` order (``total`` is what is summed and backpropagated).
        ``lam``: :meth:`lambdas` (floats, or (M,) tensors). ``eps`` (M, T, B, E): noise to use instead of drawing
        it (DVML)."""
        cfg, st = self.cfg, self.stack
        e, mm, b = st.e, x.shape[0], x.shape[1]
        h = torch.baddbmm(st.b_in.unsqueeze(1), x, st.w_in.transpose(1, 2))  # (M, B, k·E)
        z_i = h[..., :e]
        if not st.dvml:
            m_inv = self._metric(z_i.unsqueeze(1), None)
            zero = m_inv.detach() * 0.0
            return torch.stack([zero, zero, m_inv, zero, m_inv], dim=1)
        if st.learned:
            mu, logvar = h[..., e:2 * e], h[..., 2 * e:]
        else:  # the noise arm, as DVMLHeads computes it: μ ≡ 0, log σ² ≡ 0 (no gradient), so z_V = ε and KL = 0
            mu = logvar = z_i.new_zeros(z_i.shape).detach()
        if eps is None:
            eps = self.draw_eps((cfg.samples, b, e))
        z_v = mu.unsqueeze(1) + (0.5 * logvar).exp().unsqueeze(1) * eps  # (M, T, B, E)
        base = z_i if cfg.variance_space is VarianceSpace.raw else F.normalize(z_i, dim=-1)
        if cfg.variance_scale is VarianceScale.unit:
            scale = cfg.variance_kappa
        else:  # per member: the batch's pooled within-class std of base (blocks of m = the classes)
            bd = base.detach()
            c = b // self.m
            means = bd.view(mm, c, self.m, e).mean(dim=2, keepdim=True)
            dev = (bd.view(mm, c, self.m, e) - means).square().sum(dim=(1, 2, 3))
            scale = (cfg.variance_kappa * (dev / (max(1, b - c) * e)).sqrt()).view(mm, 1, 1, 1)
        base_t = base.unsqueeze(1)
        z_syn = base_t + scale * z_v
        z_syn_metric = z_syn if cfg.metric_grad_to_variance else base_t + scale * z_v.detach()
        dec_in = (base_t.detach() + scale * z_v) if lam.stop_recon_grad else z_syn
        t = dec_in.shape[1]
        hid = torch.tanh(torch.baddbmm(st.b1.unsqueeze(1), dec_in.reshape(mm, t * b, e), st.w1.transpose(1, 2)))
        x_hat = torch.baddbmm(st.b2.unsqueeze(1), hid, st.w2.transpose(1, 2))  # (M, T·B, D)
        anchors = z_i if cfg.synthetic_pairs is SyntheticPairs.cross else None
        m_inv = self._metric(z_i.unsqueeze(1), None)
        kl = self._kl(mu, logvar)
        recon = self._recon(x, x_hat.view(mm, t, b, -1))
        m_syn = self._metric(z_syn_metric, anchors)
        total = lam.kl * kl + lam.recon * recon + lam.synthetic * m_syn + lam.invariant * m_inv
        return torch.stack([kl, recon, m_inv, m_syn, total], dim=1)

    def _kl(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        per = 0.5 * (logvar.exp() + mu.square() - 1.0 - logvar)  # (M, B, E)
        if cfg.free_bits > 0:
            per_dim = per.mean(dim=1).clamp_min(cfg.free_bits)
            return per_dim.sum(dim=1) if cfg.reduction is Reduction.sum else per_dim.mean(dim=1)
        return per.sum(dim=-1).mean(dim=1) if cfg.reduction is Reduction.sum else per.mean(dim=(1, 2))

    def _recon(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        mm, t, b, d = x_hat.shape
        # no per-member slices of x_hat: each slice's backward would zero-fill a whole (M, T·B, D) gradient
        total = _SquaredError.apply(x_hat, x.unsqueeze(1))  # (M,)
        if cfg.likelihood is Likelihood.gaussian:
            mse = total / (t * b * d)
            per_dim = 0.5 * (torch.log(mse.clamp_min(1e-12)) + 1.0 + _LOG_2PI)
            return per_dim * (d if cfg.reduction is Reduction.sum else 1.0)
        return total / (t * b if cfg.reduction is Reduction.sum else t * b * d)

    # -- training --------------------------------------------------------------------------------------------
    def train(self, callback=None) -> list[Path]:
        """Train every member for ``epochs`` epochs and write its run directory; returns them.

        ``callback(i, FitEvent)`` receives member i's events (as :func:`dvml.heads.fit`'s callback)."""
        cfg, cfgs = self.cfg, self.cfgs
        with contextlib.ExitStack() as locks:
            for c in cfgs:
                locks.enter_context(R.run_writer(c.out))
            for i, c in enumerate(cfgs):
                make_dir(c.out)
                start_log(c.out, None)
                R.invalidate_metrics(c.out)
                self.write_config(i, "running", 0)
                if callback:
                    callback(i, FitEvent("start", 0, c.epochs, 0, self.steps))
            n, p, d = self.dims
            log.info("stacked fit-heads: %d members (seeds %s), %d train images x %d views x %d-D, %s loss%s, "
                     "%d epochs x %d steps on %s", len(cfgs), ",".join(str(c.seed) for c in cfgs), n, p, d,
                     cfg.loss.value, "" if cfg.dvml else " (no DVML)", cfg.epochs, self.steps, self.device)
            for epoch in range(cfg.epochs):
                t0 = time.perf_counter()
                means, grads = self._epoch(epoch, callback)
                dt = (time.perf_counter() - t0) / len(cfgs)  # each member's share
                last = epoch + 1 == cfg.epochs
                for i, c in enumerate(cfgs):
                    record = epoch_record(c, epoch, means[i], dt, self.steps * c.batch_size / dt)
                    record.update(self._diagnostics(i, grads[i]))
                    if c.eval_every and ((epoch + 1) % c.eval_every == 0 or last):
                        with torch.no_grad():
                            record["test_recall@1"] = _recall_at_1(self.stack.embed(i, self.test_t), self.test_y,
                                                                   self.test_roles)
                    R.append_log(c.out, record)
                    if callback:
                        callback(i, FitEvent("epoch", epoch + 1, c.epochs, self.steps, self.steps, record))
            for i, c in enumerate(cfgs):
                self.save(i, c.epochs)
                self.write_config(i, "finished", c.epochs)
                if callback:
                    callback(i, FitEvent("end", c.epochs, c.epochs, self.steps, self.steps))
        return [c.out for c in cfgs]

    def _epoch(self, epoch: int, callback) -> tuple[list[list[float]], list[list[dict]]]:
        cfg, steps, device, mm = self.cfg, self.steps, self.device, self.m_count
        n, p = self.dims[:2]
        views, batches, ranks = [], [], []
        for g, s in zip(self.gen_cpu, self.samplers, strict=True):  # each member's draws, in fit's order
            views.append(torch.randint(p, (n,), generator=g))
            bt, rk = s.epoch_with_ranks()
            batches.append(bt)
            ranks.append(rk)
        views = torch.stack(views).to(device)  # (M, N)
        batches, ranks = torch.stack(batches).to(device), torch.stack(ranks).to(device)  # (M, steps, B)
        if not dense.is_block_layout(self.labels[batches], self.m):
            raise RuntimeError("the sampler's batches are not in class blocks")
        sums = torch.zeros((mm, len(TERMS)), device=device)
        finite = torch.ones((steps, mm), dtype=torch.bool, device=device)
        grads: list[list[dict]] = [[] for _ in range(mm)]
        for step in range(steps):
            idx = batches[:, step]  # (M, B)
            x = self.feats[idx, (views.gather(1, idx) + ranks[:, step]) % p].float()  # (M, B, D)
            y = self.labels[idx]
            lam = self.lambdas(epoch + step / steps)
            if cfg.dvml and cfg.grad_every and (step == 0 or (epoch * steps + step) % cfg.grad_every == 0):
                for i, c in enumerate(self.cfgs):
                    grads[i].append(self._step_gradients(i, x[i], y[i], c.lambdas(epoch + step / steps)))
            values = self.terms(x, y, lam)
            self._zero_grad()
            values[:, -1].sum().backward()
            self._optimizer_step()
            values = values.detach()
            finite[step] = torch.isfinite(values).all(dim=1)
            sums += values
            if callback:
                for i, c in enumerate(self.cfgs):
                    callback(i, FitEvent("step", epoch, c.epochs, step + 1, steps))
        bad = torch.nonzero(~finite)
        if bad.numel():
            step, i = (int(v) for v in bad[0])
            raise DvmlError(f"{self.cfgs[i].out}: non-finite loss at epoch {epoch + 1}, step {step + 1} of {steps} "
                            f"({cfg.loss.value}, lr {self.cfgs[i].lr}, stacked with {mm - 1} other fit(s)); no "
                            "checkpoint of this stack was written; check the features for NaN/inf or lower --lr")
        return (sums / steps).tolist(), grads

    def _step_gradients(self, i: int, x: torch.Tensor, y: torch.Tensor, lam) -> dict:
        """Member i's sampled gradient statistics (:func:`dvml.heads.diagnostics.step_gradients`), from a replay of
        its step on a one-member copy with its noise generator put back afterwards (the fit is unchanged)."""
        model, loss_fn, g = self.member_model(i), self.losses[i], self.gen_dev[i]
        state = g.get_state()
        out = model(x, samples=self.cfg.samples, stop_recon_grad=lam.stop_recon_grad, generator=g, labels=y)
        terms = loss_fn(out, x, y, lam)
        stats = diag.step_gradients(loss_fn, out, x, y, lam, terms, [model.embedding.weight, model.embedding.bias],
                                    g)
        g.set_state(state)
        return stats

    def _diagnostics(self, i: int, grad_stats: list[dict]) -> dict:
        out: dict = {}
        if self.diag[i] is not None:
            x, y = self.diag[i]
            g = torch.Generator(device=self.device).manual_seed(diag_seeds(self.cfgs[i].seed)[1])
            out.update(diag.heads_branch_stats(self.member_model(i), x, y, samples=2, generator=g))
        if grad_stats:
            for k in dict.fromkeys(k for gs in grad_stats for k in gs):
                out[k] = float(np.mean([gs[k] for gs in grad_stats if k in gs]))
            out["grad_samples"] = len(grad_stats)
        return out

    # -- outputs ---------------------------------------------------------------------------------------------
    def write_config(self, i: int, status: str, done: int) -> None:
        c = self.cfgs[i]
        R.write_config(c.out, {**self.headers[i], "config": c.to_dict(), "status": status, "epochs_done": done,
                               "dataset": self.info.dataset})

    def _optimizer_state(self, i: int) -> dict:
        """Member i's Adam state dict, as its one-by-one optimiser would hold it."""
        c, model = self.cfgs[i], self.member_model(i)
        names = [k for k, _ in model.named_parameters()]
        full = self.optimizer.state_dict()
        if self.member_params is None:  # one group over the stacked tensors: member i's slice of each moment
            group = full["param_groups"][0]
            by_id = {id(p): self.optimizer.state[p] for p in self.stack.params if p in self.optimizer.state}
        else:  # member i's group: its views' moments, each indexed by member like a stacked tensor
            group = full["param_groups"][i]
            by_id = {id(p): {k: {i: v} for k, v in self.optimizer.state[view].items()}
                     for p, view in zip(self.stack.params, self.member_params[i], strict=True)
                     if view in self.optimizer.state}
        one = optimizer(c, model.parameters(), [], fused=True).state_dict()
        if by_id:
            moments = {k: self.stack.member(i, {pid: s[k] for pid, s in by_id.items()})
                       for k in ("exp_avg", "exp_avg_sq")}
            step = next(iter(by_id.values()))["step"]
            step = step[i] if isinstance(step, dict) else step
            one["state"] = {j: {"step": step.detach().clone(), "exp_avg": moments["exp_avg"][name],
                                "exp_avg_sq": moments["exp_avg_sq"][name]} for j, name in enumerate(names)}
        one["param_groups"][0].update({k: v for k, v in group.items() if k != "params"})
        return one

    def save(self, i: int, done: int) -> None:
        c, device = self.cfgs[i], self.device
        model_sd = R.cpu_state(self.member_model(i).state_dict())
        loss_sd = R.cpu_state(self.losses[i].state_dict())
        rng = {"sampler": self.gen_cpu[i].get_state(), "noise": self.gen_dev[i].get_state(),
               "torch": self.torch_states[i],
               "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        R.save_heads(
            c.out, **self.headers[i], config=c.to_dict(), in_dim=self.dims[2], embedding_size=c.embedding_size,
            train_classes=[int(v) for v in self.train_classes], dataset=self.info.dataset, model=model_sd,
            loss=loss_sd, epoch=done, selection="last", epochs_done=done, finished=True,
            resume={"model": model_sd, "loss": loss_sd, "optimizer": R.cpu_state(self._optimizer_state(i)),
                    "rng": rng, "best": None})


def fit_stacked(cfgs: list[FitConfig], *, train: Split, test: Split | None = None,
                callback: Callback | None = None) -> list[Path]:
    """Fit the heads of ``cfgs`` as one stack (:class:`StackedFit`) and write their run directories."""
    t0 = time.perf_counter()
    outs = StackedFit(cfgs, train, test).train(callback)
    log.info("stacked fit-heads done in %.1fs: %d fits", time.perf_counter() - t0, len(outs))
    return outs
