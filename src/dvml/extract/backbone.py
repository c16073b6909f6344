"""The backbone: torchvision GoogLeNet with the classifier replaced by identity (1024-D pooled features).

Which GoogLeNet: torchvision's ``googlenet`` is the **batch-norm variant** of Inception v1 whose
ImageNet weights (``GoogLeNet_Weights.IMAGENET1K_V1``) were ported from TensorFlow and expect
``transform_input=True`` (the model re-normalises ImageNet-normalised input to the [-1, 1] scale it was
trained on). The paper used the original Caffe GoogLeNet (no batch norm, BGR mean subtraction), so
absolute numbers differ from the paper's; the pipeline is the same. The feature is the output of the
global average pool, before dropout and the classifier, with the model in ``eval()`` mode (batch norm
uses its running statistics; dropout is off).

``weights``:

* ``"imagenet"``: ``GoogLeNet_Weights.IMAGENET1K_V1``, downloaded by torchvision into the torch hub cache
  (``<torch hub dir>/checkpoints/googlenet-1378be20.pth``). Offline, put that file there or pass its path.
* a path to a state dict in torchvision's GoogLeNet layout (the IMAGENET1K_V1 file itself, or a fine-tuned
  copy; a dict holding it under ``state_dict``/``model``/``backbone`` and ``module.`` prefixes are
  accepted; ``fc.*`` and ``aux*`` entries are dropped). ``transform_input`` defaults to a boolean
  ``transform_input`` entry stored beside the state dict (as ``dvml finetune``'s ``backbone.pt`` has), else
  to True, as for the ImageNet weights.
* ``"none"``: random initialisation, seeded (``init_seed``), for tests and plumbing checks. Convolutions get
  He-normal weights so activations keep unit scale: torchvision's own init (truncated normal, std 0.01)
  shrinks the pooled features to ~1e-11, which float16 stores as zeros. ``transform_input`` defaults to
  False (there is nothing to match).

Preprocessing (resize, crop, mean, std, interpolation) always comes from
``GoogLeNet_Weights.IMAGENET1K_V1.transforms()``: the one place those numbers live. It is recorded in the
cache provenance.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from dvml.errors import DvmlError

log = logging.getLogger(__name__)

BACKBONE_NAME = "torchvision.googlenet"
FEATURE_DIM = 1024


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes network input: resize the shorter side to ``resize`` (``interpolation``,
    antialiased), crop ``crop`` x ``crop``, scale to [0, 1], subtract ``mean`` and divide by ``std``
    (per RGB channel)."""

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def __post_init__(self):
        if not 1 <= self.crop <= self.resize:
            raise ValueError(f"crop must be between 1 and resize ({self.resize}), got {self.crop}")

    def with_sizes(self, resize: int | None = None, crop: int | None = None) -> Preprocess:
        """A copy with other resize/crop sizes (``None`` keeps the current one)."""
        return replace(self, resize=self.resize if resize is None else resize,
                       crop=self.crop if crop is None else crop)

    def normalize(self, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """uint8 images (..., 3, H, W) in [0, 255] -> normalised float (..., 3, H, W) on the same device."""
        mean = torch.tensor(self.mean, device=images.device, dtype=dtype).view(3, 1, 1) * 255
        inv_std = 1.0 / (torch.tensor(self.std, device=images.device, dtype=dtype).view(3, 1, 1) * 255)
        return (images.to(dtype) - mean) * inv_std

    def as_dict(self) -> dict:
        return asdict(self)


def imagenet_preprocess() -> Preprocess:
    """The preprocessing that belongs to ``GoogLeNet_Weights.IMAGENET1K_V1`` (read from its transforms())."""
    from torchvision.models import GoogLeNet_Weights

    t = GoogLeNet_Weights.IMAGENET1K_V1.transforms()
    return Preprocess(resize=int(t.resize_size[0]), crop=int(t.crop_size[0]), mean=tuple(map(float, t.mean)),
                      std=tuple(map(float, t.std)), interpolation=t.interpolation.value)


def imagenet_checkpoint_path() -> Path:
    """Where torchvision looks for (and downloads) the IMAGENET1K_V1 file."""
    from torchvision.models import GoogLeNet_Weights

    filename = GoogLeNet_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


@dataclass
class Backbone:
    """A ready feature extractor. ``model(x)`` maps normalised (B, 3, H, W) to (B, ``feature_dim``)."""

    model: nn.Module
    name: str  # cache attribute "backbone"
    weights: str  # cache attribute "weights": which weights, stable across machines
    preprocess: Preprocess
    transform_input: bool
    feature_dim: int = FEATURE_DIM

    def describe(self) -> dict:
        """Provenance for the cache's ``extra``."""
        return {"backbone": self.name, "weights": self.weights, "transform_input": self.transform_input,
                "preprocess": self.preprocess.as_dict(), "feature_dim": self.feature_dim,
                "feature": "global average pool output (before dropout and fc), model in eval()"}


def _googlenet(*, aux_logits: bool, transform_input: bool) -> nn.Module:
    from torchvision.models import googlenet

    return googlenet(weights=None, aux_logits=aux_logits, transform_input=transform_input, init_weights=False)


def _strip_head(model: nn.Module) -> nn.Module:
    model.fc = nn.Identity()
    model.aux_logits = False
    model.aux1 = None
    model.aux2 = None
    return model.eval()


def _load_state_dict_file(path: Path) -> tuple[dict, str, bool | None]:
    if not path.is_file():
        raise DvmlError(f"--weights {path}: no such file (expected 'imagenet', 'none' or a state dict path)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a non-checkpoint
        if "weights_only" in str(e):  # never repeat torch's advice to load an untrusted pickle unsafely
            raise DvmlError(f"--weights {path}: refused: it holds Python objects other than tensors (it could run "
                            "code when loaded); pass a plain state dict (torch.save(model.state_dict()))") from None
        raise DvmlError(f"--weights {path}: cannot be loaded as a torch state dict ({e})") from None
    stored_ti = obj.get("transform_input") if isinstance(obj, dict) else None
    for key in ("state_dict", "model", "backbone"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DvmlError(f"--weights {path}: not a state dict (a dict of tensors)")
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "aux1.", "aux2."))}
    h = hashlib.blake2b(digest_size=8)
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return state, h.hexdigest(), stored_ti if isinstance(stored_ti, bool) else None


