"""Backbones: any frozen network that maps normalised images to one feature vector, with its own preprocessing.

:func:`load_backbone` ``(spec, weights) -> Backbone`` (``.model``: normalised float (B, 3, crop, crop) ->
(B, ``feature_dim``), in ``eval()``; ``.preprocess``: how an image becomes that input). ``spec`` is one of

* ``googlenet`` (default, the paper's network) or any torchvision classification model by name
  (``resnet50``, ``efficientnet_b0``, ``convnext_tiny``, ``vit_b_16``, ``inception_v3``, ...; also spelt
  ``torchvision:NAME`` or ``torchvision.NAME``, the form stored in the cache's ``backbone`` attribute).
  The feature is the **input of the classifier's last Linear layer**, which is replaced by identity
  (ResNet/GoogLeNet/Inception ``fc``, EfficientNet/ConvNeXt/MobileNet ``classifier[-1]``, ViT
  ``heads.head``, Swin ``head``): the pooled (or class-token) output, with the model in ``eval()``
  (batch norm uses its running statistics; dropout is off). A model with no Linear classifier (SqueezeNet)
  is refused. Preprocessing comes from the weights enum's ``transforms()`` (the DEFAULT weights' when
  ``weights="none"``: they describe the input the architecture was built for; nothing is downloaded);
* ``timm:NAME`` (``timm:vit_small_patch14_dinov2.lvd142m``, ``timm:resnet50.a1_in1k``), needs the optional
  ``timm`` extra: ``timm.create_model(NAME, num_classes=0)`` (timm's pooled pre-logits features), the
  preprocessing from timm's pretrained config (``input_size``, ``crop_pct`` -> resize = floor(crop / crop_pct),
  mean, std, interpolation);
* a **torch.export file** (``.pt2``, written by :func:`save_exported`: the format current PyTorch maintains) or a
  **TorchScript file** (any other path; ``torchscript:PATH`` also works): normalised float (B, 3, crop, crop)
  in, (B, D) features out. Its preprocessing is stored inside it (``dvml_preprocess.json``, written by
  :func:`save_exported` / :func:`save_torchscript`) or given by options (crop, mean, std, and optionally
  resize, interpolation). A TorchScript file is a program: load only files you trust.

``weights``:

* ``"imagenet"``: the network's pretrained weights -- torchvision's DEFAULT enum member (any member name,
  e.g. ``IMAGENET1K_V2``, also works), timm's default pretrained tag (from the Hugging Face hub). Offline,
  they must already be in the torch hub cache (``<torch hub dir>/checkpoints/<file>``) or the Hugging Face
  cache; if they are not, one :class:`~dvml.errors.DvmlError` names the file or hub entry and that directory.
  For a TorchScript file the weights are inside it and this option is ignored.
* a path to a state dict in the network's own layout (``state_dict``/``model``/``backbone`` wrappers and
  ``module.`` prefixes accepted; the classifier's and auxiliary heads' entries are dropped);
* ``"none"``: seeded random initialisation (``init_seed``), for tests and plumbing checks. GoogLeNet's
  convolutions get He-normal weights so activations keep unit scale (torchvision's own init shrinks the
  pooled features to ~1e-11, which float16 stores as zeros).

``transform_input`` (torchvision GoogLeNet and Inception v3 only): the model re-normalises ImageNet-normalised
input to the [-1, 1] scale their TensorFlow-ported weights expect. Default: on for ``imagenet`` and state dict
files (a boolean ``transform_input`` stored beside the state dict, as ``dvml finetune``'s ``backbone.pt`` has,
wins), off for ``none``.

Which GoogLeNet: torchvision's ``googlenet`` is the batch-norm variant of Inception v1 (ImageNet weights ported
from TensorFlow); the paper used the original Caffe GoogLeNet (no batch norm, BGR mean subtraction), so absolute
numbers differ from the paper's; the pipeline is the same.

Everything the cache needs comes from here, never retyped: ``Backbone.name`` (cache ``backbone``),
``Backbone.weights`` (cache ``weights``: enum name, timm tag, or a content hash of a file),
``feature_dim``, and :class:`Preprocess` (stored as the cache's ``preprocess`` attribute;
:meth:`Preprocess.from_dict` reads it back).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from dvml.errors import DvmlError
from dvml.extract.config import DEFAULT_BACKBONE as DEFAULT_BACKBONE  # re-exported: the light home of these
from dvml.extract.config import INTERPOLATIONS as INTERPOLATIONS
from dvml.extract.config import BackboneKind as BackboneKind
from dvml.extract.config import BackboneSpec as BackboneSpec
from dvml.extract.config import parse_spec as parse_spec

log = logging.getLogger(__name__)

BACKBONE_NAME = "torchvision.googlenet"  # the default backbone's cache name
FEATURE_DIM = 1024  # the default backbone's feature dimension
TORCHSCRIPT_EXTRA = "dvml_preprocess.json"  # the file inside a TorchScript archive holding its preprocessing
TRANSFORM_INPUT_MODELS = ("googlenet", "inception_v3")


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes network input: resize the shorter side to ``resize`` (``interpolation``,
    antialiased), centre crop ``crop`` x ``crop``, scale to [0, 1], subtract ``mean`` and divide by ``std``
    (per RGB channel). Stored as the cache's ``preprocess`` attribute (:meth:`as_dict` / :meth:`from_dict`)."""

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def __post_init__(self):
        object.__setattr__(self, "resize", int(self.resize))
        object.__setattr__(self, "crop", int(self.crop))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if not 1 <= self.crop <= self.resize:
            raise ValueError(f"crop must be between 1 and resize ({self.resize}), got {self.crop}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 values (R, G, B), got {self.mean} and {self.std}")
        if min(self.std) <= 0:
            raise ValueError(f"std values must be positive, got {self.std}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")

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
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        """Inverse of :meth:`as_dict` (unknown keys are ignored). Raises ValueError for a missing/bad value."""
        missing = [k for k in ("resize", "crop", "mean", "std") if k not in d]
        if missing:
            raise ValueError(f"preprocessing lacks {', '.join(missing)}")
        return cls(resize=d["resize"], crop=d["crop"], mean=tuple(d["mean"]), std=tuple(d["std"]),
                   interpolation=d.get("interpolation", "bilinear"))

    def override(self, resize: int | None = None, crop: int | None = None, mean=None, std=None,
                 interpolation: str | None = None) -> Preprocess:
        """A copy with the given fields replaced; one size given alone keeps this crop/resize ratio."""
        if resize is not None or crop is not None:
            ratio = self.crop / self.resize
            resize = resize if resize is not None else int(f"{crop / ratio:.0f}")
            crop = crop if crop is not None else int(f"{resize * ratio:.0f}")
        return replace(self, resize=self.resize if resize is None else resize,
                       crop=self.crop if crop is None else crop,
                       mean=self.mean if mean is None else tuple(mean), std=self.std if std is None else tuple(std),
                       interpolation=self.interpolation if interpolation is None else interpolation)


