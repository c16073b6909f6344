"""Test-time embedding with a heads run: z_I only (the test-time output of DVML)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dvml import runs as R
from dvml.runs import RunError


def embedding_layer(ckpt: dict, where: str | Path) -> torch.nn.Linear:
    """The z_I layer of a heads checkpoint (the only part used at test time)."""
    sd = ckpt["model"]
    if "embedding.weight" not in sd or "embedding.bias" not in sd:
        raise RunError(f"{where}: checkpoint has no embedding layer (keys: {', '.join(list(sd)[:6])} ...)")
    w, b = sd["embedding.weight"], sd["embedding.bias"]
    layer = torch.nn.Linear(w.shape[1], w.shape[0])
    layer.load_state_dict({"weight": w, "bias": b})
    return layer.eval()


def embed(run_dir: str | Path, features: np.ndarray, *, batch_size: int = 8192) -> np.ndarray:
    """Embed features with a run's heads: z_I only (the test-time output of DVML).

    Args:
        run_dir: a fit-heads run directory.
        features: (N, D) float array, D the run's feature dimension.
    Returns:
        (N, E) float32 embeddings.
    Raises:
        RunError: not a heads run, or D mismatch.
    """
    ckpt = R.load_checkpoint(run_dir)
    if ckpt.get("kind", R.HEADS_KIND) != R.HEADS_KIND:
        raise RunError(f"{run_dir}: a {ckpt.get('kind')} run; embed() takes fit-heads runs")
    layer = embedding_layer(ckpt, Path(run_dir) / R.HEADS_FILE)
    x = np.asarray(features)
    if x.ndim != 2 or x.shape[1] != layer.in_features:
        raise RunError(f"{run_dir}: features must be (N, {layer.in_features}) (the run's feature dimension), "
                       f"got shape {x.shape}")
    out = np.empty((x.shape[0], layer.out_features), dtype=np.float32)
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(x[i:i + batch_size], dtype=np.float32))
            out[i:i + batch_size] = layer(chunk).numpy()
    return out
