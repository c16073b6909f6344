"""dvml export: the file, loaded in a fresh process WITHOUT dvml (.pt2 via torch.export, TorchScript via torch.jit,
ONNX via onnxruntime), embeds the test images exactly as ``dvml evaluate`` embeds them; bad input gives one clear
error."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dvml.cache import load_split
from dvml.cli import app

from ..faults.test_io_faults import assert_one_line_error, dvml_cmd, leftovers

runner = CliRunner()

# A consumer that has only the file: no dvml (imports of it are blocked), just torch/onnxruntime, PIL, numpy.
# It follows the preprocessing record stored in the file.
FRESH = r'''
import json, sys
sys.modules["dvml"] = None  # any "import dvml..." now raises ImportError
import numpy as np
from PIL import Image

model_path, out_path, *images = sys.argv[1:]

def prepare(path, pre):
    img = Image.open(path).convert("RGB")
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = pre["resize"], int(pre["resize"] * long / short)
    size = (new_short, new_long) if w <= h else (new_long, new_short)
    assert pre["interpolation"] == "bilinear"
    img = img.resize(size, Image.BILINEAR)
    a = np.asarray(img, dtype=np.uint8)
    c = pre["crop"]
    top, left = int(round((a.shape[0] - c) / 2.0)), int(round((a.shape[1] - c) / 2.0))
    return a[top:top + c, left:left + c].transpose(2, 0, 1)

if model_path.endswith(".onnx"):
    import onnxruntime as ort
    sess = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    meta = json.loads(sess.get_modelmeta().custom_metadata_map["dvml"])
    x = np.stack([prepare(p, meta["preprocess"]) for p in images])
    z = sess.run([meta["output"]["name"]], {meta["input"]["name"]: x})[0]
elif model_path.endswith(".pt2"):
    import torch
    extra = {"dvml.json": ""}
    program = torch.export.load(model_path, extra_files=extra)
    meta = json.loads(extra["dvml.json"])
    x = np.stack([prepare(p, meta["preprocess"]) for p in images])
    with torch.no_grad():
        z = program.module()(torch.from_numpy(x)).numpy()
else:
    import torch
    extra = {"dvml.json": ""}
    model = torch.jit.load(model_path, _extra_files=extra)
    meta = json.loads(extra["dvml.json"])
    x = np.stack([prepare(p, meta["preprocess"]) for p in images])
    with torch.no_grad():
        z = model(torch.from_numpy(x)).numpy()
assert not any(m == "dvml" or m.startswith("dvml.") for m in sys.modules if sys.modules[m] is not None)
np.save(out_path, z)
print(json.dumps({"embedding_dim": meta["embedding_dim"], "shape": list(z.shape)}))
'''


def fresh_embed(model: Path, images: list[Path], tmp_path: Path) -> np.ndarray:
    out = tmp_path / f"{model.stem}_z.npy"
    proc = subprocess.run([sys.executable, "-c", FRESH, str(model), str(out), *map(str, images)],
                          capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return np.load(out)


def split_images(pipeline, cache_key: str = "cache") -> list[Path]:
    paths = load_split(pipeline[cache_key], "test").paths
    return [pipeline["root"] / p for p in paths]


def _export(target: Path, out: Path, *extra: str) -> None:
    result = runner.invoke(app, ["export", str(target), "-o", str(out), *extra])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.stdout


def test_torchscript_in_a_fresh_process_equals_evaluate(pipeline, tmp_path, evaluate_embeddings):
    model = tmp_path / "model.pt"
    _export(pipeline["run"], model)
    z = fresh_embed(model, split_images(pipeline), tmp_path)
    ref = evaluate_embeddings(pipeline["run"])  # float16 cache: the model rounds features as the cache did
    assert z.shape == ref.shape == (12, 16)
    diff = float(np.abs(z - ref).max())
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("key", ["run32", "cache32"])
def test_onnx_in_a_fresh_process_equals_evaluate(pipeline, tmp_path, evaluate_embeddings, key):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    model = tmp_path / "model.onnx"
    _export(pipeline[key], model)
    z = fresh_embed(model, split_images(pipeline, "cache32"), tmp_path)
    ref = evaluate_embeddings(pipeline[key])  # run32: z_I (16-D); cache32: the raw-feature floor (1024-D)
    assert z.shape == ref.shape
    diff = float(np.abs(z - ref).max())
    assert diff <= 1e-4, diff


def test_onnx_on_a_float16_cache_is_within_one_float16_step(pipeline, tmp_path, evaluate_embeddings):
    """ONNX Runtime's kernels move a few features across a float16 rounding boundary (see the export docstring):
    each such feature moves z_I by at most one float16 step times its embedding weight."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    import torch

    from dvml.cache import read_info
    from dvml.runs import load_checkpoint

    model = tmp_path / "model16.onnx"
    _export(pipeline["run"], model)
    z = fresh_embed(model, split_images(pipeline), tmp_path)
    ref = evaluate_embeddings(pipeline["run"])
    w = load_checkpoint(pipeline["run"])["model"]["embedding.weight"].abs()
    feats = torch.from_numpy(load_split(pipeline["cache"], "test", views=[0]).features[:, 0])
    step = torch.from_numpy(np.spacing(feats.numpy().astype(np.float16)).astype(np.float32))  # (N, D)
    bound = (step @ w.T).numpy()  # every feature one step off, with the worst sign: a true upper bound
    assert read_info(pipeline["cache"]).splits["test"].dtype == "float16"
    assert (np.abs(z - ref) <= bound + 1e-5).all()


