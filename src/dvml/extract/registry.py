"""The datasets, one entry each: the one place a dataset is declared.

A :class:`DatasetSpec` holds everything dvml knows about a dataset: its name (``dvml extract NAME``), the reader
of its on-disk format, where its files come from (a :class:`DatasetSource`, None for a user's own images), its
official counts (the source's), the Recall@K values its results are reported at, and whether its split takes
``train_classes``. :class:`~dvml.extract.datasets.DatasetName`, :data:`~dvml.extract.datasets.READERS`,
:data:`~dvml.extract.download.SOURCES`, :func:`~dvml.evaluate.core.default_ks` and the CLI's dataset arguments
(``dvml extract``, ``dvml data download|verify``) all read this registry.

Adding a dataset is one :func:`register_dataset` call::

    register_dataset(DatasetSpec("my-set", reader=read_my_set, ks=(1, 5, 10)))

where ``read_my_set(root) -> DatasetIndex`` (:mod:`dvml.extract.datasets`), after which
``ExtractConfig(dataset="my-set", ...)`` and ``dvml extract my-set --root DIR --out FILE.h5`` extract it and
``dvml evaluate`` scores it at those Ks (register it before the CLI runs, e.g. in a module the program imports
first). Give it a ``source`` and ``dvml data download|verify my-set`` fetch and check it too.

The built-in entries name their readers lazily (:mod:`dvml.extract.datasets` imports this module), so reading the
registry imports no reader code.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from dvml.errors import FieldError

#: Recall@K values of CUB-200-2011 and Cars196 (the paper's tables): a dataset's default.
DEFAULT_KS: tuple[int, ...] = (1, 2, 4, 8)
SOP_KS: tuple[int, ...] = (1, 10, 100, 1000)  # Stanford Online Products
INSHOP_KS: tuple[int, ...] = (1, 10, 20, 30, 40, 50)  # In-Shop Clothes Retrieval (the field's convention)


@dataclass(frozen=True)
class RemoteFile:
    """One file of a dataset release.

    ``name``: its file name in ``--to``; ``md5``: the published checksum (None: none published); ``max_bytes``:
    an upper bound a little above the published size (a download that sends more is not the published file and
    is stopped there, whether or not the server announced its length; None: no bound);
    ``urls``: where to download it, tried in order (empty: no official download); ``top``: for an archive,
    the top-level folder it contains (None: not an archive); ``dest``: where that folder (or the file) goes
    inside the dataset directory (``""``: it *is* the dataset directory); ``also``: other places in ``--to``
    where people commonly have it (the layout of the release's own folders), looked at after ``name``.
    """

    name: str
    md5: str | None
    urls: tuple[str, ...] = ()
    top: str | None = None
    dest: str = ""
    also: tuple[str, ...] = ()
    max_bytes: int | None = None

    def local(self, to: Path) -> Path | None:
        """Where this file already is in ``to`` (``to/name`` or one of ``also``), or None."""
        return next((p for p in (to / self.name, *(to / a for a in self.also)) if p.is_file()), None)


@dataclass(frozen=True)
class Counts:
    """The official size of a dataset's zero-shot split (images and classes; In-Shop query/gallery sizes)."""

    train_images: int
    train_classes: int
    test_images: int
    test_classes: int
    query: int | None = None
    gallery: int | None = None


@dataclass(frozen=True)
class DatasetSource:
    """Where a dataset comes from and what it must look like once on disk."""

    name: str  # a DatasetName value
    folder: str  # the dataset directory under --to (what `dvml extract --root` takes)
    files: tuple[RemoteFile, ...]
    counts: Counts | None
    obtain: str  # how to get the files by hand (where people obtain them)
    homepage: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def downloadable(self) -> bool:
        return all(f.urls for f in self.files)


def _reader(name: str) -> Callable:
    """A built-in reader, imported from :mod:`dvml.extract.datasets` when first called."""

    def read(root, **kwargs):
        return getattr(importlib.import_module("dvml.extract.datasets"), name)(root, **kwargs)

    read.__name__ = read.__qualname__ = name
    return read


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset.

    Attributes:
        name: the name ``dataset`` takes (a config field value, ``dvml extract NAME``).
        reader: ``reader(root)`` (``reader(root, train_classes=N)`` when ``train_classes``) → a
            :class:`~dvml.extract.datasets.DatasetIndex` (its ``name`` this spec's).
        source: where the files come from and what they must look like (None: nothing to download or verify).
        ks: the Recall@K values results are reported at (``dvml evaluate``'s default).
        train_classes: the split takes ``train_classes`` (the number of classes in train); otherwise it is fixed.
        doc: one line for listings and ``--help``.
    """

    name: str
    reader: Callable[..., object]
    source: DatasetSource | None = None
    ks: tuple[int, ...] = DEFAULT_KS
    train_classes: bool = False
    doc: str = ""

    def __post_init__(self):
        object.__setattr__(self, "ks", tuple(int(k) for k in self.ks))
        if not self.ks or any(k < 1 for k in self.ks) or list(self.ks) != sorted(set(self.ks)):
            raise ValueError(f"dataset {self.name}: ks must be increasing positive integers, got {self.ks}")
        if self.source is not None and self.source.name != self.name:
            raise ValueError(f"dataset {self.name}: its source is named {self.source.name!r}")

    @property
    def counts(self) -> Counts | None:
        """The official split sizes (the source's), None when unknown."""
        return self.source.counts if self.source is not None else None


_REGISTRY: dict[str, DatasetSpec] = {}
#: name -> reader of every registered dataset (a live view: :func:`register_dataset` updates it).
READERS: dict[str, Callable[..., object]] = {}
#: name -> source of every registered dataset that has one (a live view, as :data:`READERS`).
SOURCES: dict[str, DatasetSource] = {}


class DatasetKey(str):
    """The name of a dataset registered after :class:`DatasetName` was built (a plug-in): a string with
    ``.value``, like a ``DatasetName`` member, so code reading ``cfg.dataset.value`` works for both."""

    @property
    def value(self) -> str:
        return str(self)


def register_dataset(spec: DatasetSpec, *, replace: bool = False) -> DatasetSpec:
    """Add ``spec`` to the registry (``replace``: over an entry of the same name). Returns it."""
    if spec.name in _REGISTRY and not replace:
        raise ValueError(f"a dataset named {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    READERS[spec.name] = spec.reader
    if spec.source is not None:
        SOURCES[spec.name] = spec.source
    else:
        SOURCES.pop(spec.name, None)
    return spec


def unregister_dataset(name: str) -> None:
    """Remove a plug-in dataset (a built-in one cannot be removed: :class:`DatasetName` holds it)."""
    if "DatasetName" in globals() and name in DatasetName._value2member_map_:
        raise ValueError(f"{name} is a built-in dataset")
    _REGISTRY.pop(name, None)
    READERS.pop(name, None)
    SOURCES.pop(name, None)


def dataset_names() -> tuple[str, ...]:
    """The registered names, in registration order (built-in ones first)."""
    return tuple(_REGISTRY)


def published_names() -> tuple[str, ...]:
    """The registered datasets that have a source (``dvml data download|verify``)."""
    return tuple(n for n, s in _REGISTRY.items() if s.source is not None)


def dataset_spec(name) -> DatasetSpec:
    """The entry of ``name`` (a :class:`DatasetName`, :class:`DatasetKey` or string); ``ValueError`` naming the
    field ``dataset`` and the choices for an unknown one."""
    key = getattr(name, "value", name)
    try:
        return _REGISTRY[key]
    except (KeyError, TypeError):
        raise FieldError(f"`dataset` must be one of {', '.join(_REGISTRY)}, got {key!r}") from None


def resolve_dataset(name):
    """``name`` as a config holds it: the :class:`DatasetName` member of a built-in dataset, a :class:`DatasetKey`
    for a plug-in; ``ValueError`` for an unknown name."""
    key = dataset_spec(name).name
    return DatasetName(key) if key in DatasetName._value2member_map_ else DatasetKey(key)


def default_ks(name) -> tuple[int, ...]:
    """The Recall@K values of a registered dataset; :data:`DEFAULT_KS` for an unknown name or None."""
    spec = _REGISTRY.get(str(getattr(name, "value", name) or "").lower())
    return spec.ks if spec is not None else DEFAULT_KS


# -- the built-in datasets -----------------------------------------------------------------------------------------

_SOURCES = {
    "cub": DatasetSource(
        name="cub", folder="CUB_200_2011",
        files=(RemoteFile("CUB_200_2011.tgz", "97eceeb196236b17998738112f37df78",
                          ("https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz",),
                          top="CUB_200_2011", max_bytes=1_200_000_000),),  # published: 1.15 GB
        counts=Counts(train_images=5864, train_classes=100, test_images=5924, test_classes=100),
        obtain="CaltechDATA record 65de6-vp158 (https://data.caltech.edu/records/65de6-vp158), file "
               "CUB_200_2011.tgz",
        homepage="https://www.vision.caltech.edu/datasets/cub_200_2011/"),
    "sop": DatasetSource(
        name="sop", folder="Stanford_Online_Products",
        files=(RemoteFile("Stanford_Online_Products.zip", "7f73d41a2f44250d4779881525aea32e",
                          ("http://ftp.cs.stanford.edu/cs/cvgl/Stanford_Online_Products.zip",),
                          top="Stanford_Online_Products", max_bytes=3_300_000_000),),  # published: 2.9 GB
        counts=Counts(train_images=59551, train_classes=11318, test_images=60502, test_classes=11316),
        obtain="Stanford CVGL's server: http://ftp.cs.stanford.edu/cs/cvgl/Stanford_Online_Products.zip "
               "(also ftp://cs.stanford.edu/cs/cvgl/Stanford_Online_Products.zip)",
        homepage="https://cvgl.stanford.edu/projects/lifted_struct/"),
    "cars196": DatasetSource(
        name="cars196", folder="cars196",
        files=(RemoteFile("car_ims.tgz", "d5c8f0aa497503f355e17dc7886c3f14", top="car_ims", dest="car_ims"),
               RemoteFile("cars_annos.mat", "b407c6086d669747186bd1d764ff9dbc", dest="cars_annos.mat")),
        counts=Counts(train_images=8054, train_classes=98, test_images=8131, test_classes=98),
        obtain="a copy of the original release: its links (http://ai.stanford.edu/~jkrause/car196/car_ims.tgz "
               "and .../car196/cars_annos.mat) have returned 404 since 2023 and torchvision disabled its "
               "download, but copies circulate (archived snapshots of those URLs, mirrors kept by other "
               "metric-learning projects); whichever you use, the MD5s tell whether it is the original",
        homepage="https://ai.stanford.edu/~jkrause/cars/car_dataset.html",
        notes=("the 'all images' release is needed (car_ims/ + cars_annos.mat), not the cars_train/cars_test "
               "split of the devkit or of Kaggle's copy",)),
    "inshop": DatasetSource(
        name="inshop", folder="InShop",
        files=(RemoteFile("img.zip", None, top="img", dest="img", also=("Img/img.zip",)),
               RemoteFile("list_eval_partition.txt", None, dest="Eval/list_eval_partition.txt",
                          also=("Eval/list_eval_partition.txt",))),
        counts=Counts(train_images=25882, train_classes=3997, test_images=26830, test_classes=3985,
                      query=14218, gallery=12612),
        obtain="the DeepFashion project's In-shop Clothes Retrieval Benchmark (Google Drive folder linked from "
               "https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html): Img/img.zip and "
               "Eval/list_eval_partition.txt; no checksums are published, so verify checks the structure and "
               "the official counts",
        homepage="https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html"),
}

register_dataset(DatasetSpec("cub", _reader("read_cub"), _SOURCES["cub"], doc="CUB-200-2011 (200 bird species)"))
register_dataset(DatasetSpec("cars196", _reader("read_cars196"), _SOURCES["cars196"], doc="Cars196 (196 car models)"))
register_dataset(DatasetSpec("sop", _reader("read_sop"), _SOURCES["sop"], ks=SOP_KS,
                             doc="Stanford Online Products (22,634 products)"))
register_dataset(DatasetSpec("inshop", _reader("read_inshop"), _SOURCES["inshop"], ks=INSHOP_KS,
                             doc="In-Shop Clothes Retrieval (query ranked against gallery)"))
register_dataset(DatasetSpec("folder", _reader("read_folder"), train_classes=True,
                             doc="your own images: <root>/<class>/<image>"))
del _SOURCES

#: The built-in datasets' names (an enum member's value is its name).
DatasetName = Enum("DatasetName", [(n, n) for n in dataset_names()], type=str, module="dvml.extract.datasets")
DatasetName.__doc__ = "Datasets ``dvml extract`` reads (the built-in entries of :mod:`dvml.extract.registry`)."