def build_backbone(weights: str | Path = "imagenet", *, transform_input: bool | None = None,
                   init_seed: int = 0) -> Backbone:
    """GoogLeNet with ``fc = Identity``, in ``eval()`` mode, on the CPU, plus its description.

    Args:
        weights: ``"imagenet"``, ``"none"`` or a path to a state dict (see the module docstring).
        transform_input: torchvision's input re-normalisation; ``None`` = the weights' own convention
            (True for ``imagenet``, False for ``none``, for files the value stored in them, else True).
        init_seed: seed of the random initialisation for ``weights="none"``.
    Raises:
        DvmlError: the ImageNet file cannot be downloaded (offline; the message names the path to put it
            at), or a weights file is missing / not a GoogLeNet state dict.
    """
    preprocess = imagenet_preprocess()
    key = str(weights)
    if key.lower() == "imagenet":
        from torchvision.models import GoogLeNet_Weights

        ti = True if transform_input is None else transform_input
        model = _googlenet(aux_logits=True, transform_input=ti)
        try:
            state = GoogLeNet_Weights.IMAGENET1K_V1.get_state_dict(progress=False, check_hash=True)
        except Exception as e:  # URLError, OSError, RuntimeError (hash): all mean "no usable file"
            target = imagenet_checkpoint_path()
            raise DvmlError(
                f"--weights imagenet: cannot load torchvision's GoogLeNet_Weights.IMAGENET1K_V1 ({e}). Offline, "
                f"download {GoogLeNet_Weights.IMAGENET1K_V1.url} elsewhere and put it at {target} "
                f"(the torch hub cache; set TORCH_HOME to move it), or pass --weights PATH to the file"
            ) from None
        model.load_state_dict(state)
        desc = "torchvision:GoogLeNet_Weights.IMAGENET1K_V1"
    elif key.lower() == "none":
        ti = False if transform_input is None else transform_input
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            model = _googlenet(aux_logits=False, transform_input=ti)
            for m in model.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        desc = f"none(random he-normal init, seed={init_seed})"
    else:
        path = Path(weights).expanduser()
        state, digest, stored_ti = _load_state_dict_file(path)
        ti = transform_input if transform_input is not None else (True if stored_ti is None else stored_ti)
        model = _googlenet(aux_logits=False, transform_input=ti)
        model.fc = nn.Identity()
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise DvmlError(f"--weights {path}: does not match torchvision's GoogLeNet: {e}") from None
        desc = f"state_dict:{path.name}:{digest}"
    backbone = Backbone(model=_strip_head(model), name=BACKBONE_NAME, weights=desc, preprocess=preprocess,
                        transform_input=ti)
    log.info("backbone %s, weights %s, transform_input=%s", backbone.name, backbone.weights, ti)
    return backbone
