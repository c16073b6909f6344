"""Image datasets in their official on-disk formats, with the paper's zero-shot splits.

Every reader returns a :class:`DatasetIndex`: two lists of :class:`Sample` (image path relative to the
dataset root, integer class id), train and test, whose classes are disjoint. The order is the order of the
official index file (or sorted, for folders), so it is deterministic: an extraction can resume at a row
index. Nothing is decoded here; a missing image is found when it is loaded.

===========  ==============================================================  ===============================
dataset      files under ``--root``                                          split (paper, section 4.1)
===========  ==============================================================  ===============================
``cub``      ``images.txt`` (id, path under ``images/``),                    classes 1-100 train,
             ``image_class_labels.txt`` (id, class 1..200), ``images/``      101-200 test
``cars196``  ``cars_annos.mat`` (struct ``annotations``: relative_im_path,   classes 1-98 train,
             class, test, bbox_*) and ``car_ims/``                           99-196 test
``sop``      ``Ebay_train.txt`` / ``Ebay_test.txt`` (header ``image_id        the two files (11,318 / 11,316
             class_id super_class_id path``)                                 classes)
``inshop``   ``Eval/list_eval_partition.txt`` (count, header ``image_name   the file's evaluation_status:
             item_id evaluation_status``, one image per line) and ``img/``   train (3,997 items); test =
                                                                             query + gallery (3,985 items)
``folder``   ``<root>/<class>/<image>``                                      first half of the sorted class
                                                                             names train (or ``train_classes``)
===========  ==============================================================  ===============================

In-Shop's test split is two sets: each query image is ranked against the gallery images (the field's
protocol), so its :class:`DatasetIndex` carries ``test_roles`` (one ``ROLE_QUERY``/``ROLE_GALLERY`` per
test sample, the codes of :mod:`dvml.cache.schema`); the other datasets have none (every test image is
ranked against all others).

Class ids are the dataset's own (CUB 1..200, Cars196 1..196, SOP 1..22634, In-Shop the number in
``id_00000001``); for ``folder`` they are
0-based positions in the sorted list of class directories. The split rule is a class-id threshold, so a
tiny CUB with classes 1..4 and 101..104 splits 4 / 4 exactly like the real one. CUB's
``train_test_split.txt`` and Cars196's ``test`` flag describe a different (non-zero-shot) protocol and
are not used.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from dvml.cache import schema as S
from dvml.errors import DvmlError
from dvml.extract.registry import READERS as READERS  # re-exported: name -> reader
from dvml.extract.registry import DatasetName as DatasetName
from dvml.extract.registry import dataset_spec

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")

CUB_TRAIN_CLASSES = 100  # classes 1..100 train, 101..200 test
CARS196_TRAIN_CLASSES = 98  # classes 1..98 train, 99..196 test


# DatasetName: the built-in datasets; READERS: name -> reader of every registered dataset (both views of the
# registry, :mod:`dvml.extract.registry`, where a dataset is declared).


class Sample(NamedTuple):
    """One image: ``path`` relative to the dataset root (``/``-separated), ``label`` its class id."""

    path: str
    label: int


@dataclass(frozen=True)
class DatasetIndex:
    """The images of a dataset split zero-shot into train and test classes.

    Invariants: both splits are non-empty and their label sets are disjoint; ``root / sample.path`` is
    where an image should be (it may still be missing or unreadable).
    """

    name: str
    root: Path
    train: list[Sample]
    test: list[Sample]
    split_rule: str  # human-readable, stored in the cache provenance
    class_names: dict[int, str] = field(default_factory=dict)  # label -> name where the dataset has names
    test_roles: tuple[int, ...] | None = None  # per test sample: schema.ROLE_QUERY/GALLERY/BOTH (In-Shop)

    def split(self, name: str) -> list[Sample]:
        """``"train"`` or ``"test"`` samples."""
        if name not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {name!r}")
        return self.train if name == "train" else self.test

    def digest(self) -> str:
        """Hash of both sample lists (paths and labels, in order): identifies the job for resuming."""
        h = hashlib.blake2b(digest_size=12)
        for split in (self.train, self.test):
            for s in split:
                h.update(f"{s.path}\t{s.label}\n".encode())
            h.update(b"--split--\n")
        if self.test_roles is not None:  # absent for datasets without roles: their digests are unchanged
            h.update(("roles:" + ",".join(map(str, self.test_roles))).encode())
        return h.hexdigest()

    def __post_init__(self):
        for name in ("train", "test"):
            if not self.split(name):
                raise DvmlError(f"{self.root}: the {name} split of {self.name} is empty ({self.split_rule})")
        overlap = {s.label for s in self.train} & {s.label for s in self.test}
        if overlap:
            shown = ", ".join(map(str, sorted(overlap)[:10]))
            raise DvmlError(f"{self.root}: {len(overlap)} class id(s) are in both train and test "
                            f"(zero-shot split broken): {shown}")
        if self.test_roles is not None:
            roles = tuple(int(r) for r in self.test_roles)
            object.__setattr__(self, "test_roles", roles)
            if len(roles) != len(self.test) or not set(roles) <= set(S.ROLE_VALUES):
                raise ValueError(f"test_roles must hold one of {S.ROLE_VALUES} per test sample")
            for bit, name in ((S.ROLE_QUERY, "query"), (S.ROLE_GALLERY, "gallery")):
                if not any(r & bit for r in roles):
                    raise DvmlError(f"{self.root}: the test split of {self.name} has no {name} image")


# ---------------------------------------------------------------------------------------------- helpers
def _require_dir(root: Path, hint: str) -> Path:
    root = Path(root).expanduser()
    if not root.exists():
        raise DvmlError(f"{root}: not found — {hint}")
    if not root.is_dir():
        raise DvmlError(f"{root}: not a directory — {hint}")
    return root


def _require_file(path: Path, hint: str) -> Path:
    if not path.is_file():
        raise DvmlError(f"{path}: not found — {hint}")
    return path


def _text_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 list file; DvmlError naming it when it is not text (a binary or damaged file)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DvmlError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DvmlError(f"{path}: not a UTF-8 text file (byte {data[e.start]:#04x} at offset {e.start}); is it the "
                        "dataset's own list file, complete?") from None
    if "\0" in text:
        raise DvmlError(f"{path}: not a text file (it holds NUL bytes); is it the dataset's own list file?")
    return text.splitlines(keepends=True)


def image_path(path: Path, lineno: int | str, rel: str) -> str:
    """A listed image path, ``/``-separated, that stays inside the dataset folder; DvmlError naming the list file
    and line for an absolute path, a ``..`` component or a control character."""
    rel = str(rel).strip().replace("\\", "/")
    if not rel or rel.startswith("/") or (len(rel) > 1 and rel[1] == ":") or ".." in rel.split("/"):
        raise DvmlError(f"{path}:{lineno}: image path {rel!r} leaves the dataset folder (absolute or with '..')")
    if not rel.isprintable():
        raise DvmlError(f"{path}:{lineno}: image path {rel!r} holds a control character")
    return rel


def _read_table(path: Path, n_fields: int, *, header: Sequence[str] | None = None) -> list[tuple[int, list[str]]]:
    """Whitespace-separated rows of ``path`` as (line number, fields); the last field may hold spaces."""
    rows = []
    lines = iter(enumerate(_text_lines(path), start=1))
    if header is not None:
        first = next(lines, None)
        if first is None or first[1].split() != list(header):
            raise DvmlError(f"{path}: line 1 should be the header {' '.join(header)!r}")
    for lineno, line in lines:
        line = line.strip()
        if not line:
            continue
        parts = line.split(maxsplit=n_fields - 1)
        if len(parts) != n_fields:
            raise DvmlError(f"{path}:{lineno}: expected {n_fields} fields, got {line!r}")
        rows.append((lineno, parts))
    if not rows:
        raise DvmlError(f"{path}: no entries")
    return rows


def _int(path: Path, lineno: int | str, value, what: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DvmlError(f"{path}:{lineno}: {what} must be an integer, got {value!r}") from None


def _threshold_split(name: str, root: Path, samples: list[Sample], n_train: int, total: int,
                     class_names: dict[int, str] | None = None) -> DatasetIndex:
    rule = f"classes 1-{n_train} train, {n_train + 1}-{total} test"
    return DatasetIndex(name=name, root=root, train=[s for s in samples if s.label <= n_train],
                        test=[s for s in samples if s.label > n_train], split_rule=rule,
                        class_names=class_names or {})


# ---------------------------------------------------------------------------------------------- readers
def read_cub(root: str | Path) -> DatasetIndex:
    """CUB-200-2011: ``images.txt`` + ``image_class_labels.txt`` (+ ``classes.txt`` for names).

    Paths are ``images/<class dir>/<file>``; classes 1-100 train, 101-200 test.
    """
    hint = ("is `root` the CUB_200_2011 directory (with images.txt, image_class_labels.txt, images/)? "
            "`dvml data download cub --out DIR` downloads and verifies it into DIR/CUB_200_2011")
    root = _require_dir(root, hint)
    images_txt = _require_file(root / "images.txt", hint)
    labels_txt = _require_file(root / "image_class_labels.txt", hint)
    _require_dir(root / "images", hint)
    paths = {}
    for lineno, (img_id, rel) in _read_table(images_txt, 2):
        paths[_int(images_txt, lineno, img_id, "image id")] = image_path(images_txt, lineno, rel)
    labels = {}
    for lineno, (img_id, cls) in _read_table(labels_txt, 2):
        labels[_int(labels_txt, lineno, img_id, "image id")] = _int(labels_txt, lineno, cls, "class id")
    if paths.keys() != labels.keys():
        missing = sorted(paths.keys() - labels.keys())[:5] or sorted(labels.keys() - paths.keys())[:5]
        raise DvmlError(f"{root}: images.txt and image_class_labels.txt list different image ids "
                        f"(e.g. {missing})")
    names = {}
    if (root / "classes.txt").is_file():
        for lineno, (cls, name) in _read_table(root / "classes.txt", 2):
            names[_int(root / "classes.txt", lineno, cls, "class id")] = name
    samples = [Sample(f"images/{paths[i]}", labels[i]) for i in sorted(paths)]
    return _threshold_split("cub", root, samples, CUB_TRAIN_CLASSES, 200, names)


def read_cars196(root: str | Path) -> DatasetIndex:
    """Cars196 ("all images" release): ``cars_annos.mat`` + ``car_ims/``; classes 1-98 / 99-196.

    The struct array ``annotations`` has fields ``relative_im_path`` (e.g. ``car_ims/000001.jpg``),
    ``bbox_x1..bbox_y2``, ``class`` (1..196) and ``test``; bounding boxes and the ``test`` flag are not
    used (the zero-shot protocol uses whole images and splits by class).
    """
    import numpy as np
    import scipy.io

    hint = ("is `root` the Cars196 directory with cars_annos.mat and car_ims/ (the 'all images' release)? "
            "`dvml data download cars196` says where to get it, `dvml data verify cars196 DIR` checks it")
    root = _require_dir(root, hint)
    mat_path = _require_file(root / "cars_annos.mat", hint)
    _require_dir(root / "car_ims", hint)
    try:
        mat = scipy.io.loadmat(mat_path, squeeze_me=True, struct_as_record=True)
    except Exception as e:  # scipy raises several types for a damaged file
        raise DvmlError(f"{mat_path}: cannot be read as a MATLAB file ({e})") from None
    if "annotations" not in mat:
        raise DvmlError(f"{mat_path}: no 'annotations' struct array")
    ann = np.atleast_1d(mat["annotations"])
    fields = ann.dtype.names or ()
    for needed in ("relative_im_path", "class"):
        if needed not in fields:
            raise DvmlError(f"{mat_path}: 'annotations' has no field {needed!r} (fields: {', '.join(fields)})")
    samples = [Sample(image_path(mat_path, f"annotations[{i}]", rel), _int(mat_path, f"annotations[{i}]", cls, "class"))
               for i, (rel, cls) in enumerate(zip(ann["relative_im_path"], ann["class"], strict=True))]
    names = {}
    if "class_names" in mat:
        names = {i + 1: str(n) for i, n in enumerate(np.atleast_1d(mat["class_names"]))}
    return _threshold_split("cars196", root, samples, CARS196_TRAIN_CLASSES, 196, names)


SOP_HEADER = ("image_id", "class_id", "super_class_id", "path")


def read_sop(root: str | Path) -> DatasetIndex:
    """Stanford Online Products: ``Ebay_train.txt`` / ``Ebay_test.txt``; paths relative to the root."""
    hint = ("is `root` the Stanford_Online_Products directory (with Ebay_train.txt, Ebay_test.txt)? "
            "`dvml data download sop --out DIR` downloads and verifies it into DIR/Stanford_Online_Products")
    root = _require_dir(root, hint)
    splits = {}
    for split in ("train", "test"):
        path = _require_file(root / f"Ebay_{split}.txt", hint)
        splits[split] = [Sample(image_path(path, lineno, rel), _int(path, lineno, cls, "class_id"))
                         for lineno, (_, cls, _, rel) in _read_table(path, 4, header=SOP_HEADER)]
    return DatasetIndex("sop", root, splits["train"], splits["test"],
                        split_rule="Ebay_train.txt train, Ebay_test.txt test")


INSHOP_PARTITION = "Eval/list_eval_partition.txt"
INSHOP_HEADER = ("image_name", "item_id", "evaluation_status")
INSHOP_STATUS = {"query": S.ROLE_QUERY, "gallery": S.ROLE_GALLERY}


def read_inshop(root: str | Path) -> DatasetIndex:
    """In-Shop Clothes Retrieval (DeepFashion): ``Eval/list_eval_partition.txt`` + ``img/``.

    The file's first line is the number of images, the second the header ``image_name item_id
    evaluation_status``, then one ``img/<...>.jpg id_00000001 train|query|gallery`` per line. Labels are the
    item numbers; train = ``train`` rows, test = ``query`` and ``gallery`` rows in file order, with
    ``test_roles`` saying which.
    """
    hint = ("is `root` the In-Shop Clothes Retrieval directory (with Eval/list_eval_partition.txt and img/)? "
            "`dvml data download inshop` says how to get it")
    root = _require_dir(root, hint)
    path = _require_file(root / INSHOP_PARTITION, hint)
    _require_dir(root / "img", hint)
    lines = [(i, line.strip()) for i, line in enumerate(_text_lines(path), start=1)]
    lines = [(i, line) for i, line in lines if line]
    if len(lines) < 2:
        raise DvmlError(f"{path}: expected the image count, the header {' '.join(INSHOP_HEADER)!r} and entries")
    declared = _int(path, lines[0][0], lines[0][1], "the image count (line 1)")
    if lines[1][1].split() != list(INSHOP_HEADER):
        raise DvmlError(f"{path}:{lines[1][0]}: should be the header {' '.join(INSHOP_HEADER)!r}")
    train, test, roles = [], [], []
    for lineno, line in lines[2:]:
        parts = line.split()
        if len(parts) != 3:
            raise DvmlError(f"{path}:{lineno}: expected 3 fields (image_name item_id evaluation_status), "
                            f"got {line!r}")
        rel, item, status = parts
        if not item.startswith("id_"):
            raise DvmlError(f"{path}:{lineno}: item_id must look like id_00000001, got {item!r}")
        sample = Sample(image_path(path, lineno, rel), _int(path, lineno, item[3:], "the item number"))
        if status == "train":
            train.append(sample)
        elif status in INSHOP_STATUS:
            test.append(sample)
            roles.append(INSHOP_STATUS[status])
        else:
            raise DvmlError(f"{path}:{lineno}: evaluation_status must be train, query or gallery, got {status!r}")
    if declared != len(train) + len(test):
        raise DvmlError(f"{path}: line 1 says {declared} images but {len(train) + len(test)} are listed "
                        "(truncated file?)")
    return DatasetIndex("inshop", root, train, test, test_roles=tuple(roles),
                        split_rule="list_eval_partition.txt: train; test = query ranked against gallery")


def read_folder(root: str | Path, *, train_classes: int | None = None) -> DatasetIndex:
    """``<root>/<class>/<image>``: labels are positions in the sorted class names (0-based).

    The first ``train_classes`` classes (default: half, rounded down) are train, the rest test. Class
    directories without images are ignored (logged); files directly under the root are ignored.
    """
    hint = "expected `root`/<class name>/<image files>"
    root = _require_dir(root, hint)
    classes = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(f.relative_to(root).as_posix() for f in d.rglob("*")
                       if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
        if files:
            classes.append((d.name, files))
        else:
            log.warning("%s: no images, ignored", d)
    if len(classes) < 2:
        raise DvmlError(f"{root}: found {len(classes)} class director{'y' if len(classes) == 1 else 'ies'} "
                        f"with images; need at least 2 ({hint})")
    n_train = len(classes) // 2 if train_classes is None else train_classes
    if not 1 <= n_train < len(classes):
        raise DvmlError(f"`train_classes` {n_train}: must be between 1 and {len(classes) - 1} "
                        f"({root} has {len(classes)} classes)")
    samples = [[Sample(f, label) for f in files] for label, (_, files) in enumerate(classes)]
    return DatasetIndex(
        name="folder", root=root,
        train=[s for per_class in samples[:n_train] for s in per_class],
        test=[s for per_class in samples[n_train:] for s in per_class],
        split_rule=f"sorted class directories 0-{n_train - 1} train, {n_train}-{len(classes) - 1} test",
        class_names={label: name for label, (name, _) in enumerate(classes)})


def read_dataset(name: DatasetName | str, root: str | Path, *, train_classes: int | None = None) -> DatasetIndex:
    """Read any registered dataset with its reader. ``train_classes`` applies to datasets whose split takes it
    (``folder``)."""
    spec = dataset_spec(name)
    if spec.train_classes:
        return spec.reader(root, train_classes=train_classes)
    if train_classes is not None:
        raise DvmlError(f"`train_classes` applies to the folder dataset only; {spec.name} has a fixed split")
    return spec.reader(root)
