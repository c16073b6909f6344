"""Named sets of fit-heads defaults (``--preset``): ``paper`` = every setting as the paper has it, dvml's measured
deviations reverted; ``dvml`` = fit-heads' own defaults (:class:`~dvml.heads.config.HeadsConfig`'s field defaults,
whose phase-2 weights the written protocol ``python -m dvml.experiments.protocols.defaults`` chose: the paper's,
docs/protocol.md; so the two presets differ in the other deviations).

A preset only supplies values for options not given otherwise: fields given explicitly win.
"""

from __future__ import annotations

from dvml.errors import FieldError
from dvml.heads.config import PAPER_PHASE2_LAMBDAS, PAPER_RECON_SHARE, Preset

#: The fields each preset sets (``dvml``: none, the config's defaults are its values). ``paper`` reverts the
#: deviations listed in :mod:`dvml.heads.config`: phase-2 weights and reconstruction share, the L2 reconstruction,
#: z_V added to the raw z_I at unit scale, and Lm(ẑ)'s gradient reaching μ and σ (eq. 12 read literally).
PRESETS: dict[Preset, dict] = {
    Preset.paper: {"lambdas_phase2": PAPER_PHASE2_LAMBDAS, "recon_share": PAPER_RECON_SHARE, "likelihood": "l2",
                   "variance_space": "raw", "variance_scale": "unit", "metric_grad_to_variance": True},
    Preset.dvml: {},
}


def preset_fields(preset: Preset | str, given: set[str] | frozenset[str] = frozenset()) -> dict:
    """The fields ``preset`` sets, without those in ``given`` (options the user set explicitly)."""
    try:
        p = Preset(preset)
    except ValueError:
        raise FieldError(f"`preset` must be one of {', '.join(m.value for m in Preset)}, got {preset!r}") from None
    return {k: v for k, v in PRESETS[p].items() if k not in given}