def preprocess_from_options(resize: int | None, crop: int | None, mean, std,
                            interpolation: str | None, what: str) -> Preprocess:
    """Preprocessing given entirely by options (a model file that stores none): ``crop``, ``mean`` and
    ``std`` are required; ``resize`` defaults to crop / 0.875 (ImageNet's 224/256), interpolation to bilinear."""
    if crop is None and resize is None or mean is None or std is None:
        raise DvmlError(f"{what} stores no preprocessing: give `crop` (or `resize`), `mean` and `std`, or "
                        f"export it with dvml.extract.save_torchscript(model, preprocess, path)")
    crop = crop if crop is not None else int(f"{resize * 0.875:.0f}")
    resize = resize if resize is not None else int(f"{crop / 0.875:.0f}")
    return Preprocess(resize=resize, crop=crop, mean=tuple(mean), std=tuple(std),
                      interpolation=interpolation or "bilinear")


@dataclass
class Backbone:
    """A ready feature extractor. ``model(x)`` maps normalised (B, 3, crop, crop) to (B, ``feature_dim``).

    ``preprocess`` is None only for a model file that stores none (the options must then give it)."""

    model: nn.Module
    name: str  # cache attribute "backbone", e.g. "torchvision.resnet18", "timm:vit_small_patch14_dinov2"
    weights: str  # cache attribute "weights": which weights, stable across machines
    preprocess: Preprocess | None
    transform_input: bool | None = None  # torchvision GoogLeNet / Inception v3 only
    feature_dim: int | None = FEATURE_DIM  # None: found by one forward pass (see ensure_feature_dim)
    spec: str = DEFAULT_BACKBONE  # what load_backbone was given (re-creates it together with weights)
    feature: str = "global average pool output (before dropout and fc), model in eval()"
    source: dict = field(default_factory=dict)  # e.g. the model file's absolute path

    def describe(self) -> dict:
        """Provenance for the cache's ``extra``."""
        return {"backbone": self.name, "backbone_spec": self.spec, "weights": self.weights,
                "transform_input": self.transform_input,
                "preprocess": None if self.preprocess is None else self.preprocess.as_dict(),
                "feature_dim": self.feature_dim, "feature": self.feature, **self.source}

    def ensure_feature_dim(self) -> Backbone:
        """A copy whose ``feature_dim`` is known: one forward of a zero image at the crop size if needed.
        Raises DvmlError if the output is not (1, D)."""
        if self.feature_dim is not None:
            return self
        with torch.inference_mode():
            out = self.model(torch.zeros(1, 3, self.preprocess.crop, self.preprocess.crop))
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 1:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise DvmlError(f"backbone {self.name}: expected (B, D) features from a (1, 3, {self.preprocess.crop}, "
                            f"{self.preprocess.crop}) image, got {shape}")
        return replace(self, feature_dim=int(out.shape[1]))


