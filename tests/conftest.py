"""Shared fixtures: tiny image datasets written in their OFFICIAL on-disk formats into ``tmp_path``.

Each fixture returns the dataset root. Images are small seeded noise-and-gradient JPEGs (a few PNGs in
the folder set) of varying sizes (64x80 landscape, 80x64 portrait), so resize and crop paths are
exercised. Class ids follow the real datasets' split rules, so the split code runs unchanged:

* ``tiny_cub``: classes 1, 2, 3 (train) and 101, 102, 103 (test), 3 images each; ``images.txt``,
  ``image_class_labels.txt``, ``classes.txt``, ``train_test_split.txt``, ``images/<NNN.Name>/<file>.jpg``.
* ``tiny_cars196``: classes 1, 2, 3 and 99, 100, 101, 3 images each; ``cars_annos.mat`` written by
  ``scipy.io.savemat`` with the real struct fields (``relative_im_path``, ``bbox_x1..bbox_y2``, ``class``,
  ``test``) and ``class_names``; images under ``car_ims/``.
* ``tiny_sop``: ``Ebay_train.txt`` (classes 1-3) / ``Ebay_test.txt`` (classes 4-6) with the real header,
  2 images per class under ``<super>_final/``.
* ``tiny_folder``: ``<root>/<class>/<image>`` with 4 classes x 3 images (first 2 classes train).
* ``http_server``: a local HTTP server (stdlib, in a thread) serving byte strings by path, honouring
  ``Range: bytes=N-`` (206 + Content-Range) unless told not to, cutting the connection mid-file on request
  (full Content-Length announced, part of the body sent, socket shut down), recording each request's path
  and Range header; ``archives``: helpers that build dataset archives and sources pointing at it.
* ``tiny_inshop``: ``Eval/list_eval_partition.txt`` (image count, header, ``img/... id_000000NN status``)
  with items 1-3 train (3 images each) and items 4-7 test split into query and gallery images
  (item -> (queries, gallery images): 4 -> (1, 2), 5 -> (2, 1), 6 -> (1, 1), 7 -> (2, 2)); images under
  ``img/<GENDER>/<category>/id_.../``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import socket
import tarfile
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dvml.extract.synth import SynthConfig, generate

SIZES = ((80, 64), (64, 80), (72, 72))  # (width, height)


def write_image(path: Path, rng: np.random.Generator, size: tuple[int, int] = (80, 64)) -> Path:
    """A seeded image (smooth gradient + noise, so crops differ) at ``path``; format from the suffix."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.uniform(0, 255, 3)[None, None, :] * (0.5 + 0.5 * np.sin(xx / rng.uniform(3, 9))[..., None])
    noisy = base + rng.normal(0, 40, (h, w, 3)) + (yy[..., None] * rng.uniform(-1, 1, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path, quality=90)
    return path


def _images_per_class(rng, n: int):
    return [SIZES[int(rng.integers(len(SIZES)))] for _ in range(n)]


@pytest.fixture
def tiny_cub(tmp_path) -> Path:
    root = tmp_path / "CUB_200_2011"
    rng = np.random.default_rng(1)
    images, labels, classes, split = [], [], [], []
    img_id = 0
    for cls in (1, 2, 3, 101, 102, 103):
        name = f"{cls:03d}.Bird_{cls}"
        classes.append(f"{cls} {name}")
        for k, size in enumerate(_images_per_class(rng, 3)):
            img_id += 1
            rel = f"{name}/Bird_{cls}_{k:04d}.jpg"
            write_image(root / "images" / rel, rng, size)
            images.append(f"{img_id} {rel}")
            labels.append(f"{img_id} {cls}")
            split.append(f"{img_id} {int(k % 2 == 0)}")
    for fname, lines in (("images.txt", images), ("image_class_labels.txt", labels), ("classes.txt", classes),
                         ("train_test_split.txt", split)):
        (root / fname).write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def tiny_cars196(tmp_path) -> Path:
    import scipy.io

    root = tmp_path / "cars196"
    rng = np.random.default_rng(2)
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    records = []
    n = 0
    for cls in (1, 2, 3, 99, 100, 101):
        for size in _images_per_class(rng, 3):
            n += 1
            rel = f"car_ims/{n:06d}.jpg"
            write_image(root / rel, rng, size)
            records.append((rel, 1.0, 2.0, float(size[0] - 2), float(size[1] - 1), float(cls), float(n % 2)))
    ann = np.zeros((1, len(records)), dtype=[(f, object) for f in fields])  # MATLAB 1xN struct array
    for i, rec in enumerate(records):
        for f, v in zip(fields, rec, strict=True):
            ann[0, i][f] = np.array([[v]]) if isinstance(v, float) else v
    class_names = np.empty((1, 196), dtype=object)
    class_names[0, :] = [f"Make Model {i + 1} 2012" for i in range(196)]
    scipy.io.savemat(root / "cars_annos.mat", {"annotations": ann, "class_names": class_names})
    return root


@pytest.fixture
def tiny_sop(tmp_path) -> Path:
    root = tmp_path / "Stanford_Online_Products"
    rng = np.random.default_rng(3)
    header = "image_id class_id super_class_id path"
    img_id = 0
    for split, class_ids in (("train", (1, 2, 3)), ("test", (4, 5, 6))):
        lines = [header]
        for cls in class_ids:
            sup = 1 + cls % 2
            for k, size in enumerate(_images_per_class(rng, 2)):
                img_id += 1
                rel = f"{('bicycle', 'chair')[sup - 1]}_final/{111085122870 + cls}_{k}.JPG"
                write_image(root / rel, rng, size)
                lines.append(f"{img_id} {cls} {sup} {rel}")
        (root / f"Ebay_{split}.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def tiny_inshop(tmp_path) -> Path:
    root = tmp_path / "InShop"
    rng = np.random.default_rng(5)
    rows = []

    def add(item: int, k: int, status: str):
        rel = f"img/{('MEN', 'WOMEN')[item % 2]}/Tees_Tanks/id_{item:08d}/{k:02d}_{k + 1}_front.jpg"
        write_image(root / rel, rng, SIZES[int(rng.integers(len(SIZES)))])
        rows.append(f"{rel}  id_{item:08d}  {status}")

    for item in (1, 2, 3):
        for k in range(3):
            add(item, k, "train")
    for item, (n_query, n_gallery) in {4: (1, 2), 5: (2, 1), 6: (1, 1), 7: (2, 2)}.items():
        statuses = ["query"] * n_query + ["gallery"] * n_gallery
        for k, status in enumerate(statuses[::-1] if item % 2 else statuses):  # interleaved as in the real file
            add(item, k, status)
    (root / "Eval").mkdir(parents=True)
    text = "\n".join([str(len(rows)), "image_name item_id evaluation_status", *rows]) + "\n"
    (root / "Eval" / "list_eval_partition.txt").write_text(text)
    return root


@pytest.fixture
def tiny_folder(tmp_path) -> Path:
    root = tmp_path / "folder"
    rng = np.random.default_rng(4)
    for c, name in enumerate(("ant", "bee", "cat", "dog")):
        for k, size in enumerate(_images_per_class(rng, 3)):
            write_image(root / name / f"{k}.{'png' if (c + k) % 4 == 3 else 'jpg'}", rng, size)
    return root


@pytest.fixture
def image_writer():
    """The seeded image writer ``write_image(path, rng, size=(w, h)) -> path`` for tests that need one image."""
    return write_image


# tiny seeded synth worlds written as real cache files (heads, losses, experiments, cli tests)
@pytest.fixture(autouse=True)
def _few_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead (and contention on shared cores)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """12 train + 12 test classes x 10 images, 3 train views, D = 64 (fast)."""
    path = tmp_path_factory.mktemp("synth") / "tiny.h5"
    return generate(SynthConfig(n_classes=24, images_per_class=10, views=3, feature_dim=64, class_dim=32,
                                variation_dim=8, hidden_dim=64, seed=3), path)


@pytest.fixture(scope="session")
def small_cache(tmp_path_factory):
    """40 + 40 classes x 16 images, 3 views, D = 128: big enough that learning shows in test Recall@1."""
    path = tmp_path_factory.mktemp("synth") / "small.h5"
    return generate(SynthConfig(n_classes=80, images_per_class=16, views=3, feature_dim=128, class_dim=64,
                                variation_dim=8, hidden_dim=128, seed=5), path)


# ------------------------------------------------------------------------------ local HTTP server, archives
class Server:
    """See ``http_server`` in the module docstring."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.cuts: dict[str, list[int]] = {}  # path -> byte counts after which to cut, one per request
        self.ranges = True
        self.log: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.log.append((self.path, self.headers.get("Range")))
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404, "Not Found")
                    return
                start = 0
                rng = self.headers.get("Range")
                if rng and server.ranges:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                cuts = server.cuts.get(self.path)
                if cuts:
                    self.wfile.write(body[:cuts.pop(0)])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)  # the connection drops mid-file
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def http_server():
    s = Server()
    yield s
    s.close()


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _tgz_of(root: Path, arcname: str, extra: dict[str, bytes] | None = None) -> bytes:
    """A .tgz holding ``root`` as ``arcname/`` (plus loose top-level files, like CUB's attributes.txt)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        tf.add(root, arcname=arcname)
        for name, data in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _tar_with(members: list[tuple[str, str, str | bytes]]) -> bytes:
    """A .tar of ("file"|"dir"|"symlink"|"hardlink"|"fifo", name, data-or-link-target) members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for kind, name, payload in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
                         "fifo": tarfile.FIFOTYPE}[kind]
            if kind in ("symlink", "hardlink"):
                info.linkname = payload
            tf.addfile(info)
    return buf.getvalue()


def _counts_of(index):
    """The dataset's actual counts as a ``download.Counts`` (what a source expects of the tiny data)."""
    from dvml.extract import download

    return download.Counts(len(index.train), len({s.label for s in index.train}), len(index.test),
                           len({s.label for s in index.test}))


def _cub_source(server, tiny_cub, cut: int | None = None):
    """The real CUB source with the server's URL, the generated archive's MD5 and the tiny counts."""
    data = _tgz_of(tiny_cub, "CUB_200_2011", extra={"attributes.txt": b"1 has_bill_shape::curved\n"})
    server.files["/CUB_200_2011.tgz"] = data
    if cut is not None:
        server.cuts["/CUB_200_2011.tgz"] = [cut]
    from dvml.extract import download
    from dvml.extract.datasets import read_dataset

    real = download.SOURCES["cub"]
    source = dataclasses.replace(real, files=(dataclasses.replace(real.files[0], md5=_md5(data),
                                                                  urls=(server.url("/CUB_200_2011.tgz"),)),),
                                 counts=_counts_of(read_dataset("cub", tiny_cub)))
    return source, data


def _leftovers(to: Path) -> list[str]:
    return sorted(p.name for p in to.iterdir()) if to.exists() else []


@pytest.fixture
def archives():
    """``md5(bytes)``, ``tgz_of(dir, arcname, extra)``, ``tar_with(members)``, ``counts_of(index)``,
    ``cub_source(server, tiny_cub, cut)`` (the CUB source served by ``http_server``), ``leftovers(dir)``."""
    return types.SimpleNamespace(md5=_md5, tgz_of=_tgz_of, tar_with=_tar_with, counts_of=_counts_of,
                                 cub_source=_cub_source, leftovers=_leftovers)