def test_finetune_run_exports_its_tuned_backbone(pipeline, finetuned, tmp_path, evaluate_embeddings):
    from dvml.extract import read_dataset

    model = tmp_path / "ft.pt"
    _export(finetuned, model)
    index = read_dataset("folder", pipeline["root"])
    z = fresh_embed(model, [pipeline["root"] / s.path for s in index.test], tmp_path)
    ref = evaluate_embeddings(finetuned)
    assert z.shape == ref.shape == (12, 16)
    assert float(np.abs(z - ref).max()) <= 1e-4


def test_the_record_in_the_file(pipeline, tmp_path):
    import torch

    from dvml.cache import fingerprint, read_info

    model = tmp_path / "model.pt"
    _export(pipeline["run"], model)
    extra = {"dvml.json": ""}
    torch.jit.load(str(model), _extra_files=extra)
    meta = json.loads(extra["dvml.json"])
    info = read_info(pipeline["cache"])
    pre = info.extra["preprocess"]
    assert meta["preprocess"]["resize"] == pre["resize"] == 64 and meta["preprocess"]["crop"] == pre["crop"] == 56
    assert meta["preprocess"]["mean"] == pre["mean"] and meta["preprocess"]["std"] == pre["std"]
    assert meta["input"]["shape"] == ["batch", 3, 56, 56] and meta["input"]["dtype"] == "uint8"
    assert meta["embedding_dim"] == 16 and meta["feature_rounding"] == "float16"
    src = meta["source"]
    assert src["kind"] == "heads" and src["cache_fingerprint"] == fingerprint(pipeline["cache"])
    assert src["weights"] == info.weights and src["backbone"] == info.backbone


def test_loaded_back_through_dvml(pipeline, tmp_path, evaluate_embeddings):
    from dvml.serve.export import load_exported

    model = tmp_path / "model.pt"
    _export(pipeline["run"], model)
    m = load_exported(model)
    assert float(np.abs(m.embed_paths(split_images(pipeline)) - evaluate_embeddings(pipeline["run"])).max()) <= 1e-4


def test_bad_requests_are_one_line_errors(pipeline, tmp_path, one_line_error):
    from dvml.extract.synth import SynthConfig, generate

    one_line_error(["export", str(pipeline["run"]), "-o", str(tmp_path / "m.zip")], "unknown model format")
    directory = tmp_path / "adir"  # (one named m.pt: test_a_directory_as_export_target_is_one_line)
    directory.mkdir()
    one_line_error(["export", str(pipeline["run"]), "-o", str(directory)],
                   f"--out {directory}: is a directory; give a file path ending .pt2 (torch.export), .pt "
                   "(TorchScript) or .onnx")
    existing = tmp_path / "m.pt"
    existing.write_bytes(b"x")
    one_line_error(["export", str(pipeline["run"]), "-o", str(existing)], "already exists")
    synth = generate(SynthConfig(n_classes=4, images_per_class=2, views=1, feature_dim=8, class_dim=4, hidden_dim=8),
                     tmp_path / "synth.h5")
    one_line_error(["export", str(synth), "-o", str(tmp_path / "s.pt")],
                   "made by backbone 'synthetic-nonlinear-map', which dvml cannot rebuild")
    one_line_error(["export", str(tmp_path / "nothing"), "-o", str(tmp_path / "n.pt")], "no such run directory")


