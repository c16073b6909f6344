"""``dvml export``: one file from images to z_I, as a ``torch.export`` program (``.pt2``), TorchScript (``.pt``) or
ONNX (``.onnx``), and its loader.

The file holds :class:`~dvml.serve.embedder.ImageEmbedder` (normalisation → backbone → embedding layer)
traced on the CPU, plus a JSON record (:func:`dvml.serve.embedder.describe`): input/output names and shapes,
the preprocessing (resize, crop, interpolation, mean, std, and the recipe in words), the embedding size,
the retrieval metric, the feature rounding, and where it came from (run directory, cache and fingerprint,
backbone and weights, dvml and torch versions).

* ``torch.export`` (``.pt2``, the format current PyTorch maintains; dynamic batch): an ``ExportedProgram``
  whose record is the extra file ``dvml.json``::

      extra = {"dvml.json": ""}
      program = torch.export.load("model.pt2", extra_files=extra)
      meta = json.loads(extra["dvml.json"])
      z = program.module()(uint8_images)           # (B, 3, crop, crop) uint8 -> (B, E) float32

  The program checks its input itself: another dtype or shape raises (dtype mismatch, guard failed).

* TorchScript (``.pt``; deprecated by PyTorch since 2.10, still written and read while torch ships it): the
  record is the extra file ``dvml.json``::

      extra = {"dvml.json": ""}
      model = torch.jit.load("model.pt", _extra_files=extra)
      meta = json.loads(extra["dvml.json"])
      z = model(uint8_images)                      # (B, 3, crop, crop) uint8 -> (B, E) float32

  The model checks its input (uint8, (B, 3, crop, crop)) and raises naming what it got.

* ONNX (opset 17, dynamic batch): the record is the metadata entry ``dvml``; input ``images``, output
  ``embeddings``::

      sess = onnxruntime.InferenceSession("model.onnx")
      meta = json.loads(sess.get_modelmeta().custom_metadata_map["dvml"])
      z = sess.run(["embeddings"], {"images": uint8_images})[0]

None needs dvml. Trust: a TorchScript file is a program (loading and running it runs whatever it holds); a
``.pt2`` or ONNX file is a graph of tensor operators, but load only model files from sources you trust.

Accuracy against ``dvml evaluate`` on the CPU: ``.pt2`` and TorchScript run the same kernels, so their
embeddings equal evaluate's to float rounding (measured 0.0 on the backbone features). ONNX Runtime has its own
convolution kernels (features differ by ~1e-5 relative); with a float16 cache, a feature that lands on the
other side of a float16 rounding boundary moves by one float16 step, so a few z_I entries can differ by
(step × |embedding weight|) — export from a float32 cache (``dvml extract --dtype float32``) when that matters.

After writing, the file is loaded back and run on a seeded random batch against the module it came from;
the largest difference is returned (and logged), and an export that disagrees by more than 1e-3 is refused.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dvml import files
from dvml.extract.backbone import Preprocess
from dvml.serve.config import SUFFIXES as SUFFIXES  # re-exported: the light home of these
from dvml.serve.config import ExportConfig as ExportConfig
from dvml.serve.config import ExportFormat as ExportFormat
from dvml.serve.config import format_of as format_of
from dvml.serve.embedder import Embedding, ExportError, describe, from_target, load_images

log = logging.getLogger(__name__)

META_KEY = "dvml"  # ONNX metadata_props key
TORCHSCRIPT_META_FILE = "dvml.json"  # TorchScript extra file
INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"
ONNX_OPSET = 17
EXPORTED_META_FILE = "dvml.json"  # torch.export extra file
SELF_CHECK_TOLERANCE = 1e-3
MAX_BATCH = 65536  # upper bound of the .pt2 program's dynamic batch dimension


@dataclass(frozen=True)
class ExportResult:
    path: Path
    format: ExportFormat
    meta: dict
    self_check_max_abs_diff: float


def _example(e: Embedding, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    c = e.preprocess.crop
    return torch.randint(0, 256, (n, 3, c, c), dtype=torch.uint8, generator=g)


class _CheckedInput(nn.Module):
    """A traced embedder behind a scripted input check (tracing bakes Python checks away): uint8 (B, 3, crop,
    crop) or a RuntimeError saying what was given."""

    def __init__(self, inner: nn.Module, crop: int):
        super().__init__()
        self.inner = inner
        self.crop = crop

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise RuntimeError("dvml model: images must be uint8 RGB in [0, 255] (B, 3, " + str(self.crop) + ", "
                               + str(self.crop) + "), not another dtype (e.g. floats in [0, 1])")
        if images.dim() != 4 or images.size(1) != 3 or images.size(2) != self.crop or images.size(3) != self.crop:
            raise RuntimeError("dvml model: images must have shape (B, 3, " + str(self.crop) + ", " + str(self.crop)
                               + "), got " + str(images.size()))
        return self.inner(images)


def _write_torchscript(e: Embedding, example: torch.Tensor, meta: dict, path: Path) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and "torch.jit is deprecated" chatter; the self-check is the test
        traced = torch.jit.trace(e.module.eval(), example, check_trace=False)
        checked = torch.jit.script(_CheckedInput(traced, e.preprocess.crop))
        with open(path, "wb") as f:  # a python file: a failed write is an OSError (torch's writer: RuntimeError)
            torch.jit.save(checked, f, _extra_files={TORCHSCRIPT_META_FILE: json.dumps(meta).encode()})


def _write_exported(e: Embedding, example: torch.Tensor, meta: dict, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.export.export(e.module.eval(), (example,), dynamic_shapes=({0: batch},))
        except Exception as err:  # noqa: BLE001 - torch.export raises many types for an unexportable model
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise ExportError(f"{e.source.get('run_dir') or e.source.get('cache')}: its model cannot be exported "
                              f"with torch.export ({type(err).__name__}: {first[:200]}); use .pt or .onnx") from None
        with open(path, "wb") as f:
            torch.export.save(program, f, extra_files={EXPORTED_META_FILE: json.dumps(meta)})


def _write_onnx(e: Embedding, example: torch.Tensor, meta: dict, path: Path) -> None:
    try:
        import onnx
    except ImportError:
        raise ExportError("ONNX export needs the onnx package: pip install 'dvml[onnx]'") from None
    kwargs = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                  dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, opset_version=ONNX_OPSET)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:  # the TorchScript-based exporter: seconds, one self-contained file
            torch.onnx.export(e.module.eval(), (example,), str(path), dynamo=False, **kwargs)
        except (TypeError, RuntimeError, AttributeError) as err:  # removed in a future torch: torch.export's
            log.info("legacy ONNX exporter unavailable (%s); using torch.export (slow)", err)
            torch.onnx.export(e.module.eval(), (example,), str(path), input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], dynamic_shapes=({0: torch.export.Dim("batch")},),
                              dynamo=True, external_data=False)
    model = onnx.load(str(path))
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(meta)
    model.producer_name = "dvml"
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def run(cfg: ExportConfig, *, embedding: Embedding | None = None) -> ExportResult:
    """Export ``cfg.target`` to ``cfg.out`` and check it back, by :func:`dvml.files.write_via_path`: a temporary
    file is written, loaded and compared with dvml's module, and only then renamed over ``cfg.out`` (through a
    symlink; no temporary file is left when anything fails).

    Raises:
        ExportError: an existing output without ``overwrite``, a target that cannot be embedded (see
            :func:`dvml.serve.embedder.from_run`), a missing ONNX package, a file that disagrees with its module.
        WriteError: an output that cannot be written (a directory, a path under a regular file: found before the
            model is built), or a failed write.
    """
    files.check_target(cfg.out)
    with files.output_guard(cfg.out, overwrite=cfg.overwrite):
        return _run(cfg, embedding)


def _run(cfg: ExportConfig, embedding: Embedding | None) -> ExportResult:
    e = embedding or from_target(cfg.target, weights=cfg.weights)
    meta = describe(e)
    meta["format_name"] = cfg.format.value
    example = _example(e, cfg.batch)
    diff = float("nan")  # the self-check's max |exported - dvml|

    def write_and_check(tmp: Path) -> None:
        nonlocal diff
        if cfg.format is ExportFormat.exported:
            _write_exported(e, example, meta, tmp)
        elif cfg.format is ExportFormat.torchscript:
            _write_torchscript(e, example, meta, tmp)
        else:
            _write_onnx(e, example, meta, tmp)
        loaded = load_exported(tmp, fmt=cfg.format)
        check = torch.randint(0, 256, example.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            want = e.module.eval()(check).numpy()
        diff = float(np.abs(loaded.embed_uint8(check.numpy()) - want).max())
        if not diff <= SELF_CHECK_TOLERANCE:
            raise ExportError(f"{cfg.out}: the exported model disagrees with dvml's by {diff:.3g} (> "
                              f"{SELF_CHECK_TOLERANCE}); not written")

    files.write_via_path(cfg.out, write_and_check)
    log.info("exported %s (%s, %d-D z_I, input uint8 %dx%d); self-check max |diff| %.3g", cfg.out, cfg.format.value,
             e.embedding_dim, e.preprocess.crop, e.preprocess.crop, diff)
    return ExportResult(path=cfg.out, format=cfg.format, meta=meta, self_check_max_abs_diff=diff)


# ------------------------------------------------------------------------------------------------ loading
class ExportedModel:
    """An exported file, loaded: ``meta`` (its JSON record), ``preprocess``, ``embedding_dim``, and the
    same ``embed_uint8`` / ``embed_paths`` as :class:`~dvml.serve.embedder.Embedding`."""

    def __init__(self, path: Path, meta: dict, runner):
        self.path, self.meta, self._run = path, meta, runner
        p = meta["preprocess"]
        self.preprocess = Preprocess(resize=int(p["resize"]), crop=int(p["crop"]), mean=tuple(p["mean"]),
                                     std=tuple(p["std"]), interpolation=str(p["interpolation"]))
        self.embedding_dim = int(meta["embedding_dim"])
        self.metric = str(meta.get("metric", "cosine"))

    def embed_uint8(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """(N, 3, crop, crop) uint8 → (N, E) float32."""
        x = np.ascontiguousarray(images, dtype=np.uint8)
        out = np.empty((x.shape[0], self.embedding_dim), dtype=np.float32)
        for i in range(0, x.shape[0], batch_size):
            out[i:i + batch_size] = self._run(x[i:i + batch_size])
        return out

    def embed_paths(self, paths, batch_size: int = 64) -> np.ndarray:
        out = np.empty((len(paths), self.embedding_dim), dtype=np.float32)
        for i in range(0, len(paths), batch_size):
            out[i:i + batch_size] = self.embed_uint8(load_images(paths[i:i + batch_size], self.preprocess))
        return out


def _check_meta(path: Path, raw: str | bytes | None) -> dict:
    if not raw:
        raise ExportError(f"{path}: no dvml record in the file (not written by dvml export)")
    try:
        meta = json.loads(raw)
    except (TypeError, json.JSONDecodeError):
        raise ExportError(f"{path}: its dvml record is not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != "dvml-embedding-model":
        raise ExportError(f"{path}: its dvml record is not a dvml embedding model record")
    if meta.get("format_version") != 1:
        raise ExportError(f"{path}: dvml embedding model format_version {meta.get('format_version')} is not "
                          "supported (this dvml reads 1)")
    return meta


def load_exported(path: str | Path, *, fmt: ExportFormat | None = None) -> ExportedModel:
    """Load a file written by :func:`run` (``.pt2`` with torch.export, TorchScript with torch.jit, ONNX with
    onnxruntime) on the CPU; ``fmt``
    defaults to the one its suffix names (:func:`format_of`).

    Raises :class:`ExportError` naming the file when it is missing, damaged or not a dvml export.
    """
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such model file")
    fmt = format_of(path) if fmt is None else fmt
    if fmt is ExportFormat.exported:
        extra = {EXPORTED_META_FILE: ""}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = torch.export.load(str(path), extra_files=extra)
        except Exception as err:  # noqa: BLE001 - torch raises many types for a damaged file
            raise ExportError(f"{path}: not a loadable torch.export (.pt2) file ({type(err).__name__})") from None
        meta = _check_meta(path, extra[EXPORTED_META_FILE])
        graph = program.module()

        def run_exported(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return graph(torch.from_numpy(x)).numpy()

        return ExportedModel(path, meta, run_exported)
    if fmt is ExportFormat.torchscript:
        extra = {TORCHSCRIPT_META_FILE: ""}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated" (torch >= 2.10)
                module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        except Exception as err:  # noqa: BLE001 - torch raises many types for a damaged file
            raise ExportError(f"{path}: not a loadable TorchScript file ({type(err).__name__})") from None
        meta = _check_meta(path, extra[TORCHSCRIPT_META_FILE])
        module.eval()

        def run_ts(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return module(torch.from_numpy(x)).numpy()

        return ExportedModel(path, meta, run_ts)
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError(f"{path}: running ONNX models needs onnxruntime: pip install 'dvml[onnx]'") from None
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise ExportError(f"{path}: not a loadable ONNX model ({type(err).__name__})") from None
    meta = _check_meta(path, sess.get_modelmeta().custom_metadata_map.get(META_KEY))
    return ExportedModel(path, meta, lambda x: sess.run([OUTPUT_NAME], {INPUT_NAME: x})[0])