# --------------------------------------------------------------------------- state dict files

def _load_state_dict_file(path: Path) -> tuple[dict, str, bool | None]:
    """(state dict with ``module.`` stripped, content digest, stored transform_input or None)."""
    if not path.is_file():
        raise DvmlError(f"`weights` {path}: no such file (expected 'imagenet', 'none' or a state dict path)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a non-checkpoint
        if "weights_only" in str(e):  # never repeat torch's advice to load an untrusted pickle unsafely
            raise DvmlError(f"`weights` {path}: refused: it holds Python objects other than tensors (it could run "
                            "code when loaded); pass a plain state dict (torch.save(model.state_dict()))") from None
        raise DvmlError(f"`weights` {path}: cannot be loaded as a torch state dict ({e})") from None
    stored_ti = obj.get("transform_input") if isinstance(obj, dict) else None
    for key in ("state_dict", "model", "backbone"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DvmlError(f"`weights` {path}: not a state dict (a dict of tensors)")
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    return state, _digest(state), stored_ti if isinstance(stored_ti, bool) else None


def _digest(state: dict) -> str:
    h = hashlib.blake2b(digest_size=8)
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def file_digest(path: Path) -> str:
    """blake2b-64 of a file's bytes (the identity of a model file's weights)."""
    h = hashlib.blake2b(digest_size=8)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- torchvision

def _tv_preprocess(weights_enum_member) -> Preprocess:
    t = weights_enum_member.transforms()
    return Preprocess(resize=int(t.resize_size[0]), crop=int(t.crop_size[0]), mean=tuple(map(float, t.mean)),
                      std=tuple(map(float, t.std)), interpolation=t.interpolation.value)


def _last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """The classifier's last Linear layer (skipping auxiliary heads), by qualified name."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)
             and not n.startswith(("aux1", "aux2", "AuxLogits"))]
    if not found:
        raise DvmlError(f"backbone {type(model).__name__}: no Linear classifier to replace "
                        "(its output is not a pooled feature vector); export your own feature model as TorchScript")
    return found[-1]


def _strip_classifier(model: nn.Module) -> tuple[nn.Module, str, int]:
    """Replace the last Linear by identity and drop auxiliary heads -> (model in eval(), its name, feature dim).

    Dropout layers beside that Linear (GoogLeNet's/Inception's ``dropout`` after the pool, EfficientNet's and
    MobileNet's ``classifier`` dropout) become identity too: they act on the feature itself, so training through
    the backbone (``dvml finetune``) sees the same feature as extraction (in ``eval()`` they are identity anyway)."""
    name, linear = _last_linear(model)
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    setattr(parent, name.rpartition(".")[2], nn.Identity())
    for child_name, child in list(parent.named_children()):
        if isinstance(child, nn.Dropout):
            setattr(parent, child_name, nn.Identity())
    for aux in ("aux1", "aux2", "AuxLogits"):
        if getattr(model, aux, None) is not None:
            setattr(model, aux, None)
    if hasattr(model, "aux_logits"):
        model.aux_logits = False
    return model.eval(), name, linear.in_features


def _tv_build(name: str, *, transform_input: bool | None, aux: bool) -> nn.Module:
    from torchvision import models

    kwargs = {}
    if name in TRANSFORM_INPUT_MODELS:
        kwargs.update(aux_logits=aux, transform_input=bool(transform_input), init_weights=False)
    return models.get_model(name, weights=None, **kwargs)


def _torchvision_backbone(name: str, weights: str, transform_input: bool | None, init_seed: int) -> Backbone:
    from torchvision.models import get_model_weights

    enum = get_model_weights(name)
    default = enum.DEFAULT
    key = str(weights)
    ti_model = name in TRANSFORM_INPUT_MODELS
    member = None
    if key.lower() == "imagenet":
        member = default
    elif key in enum.__members__:
        member = enum[key]
    if member is not None:
        ti = (True if transform_input is None else transform_input) if ti_model else None
        model = _tv_build(name, transform_input=ti, aux=True)
        try:
            state = member.get_state_dict(progress=False, check_hash=True)
        except Exception as e:  # URLError, OSError, RuntimeError (hash): all mean "no usable file"
            target = Path(torch.hub.get_dir()) / "checkpoints" / member.url.rsplit("/", 1)[-1]
            raise DvmlError(
                f"`weights` {key}: cannot load torchvision's {type(member).__name__}.{member.name} ({e}). "
                f"Offline, download {member.url} elsewhere and put it at {target} (the torch hub cache; set "
                f"TORCH_HOME to move it), or pass `weights` PATH to the file"
            ) from None
        model.load_state_dict(state)
        desc = f"torchvision:{type(member).__name__}.{member.name}"
        preprocess = _tv_preprocess(member)
    elif key.lower() == "none":
        ti = (False if transform_input is None else transform_input) if ti_model else None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            model = _tv_build(name, transform_input=ti, aux=False)
            if name == "googlenet":
                for m in model.modules():
                    if isinstance(m, nn.Conv2d):
                        nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        desc = f"none(random init, seed={init_seed})" if name != "googlenet" else \
            f"none(random he-normal init, seed={init_seed})"
        preprocess = _tv_preprocess(default)
    else:
        path = Path(weights).expanduser()
        state, digest, stored_ti = _load_state_dict_file(path)
        ti = (transform_input if transform_input is not None else (True if stored_ti is None else stored_ti)) \
            if ti_model else None
        model = _tv_build(name, transform_input=ti, aux=False)
        head, _ = _last_linear(model)
        state = {k: v for k, v in state.items()
                 if not k.startswith((f"{head}.", "aux1.", "aux2.", "AuxLogits."))}
        model, head, dim = _strip_classifier(model)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise DvmlError(f"`weights` {path}: does not match torchvision's {name}: {e}") from None
        desc = f"state_dict:{path.name}:{digest}"
        preprocess = _tv_preprocess(default)
    if member is not None or key.lower() == "none":
        model, head, dim = _strip_classifier(model)
    return Backbone(model=model, name=f"torchvision.{name}", weights=desc, preprocess=preprocess,
                    transform_input=ti, feature_dim=dim, spec=name,
                    feature=f"input of the classifier's last Linear ({head} = Identity), model in eval()")


# --------------------------------------------------------------------------- timm

def _timm_preprocess(model: nn.Module) -> Preprocess:
    import timm.data

    cfg = timm.data.resolve_model_data_config(model)
    crop = int(cfg["input_size"][-1])
    resize = int(math.floor(crop / float(cfg.get("crop_pct", 1.0))))  # timm's own rule (transforms_factory)
    interpolation = cfg.get("interpolation", "bilinear")
    if interpolation not in INTERPOLATIONS:
        interpolation = "bicubic" if interpolation == "random" else "bilinear"
    return Preprocess(resize=resize, crop=crop, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                      interpolation=interpolation)


def _timm_offline_message(name: str, e: Exception) -> str:
    import timm

    try:
        pcfg = timm.models.get_pretrained_cfg(name)
        hub_id = getattr(pcfg, "hf_hub_id", None)
        url = getattr(pcfg, "url", None)
    except Exception:  # unknown tag: report what timm said
        hub_id = url = None
    parts = []
    if hub_id:
        try:
            from huggingface_hub.constants import HF_HUB_CACHE
        except ImportError:  # pragma: no cover - timm depends on huggingface_hub
            HF_HUB_CACHE = "~/.cache/huggingface/hub"
        repo = hub_id.split("@")[0]
        parts.append(f"the Hugging Face hub entry {repo} must be in {HF_HUB_CACHE} (as "
                     f"models--{repo.replace('/', '--')}; set HF_HOME to move it)")
    if url:
        parts.append(f"or the file {url.rsplit('/', 1)[-1]} in {Path(torch.hub.get_dir()) / 'checkpoints'}")
    where = "; ".join(parts) if parts else "timm could not say where its weights live"
    return (f"`weights` imagenet: cannot load timm's pretrained weights for {name} ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Offline, {where}; or pass `weights` PATH to a state dict")


def _timm_from_file(timm, name: str, path: Path) -> tuple[nn.Module, str]:
    """A timm model (``num_classes=0``) from a local state dict: in timm's own layout (with or without its
    classifier, e.g. a ``dvml finetune`` backbone.pt) loaded directly, else through timm's pretrained loader,
    which converts original-format checkpoints (e.g. the DINOv2 release files)."""
    state, digest, _ = _load_state_dict_file(path)
    model = timm.create_model(name, pretrained=False, num_classes=0)
    head = model.pretrained_cfg.get("classifier") or ""
    heads = (head,) if isinstance(head, str) else tuple(head)
    direct = {k: v for k, v in state.items() if not any(h and k.startswith(h + ".") for h in heads)}
    missing, unexpected = model.load_state_dict(direct, strict=False)
    if missing or unexpected:
        try:  # timm's own loader: filters the classifier, adapts position embeddings and key names
            model = timm.create_model(name, pretrained=True, num_classes=0,
                                      pretrained_cfg_overlay={"file": str(path), "hf_hub_id": None, "url": None})
        except (RuntimeError, KeyError, ValueError, OSError) as e:
            shown = ", ".join(list(missing)[:3] + list(unexpected)[:3])
            raise DvmlError(f"`weights` {path}: does not match timm's {name} (e.g. {shown}; timm's loader: "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return model, f"state_dict:{path.name}:{digest}"


def _timm_backbone(name: str, weights: str, init_seed: int) -> Backbone:
    try:
        import timm
    except ImportError:
        raise DvmlError(f"`backbone` timm:{name} needs timm: pip install 'dvml[timm]' (or pip install timm)") \
            from None
    if not timm.is_model(name.split(".")[0]):
        raise DvmlError(f"`backbone` timm:{name}: timm has no such model (see timm.list_models())")
    key = str(weights)
    try:
        if key.lower() == "imagenet":
            try:
                model = timm.create_model(name, pretrained=True, num_classes=0)
            except (OSError, RuntimeError, ValueError) as e:  # hub offline / missing file / bad download
                raise DvmlError(_timm_offline_message(name, e)) from None
            tag = model.pretrained_cfg.get("tag") or ""
            desc = f"timm:{model.pretrained_cfg.get('architecture', name)}.{tag}".rstrip(".")
        elif key.lower() == "none":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(init_seed)
                model = timm.create_model(name, pretrained=False, num_classes=0)
            desc = f"none(random init, seed={init_seed})"
        else:
            model, desc = _timm_from_file(timm, name, Path(weights).expanduser())
    except RuntimeError as e:  # e.g. an unknown pretrained tag
        raise DvmlError(f"`backbone` timm:{name}: {e}") from None
    model.eval()
    return Backbone(model=model, name=f"timm:{name}", weights=desc, preprocess=_timm_preprocess(model),
                    feature_dim=int(model.num_features) if getattr(model, "head_hidden_size", None) is None
                    else int(model.head_hidden_size), spec=f"timm:{name}",
                    feature="timm num_classes=0 output (pooled pre-logits features), model in eval()")


# --------------------------------------------------------------------------- TorchScript files

def save_torchscript(model: nn.Module | torch.jit.ScriptModule, preprocess: Preprocess, path: str | Path, *,
                     method: str = "trace", feature_dim: int | None = None, note: str = "") -> Path:
    """Write ``model`` (normalised float (B, 3, crop, crop) -> (B, D)) as a TorchScript file that carries its
    preprocessing, ready for ``dvml extract --backbone PATH``.

    ``method``: ``trace`` (a zero-mean random batch at the crop size) or ``script``; a ScriptModule is saved as is.
    ``feature_dim`` is found by a forward pass when not given. Returns the path.
    """
    path = Path(path)
    model = model.eval()
    example = torch.randn(2, 3, preprocess.crop, preprocess.crop, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch >= 2.10 marks TorchScript deprecated
        if isinstance(model, torch.jit.ScriptModule):
            scripted = model
        elif method == "trace":
            with torch.no_grad():
                scripted = torch.jit.trace(model, example, check_trace=False)
        elif method == "script":
            scripted = torch.jit.script(model)
        else:
            raise ValueError(f"method must be trace or script, got {method!r}")
        out = scripted(example)
    if out.ndim != 2:
        raise ValueError(f"the model must return (B, D) features, got shape {tuple(out.shape)}")
    meta = {**preprocess.as_dict(), "feature_dim": int(feature_dim or out.shape[1]), "note": note,
            "input": "float32 (B, 3, crop, crop), (RGB/255 - mean) / std"}
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(scripted, str(path), _extra_files={TORCHSCRIPT_EXTRA: json.dumps(meta, sort_keys=True)})
    return path


class ExportedFeatures(nn.Module):
    """A loaded ``.pt2`` program's module, usable as a backbone: ``train()``/``eval()`` are no-ops (an exported
    graph has no mode to switch; torch refuses the call)."""

    def __init__(self, graph: nn.Module):
        super().__init__()
        self.graph = graph

    def train(self, mode: bool = True) -> ExportedFeatures:
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph(x.contiguous())


def save_exported(model: nn.Module, preprocess: Preprocess, path: str | Path, *, note: str = "",
                  max_batch: int = 65536) -> Path:
    """Write ``model`` (normalised float (B, 3, crop, crop) -> (B, D)) as a ``torch.export`` program (``.pt2``,
    dynamic batch 1..``max_batch``) that carries its preprocessing, ready for ``dvml extract --backbone PATH``.
    Returns the path."""
    path = Path(path)
    model = model.eval()
    example = torch.randn(2, 3, preprocess.crop, preprocess.crop, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
        out = program.module()(example)
    if out.ndim != 2:
        raise ValueError(f"the model must return (B, D) features, got shape {tuple(out.shape)}")
    meta = {**preprocess.as_dict(), "feature_dim": int(out.shape[1]), "note": note,
            "input": "float32 (B, 3, crop, crop), (RGB/255 - mean) / std"}
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's serialiser chatter about weight groups
        torch.export.save(program, str(path), extra_files={TORCHSCRIPT_EXTRA: json.dumps(meta, sort_keys=True)})
    return path


def _model_file_backbone(path: Path, weights: str, exported: bool) -> Backbone:
    weights = str(weights)
    identity = f"file:{path.name}:{file_digest(path)}"
    if weights.startswith("file:"):  # an identity read back from a cache: the file must be the same
        if weights.rsplit(":", 1)[-1] != identity.rsplit(":", 1)[-1]:
            raise DvmlError(f"`backbone` {path}: its content (hash {identity.rsplit(':', 1)[-1]}) differs from "
                            f"the model file the cache was made with ({weights})")
    elif weights.lower() not in ("imagenet", "none", ""):
        raise DvmlError(f"`weights` {weights}: does not apply to a model file ({path.name} carries its own weights)")
    extra = {TORCHSCRIPT_EXTRA: ""}
    try:
        with warnings.catch_warnings():  # torch >= 2.10 marks TorchScript deprecated; it still loads
            warnings.simplefilter("ignore", FutureWarning)
            if exported:
                warnings.simplefilter("ignore", UserWarning)
                model = ExportedFeatures(torch.export.load(str(path), extra_files=extra).module())
            else:
                model = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as e:  # RuntimeError / zipfile errors for a file of another kind
        what, how = (("torch.export (.pt2)", "dvml.extract.save_exported") if exported else
                     ("TorchScript", "torch.jit.trace/script or dvml.extract.save_torchscript"))
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DvmlError(f"`backbone` {path}: not a {what} model file ({type(e).__name__}: {first[:200]}); export "
                        f"one with {how}") from None
    preprocess, dim = None, None
    raw = extra[TORCHSCRIPT_EXTRA]
    if raw:
        try:
            meta = json.loads(raw)
            preprocess = Preprocess.from_dict(meta)
            dim = int(meta["feature_dim"]) if meta.get("feature_dim") else None
        except (ValueError, TypeError, KeyError) as e:
            raise DvmlError(f"`backbone` {path}: its {TORCHSCRIPT_EXTRA} is not valid ({e})") from None
    model.eval()
    kind = "exported" if exported else "torchscript"
    return Backbone(model=model, name=f"{kind}:{path.name}", weights=identity,
                    preprocess=preprocess, feature_dim=dim, spec=str(path.resolve()),
                    feature=f"the {'exported program' if exported else 'TorchScript model'}'s output",
                    source={"model_file": str(path.resolve())})


# --------------------------------------------------------------------------- entry points

def load_backbone(spec: str | Path = DEFAULT_BACKBONE, weights: str | Path = "imagenet", *,
                  device: str | torch.device | None = None, transform_input: bool | None = None,
                  init_seed: int = 0) -> Backbone:
    """Build the backbone named by ``spec`` with ``weights`` (see the module docstring), in ``eval()``.

    ``device``: where to put the model (None: stay on the CPU; ``"auto"`` etc. via :mod:`dvml.devices`).
    The result's ``model`` and ``preprocess`` are all a caller needs to embed images:
    ``bb.model(bb.preprocess.normalize(uint8_views))`` -> (B, ``bb.feature_dim``).

    Raises:
        DvmlError: unknown model name, missing/invalid file, missing optional package, or weights that cannot
            be loaded offline (the message names the file or hub entry and the directory it must be in).
    """
    parsed = parse_spec(spec)
    if parsed.kind is BackboneKind.torchvision:
        bb = _torchvision_backbone(parsed.name, str(weights), transform_input, init_seed)
    elif parsed.kind is BackboneKind.timm:
        bb = _timm_backbone(parsed.name, str(weights), init_seed)
    else:
        bb = _model_file_backbone(Path(parsed.name), str(weights), exported=parsed.kind is BackboneKind.exported)
    if transform_input is not None and bb.transform_input is None:
        raise DvmlError(f"`transform_input` applies to torchvision googlenet and inception_v3 only, not {bb.name}")
    if bb.name == "torchvision.googlenet":
        bb.feature = "global average pool output (before dropout and fc), model in eval()"
    if device is not None:
        from dvml.devices import resolve_device

        bb.model.to(resolve_device(device))
    log.info("backbone %s, weights %s%s", bb.name, bb.weights,
             "" if bb.transform_input is None else f", transform_input={bb.transform_input}")
    return bb


@dataclass(frozen=True)
class CacheBackbone:
    """The backbone that wrote a cache, as recorded in it (see :func:`backbone_from_cache`)."""

    spec: str  # what load_backbone takes: "googlenet", "resnet50", "timm:NAME", a model file's path
    identity: str  # the cache's ``weights`` attribute
    preprocess: Preprocess | None  # the cache's ``preprocess`` attribute (None for caches written without it)
    transform_input: bool | None = None

    def load(self, weights_file: str | Path | None = None, *, device: str | torch.device | None = None) -> Backbone:
        """Rebuild the backbone, with the cache's preprocessing, to embed new images into the cache's space.

        ``weights_file``: needed when the cache was made from a local state dict (``state_dict:NAME:HASH``); its
        content must hash to the recorded value. Raises DvmlError when the weights cannot be had or differ.
        """
        ident = self.identity
        seed = 0
        if ident.startswith("state_dict:"):
            if weights_file is None:
                raise DvmlError(f"the cache was made with the local state dict {ident.split(':')[1]} ({ident}); "
                                "pass that file as `weights`")
            weights = str(weights_file)
        elif ident.startswith("torchvision:"):
            weights = ident.rsplit(".", 1)[-1]  # the enum member, e.g. IMAGENET1K_V2
        elif ident.startswith("none("):
            weights = "none"
            seed = int(ident.rsplit("seed=", 1)[-1].rstrip(")")) if "seed=" in ident else 0
        elif ident.startswith("file:"):
            weights = ident  # the TorchScript loader checks the file's hash against it
        else:  # timm:ARCH.TAG and anything else pretrained
            weights = "imagenet"
        bb = load_backbone(self.spec, weights, transform_input=self.transform_input, init_seed=seed, device=device)
        if ident.startswith("state_dict:") and bb.weights.rsplit(":", 1)[-1] != ident.rsplit(":", 1)[-1]:
            raise DvmlError(f"{weights_file}: its content (hash {bb.weights.rsplit(':', 1)[-1]}) differs from the "
                            f"state dict the cache was made with ({ident})")
        if self.preprocess is not None:
            bb = replace(bb, preprocess=self.preprocess)
        return bb.ensure_feature_dim() if bb.preprocess is not None else bb


def backbone_from_cache(info) -> CacheBackbone:
    """The backbone recorded in a cache (a :class:`~dvml.cache.CacheInfo`): ``backbone_from_cache(info).load()``
    rebuilds it with the cache's preprocessing, for tools that embed new images into the cache's space."""
    extra = info.extra or {}
    spec = extra.get("backbone_spec") or info.backbone
    if spec == BACKBONE_NAME:
        spec = DEFAULT_BACKBONE
    raw = getattr(info, "preprocess", None) or extra.get("preprocess")
    ti = extra.get("transform_input")
    return CacheBackbone(spec=spec, identity=info.weights, preprocess=Preprocess.from_dict(raw) if raw else None,
                         transform_input=ti if isinstance(ti, bool) else None)