def test_a_run_whose_cache_moved_is_refused(pipeline, tmp_path, one_line_error):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(pipeline["run"], run)
    cfg = json.loads((run / "config.json").read_text())
    cfg["cache"] = str(tmp_path / "gone.h5")
    (run / "config.json").write_text(json.dumps(cfg))
    one_line_error(["export", str(run), "-o", str(tmp_path / "m.pt")], "no longer exists")


def test_damaged_model_files_are_named(tmp_path):
    from dvml.errors import DvmlError
    from dvml.serve.export import load_exported

    for name in ("bad.pt", "bad.onnx"):
        (tmp_path / name).write_bytes(b"not a model" * 10)
        with pytest.raises(DvmlError, match=f"{name}: not a loadable"):
            load_exported(tmp_path / name)


def test_any_backbone_named_by_the_cache(pipeline, tmp_path, evaluate_embeddings):
    """A fit-heads run on a resnet18 cache (random weights) exports resnet18 with the cache's preprocessing."""
    from dvml.extract import ExtractConfig, run

    from .conftest import _fit

    cache = run(ExtractConfig(dataset="folder", root=pipeline["root"], out=tmp_path / "r18.h5", backbone="resnet18",
                              weights="none", views=1, resize=48, crop=40, workers=0, device="cpu", batch_size=8,
                              dtype="float32")).path
    run_dir = _fit(cache, tmp_path / "run")
    for suffix in (".pt", ".onnx"):
        if suffix == ".onnx":
            pytest.importorskip("onnxruntime")
        model = tmp_path / f"r18{suffix}"
        _export(run_dir, model)
        z = fresh_embed(model, split_images(pipeline), tmp_path)
        assert float(np.abs(z - evaluate_embeddings(run_dir)).max()) <= 1e-4
    from dvml.serve.export import load_exported

    meta = load_exported(tmp_path / "r18.pt").meta
    assert meta["source"]["backbone"] == "torchvision.resnet18" and meta["preprocess"]["crop"] == 40


# ------------------------------------------------------------------------------------------ where the file goes
def test_export_writes_through_a_symlink(pipeline, tmp_path):
    from dvml.serve.export import load_exported

    store = tmp_path / "store"
    store.mkdir()
    (tmp_path / "new.pt").symlink_to(store / "new.pt")  # dangling: refused, then with --overwrite created
    (store / "old.pt").write_bytes(b"an older model")
    (tmp_path / "old.pt").symlink_to(store / "old.pt")
    r = runner.invoke(app, ["export", str(pipeline["run"]), "-o", str(tmp_path / "new.pt")])
    assert_one_line_error(r, r.output, f"{tmp_path / 'new.pt'}: is a symbolic link to", "which does not exist")
    assert not (store / "new.pt").exists()
    _export(pipeline["run"], tmp_path / "new.pt", "--overwrite")
    _export(pipeline["run"], tmp_path / "old.pt", "--overwrite")
    for name in ("new.pt", "old.pt"):
        assert (tmp_path / name).is_symlink() and (store / name).is_file()
        assert load_exported(tmp_path / name).embedding_dim == 16
    assert leftovers(tmp_path) == []


def test_a_directory_as_export_target_is_one_line(pipeline, tmp_path):
    target = tmp_path / "m.pt"
    target.mkdir()
    for extra in ([], ["--overwrite"]):
        r = runner.invoke(app, ["export", str(pipeline["run"]), "-o", str(target), *extra])
        assert_one_line_error(r, r.output, f"cannot write {target}: is a directory")
    assert list(target.iterdir()) == [] and leftovers(tmp_path) == []


def _fill_then_fail(f) -> None:
    """A serializer's write on a full disk: part of the file, then ENOSPC."""
    f.write(b"\0" * 100)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _onnx_save_on_a_full_disk(model, path, *a, **k) -> None:
    with open(path, "wb") as f:
        _fill_then_fail(f)


@pytest.mark.parametrize("suffix", [".pt", ".onnx"])
def test_a_failed_export_write_is_one_line_and_keeps_the_old_file(pipeline, tmp_path, monkeypatch, suffix):
    """The serializer (torch.jit.save, onnx.save) fails half-way: one line naming the file, the old file intact, no
    temporary file; likewise when the written file fails its self-check."""
    import torch

    from dvml.serve import export

    if suffix == ".onnx":
        onnx = pytest.importorskip("onnx")
        pytest.importorskip("onnxruntime")
        monkeypatch.setattr(onnx, "save", _onnx_save_on_a_full_disk)
    else:
        monkeypatch.setattr(torch.jit, "save", lambda m, f, *a, **k: _fill_then_fail(f))
    model = tmp_path / f"m{suffix}"
    model.write_bytes(b"the old model")
    args = ["export", str(pipeline["run"]), "-o", str(model), "--overwrite"]
    r = runner.invoke(app, args)
    assert_one_line_error(r, r.output, f"cannot write {model}: No space left on device")
    assert model.read_bytes() == b"the old model" and leftovers(tmp_path) == []
    monkeypatch.undo()
    monkeypatch.setattr(export, "SELF_CHECK_TOLERANCE", -1.0)
    r = runner.invoke(app, args)
    assert_one_line_error(r, r.output, f"{model}: the exported model disagrees with dvml's", "not written")
    assert model.read_bytes() == b"the old model" and leftovers(tmp_path) == []


@pytest.mark.parametrize("key", ["run32", "cache32"])
def test_pt2_in_a_fresh_process_without_dvml_equals_evaluate(pipeline, tmp_path, evaluate_embeddings, key):
    model = tmp_path / "model.pt2"
    _export(pipeline[key], model)
    z = fresh_embed(model, split_images(pipeline, "cache32"), tmp_path)
    ref = evaluate_embeddings(pipeline[key])  # float32 cache: no feature rounding
    assert z.shape == ref.shape
    diff = float(np.abs(z - ref).max())
    print(f".pt2 ({key}) in a fresh process vs dvml evaluate: max abs diff {diff:.2e}")
    assert diff <= 1e-5, diff


def test_pt2_is_an_exported_program_with_its_record_and_a_dynamic_batch(pipeline, tmp_path):
    model = tmp_path / "model.pt2"
    _export(pipeline["run32"], model)
    extra = {"dvml.json": ""}
    program = torch.export.load(str(model), extra_files=extra)
    assert isinstance(program, torch.export.ExportedProgram)
    meta = json.loads(extra["dvml.json"])
    assert meta["format_name"] == "torch.export" and meta["preprocess"]["crop"] == 56
    for b in (1, 3, 7):
        x = torch.randint(0, 256, (b, 3, 56, 56), dtype=torch.uint8, generator=torch.Generator().manual_seed(b))
        assert tuple(program.module()(x).shape) == (b, 16)


@pytest.mark.parametrize("suffix", [".pt2", ".pt"])
def test_exported_models_refuse_float_or_misshapen_input(pipeline, tmp_path, suffix):
    """A float image in [0, 1] used to be accepted by the TorchScript file and give another embedding."""
    model = tmp_path / f"model{suffix}"
    _export(pipeline["run"], model)
    if suffix == ".pt2":
        net = torch.export.load(str(model)).module()
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            net = torch.jit.load(str(model))
    good = torch.randint(0, 256, (2, 3, 56, 56), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert tuple(net(good).shape) == (2, 16)
    for bad in (good.float() / 255, good[:, :, :40, :40], good[0]):
        with pytest.raises(Exception, match="dtype|uint8|shape|Guard|size"):
            net(bad)


def test_eager_embedder_refuses_float_input(pipeline):
    from dvml.serve.embedder import from_target

    e = from_target(pipeline["run"])
    x = torch.randint(0, 256, (2, 3, 56, 56), dtype=torch.uint8)
    with pytest.raises(ValueError, match="must be uint8"):
        e.module(x.float() / 255)


def test_export_weights_that_the_cache_does_not_use_is_an_error(pipeline, tmp_path):
    weights = tmp_path / "w.pth"
    torch.save({"x": torch.zeros(1)}, weights)
    before = sorted(p.name for p in tmp_path.iterdir())
    r = runner.invoke(app, ["export", str(pipeline["run"]), "-o", str(tmp_path / "m.pt2"), "--weights", str(weights)])
    assert_one_line_error(r, r.output, f"--weights {weights}", "drop --weights")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_torchscript_export_and_load_print_no_deprecation_warning(pipeline, tmp_path):
    model = tmp_path / "model.pt"
    proc = subprocess.run(dvml_cmd("export", pipeline["run"], "-o", model), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "deprecated" not in proc.stderr + proc.stdout
    from dvml.serve.export import load_exported

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning from dvml's loader fails
        assert load_exported(model).embedding_dim == 16
