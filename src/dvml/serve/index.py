"""``dvml index`` / ``dvml search``: a faiss gallery index, the table of its rows beside it, and top-k queries.

Files (format version 1)::

    INDEX        the faiss index (:func:`dvml.retrieval.knn.build_index`): row i of the gallery is faiss id i;
                 cosine indexes hold L2-normalised vectors and use the inner product
    INDEX.json   {"format": "dvml-index", "format_version": 1, "index_file", "index_bytes", "index_digest"
                  (blake2b of INDEX), "kind" (flat | ivf | hnsw), "metric", "dim", "n", "params" (nlist,
                  hnsw_m, seed), "search" (default nprobe / ef_search), "recall_vs_exact" (approximate kinds:
                  k, queries, recall), "source" (what was indexed), "embedder" (how to embed query images: a
                  run directory, a cache or an exported model file, with its identity: a run's
                  "checkpoint_sha256" and "cache_fingerprint", a cache's "cache_fingerprint", a model file's
                  "digest"), "root" (what row paths are relative to), "class_names", "rows": {"ids", "labels",
                  "paths"}, "versions"}

Loading checks every field's type and that the two files belong together (digest, size, row count,
dimension, kind and metric), and refuses anything else with one :class:`IndexFormatError` naming the file
(and the field). ``search`` refuses an embedder whose identity changed since the index was built.
Writing holds the writer lock of both files (:func:`dvml.files.output_guard`), so two ``dvml index`` runs on
one output never leave a mixed pair.

Sources: a run directory (its cache's split, embedded with its heads exactly as ``dvml evaluate`` does), a
cache file (raw features, the floor), or a folder of images with an embedder (``--model``: an exported
``.pt2``/``.pt``/``.onnx``, a run directory or a cache). A folder's images are labelled by their first sub-folder
(sorted names → 0, 1, ...), or -1 when they lie directly in it. The test split of a query/gallery cache
(schema 2, In-Shop) is indexed by its gallery rows, the set ``dvml evaluate`` searches.

Exact (``flat``) search is the default and returns the neighbours of :func:`dvml.retrieval.knn.search`; ``ivf``
and ``hnsw`` are approximate, and their recall of the exact top-k (on up to 1,000 gallery rows used as
queries, each excluding itself) is measured at build time and stored.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dvml import files
from dvml import runs as R
from dvml.errors import DvmlError, FieldError
from dvml.retrieval import knn
from dvml.retrieval.knn import IndexKind, Metric

log = logging.getLogger(__name__)

FORMAT = "dvml-index"
FORMAT_VERSION = 1
SIDECAR_SUFFIX = ".json"
MODEL_SUFFIXES = (".pt2", ".pt", ".ts", ".onnx")
RECALL_QUERIES = 1000
RECALL_K = 10


class IndexFormatError(DvmlError):
    """An index or its row table that is missing, damaged, or not the pair written together."""


def sidecar_path(index_path: str | Path) -> Path:
    """``INDEX`` → ``INDEX.json``."""
    p = Path(index_path)
    return p.with_name(p.name + SIDECAR_SUFFIX)


def _digest():
    """The hash behind ``index_digest`` (and the embedder record's ``digest``): blake2b, 16 bytes."""
    return hashlib.blake2b(digest_size=16)


def file_digest(path: Path) -> str:
    h = _digest()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ embedders
def load_embedder(spec: str | Path, *, weights: str | Path | None = None):
    """What embeds query images: an exported model file (``.pt2``/``.pt``/``.ts``/``.onnx``), a run directory or
    a cache.

    Returns an object with ``embed_paths(paths) -> (N, E)``, ``embedding_dim`` and ``metric``.
    """
    spec = Path(spec)
    if spec.suffix.lower() in MODEL_SUFFIXES and not spec.is_dir():
        from dvml.serve.export import load_exported

        return load_exported(spec)
    from dvml.serve.embedder import from_target

    return from_target(spec, weights=weights)


IDENTITY_KEYS = ("digest", "checkpoint_sha256", "backbone_sha256", "cache_fingerprint")


def embedder_identity(spec: str | Path) -> dict:
    """What makes an embedder the one it is, as it is now: a model file's ``digest``; a run's
    ``checkpoint_sha256`` (its heads file; a finetune run's ``backbone_sha256`` too) and the
    ``cache_fingerprint`` it was fit on; a cache's ``cache_fingerprint``. A missing file gives ``None`` values."""
    spec = Path(spec)
    if spec.suffix.lower() in MODEL_SUFFIXES and not spec.is_dir():
        return {"digest": file_digest(spec) if spec.is_file() else None}
    if spec.is_dir():
        heads, backbone = spec / R.HEADS_FILE, spec / R.BACKBONE_FILE
        out = {"checkpoint_sha256": R.file_sha256(heads) if heads.is_file() else None}
        if backbone.is_file():
            out["backbone_sha256"] = R.file_sha256(backbone)
        try:
            out["cache_fingerprint"] = R.load_run(spec).cache_fingerprint
        except DvmlError:
            out["cache_fingerprint"] = None
        return out
    from dvml.cache import fingerprint

    try:
        return {"cache_fingerprint": fingerprint(spec)}
    except (DvmlError, OSError):
        return {"cache_fingerprint": None}


def embedder_record(spec: str | Path) -> dict:
    """How the sidecar names an embedder: kind, absolute path and its identity (:func:`embedder_identity`)."""
    spec = Path(spec)
    kind = "model" if spec.suffix.lower() in MODEL_SUFFIXES and spec.is_file() else \
        "run" if spec.is_dir() else "cache"
    return {"kind": kind, "path": str(spec.resolve()), **embedder_identity(spec)}


def check_embedder_unchanged(index: Path, rec: dict) -> None:
    """Refuse (DvmlError, naming the index and the embedder) an embedder whose identity differs from the one
    recorded when ``index`` was built: queries would be embedded by other weights than the gallery."""
    path = rec.get("path")
    recorded = {k: rec[k] for k in IDENTITY_KEYS if k in rec}
    if not recorded:
        raise DvmlError(f"{index}: records no identity for its embedder {path} (an older dvml index); rebuild it "
                        "with dvml index, or pass `model` to embed the queries anyway")
    now = embedder_identity(path)
    changed = [k for k, v in recorded.items() if now.get(k) != v]
    if changed:
        k = changed[0]
        was, is_ = str(recorded[k])[:12], str(now.get(k))[:12] if now.get(k) is not None else "missing"
        raise DvmlError(f"{index}: its embedder {path} changed since the index was built ({k} {was}… then, "
                        f"{is_}… now): the queries would not match the gallery; rebuild the index with dvml index, "
                        "or pass `model` to use it anyway")


def image_files(paths: Sequence[str | Path]) -> list[Path]:
    """Image files named directly, and the images under named folders (recursive, sorted)."""
    from dvml.extract.datasets import IMAGE_EXTENSIONS

    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise DvmlError(f"{p}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise DvmlError(f"{p}: no such image file or folder")
    return out


# ------------------------------------------------------------------------------------------------ gallery
@dataclass
class Gallery:
    """Rows to index: (N, E) embeddings, labels, paths (relative to ``root`` when it is set)."""

    embeddings: np.ndarray
    labels: np.ndarray
    paths: list[str]
    root: str | None
    source: dict
    embedder: dict
    class_names: dict[str, str] = field(default_factory=dict)
    ids: np.ndarray | None = None
    roles: np.ndarray | None = None  # (N,) schema ROLE_* of a query/gallery test split (schema-2 cache, In-Shop)


def _class_names(info, root: str | None) -> dict[str, str]:
    names = {str(k): str(v) for k, v in (info.extra or {}).get("class_names", {}).items()}
    if names or not root:
        return names
    try:
        from dvml.extract.datasets import read_dataset

        return {str(k): v for k, v in read_dataset(info.dataset, root).class_names.items()}
    except (DvmlError, ValueError):  # the dataset is not at its recorded root any more: names are optional
        return {}


def gallery_from_cache(cache: Path, split: str = "test") -> Gallery:
    """Raw view-0 features of a cache split."""
    from dvml.cache import fingerprint, load_split, load_test_roles, read_info

    info = read_info(cache)
    data = load_split(cache, split, views=[0])
    roles = load_test_roles(cache) if split == "test" else None
    root = (info.extra or {}).get("root")
    n = len(data.labels)
    paths = [str(p) for p in data.paths] if data.paths is not None else [f"{split}[{i}]" for i in range(n)]
    return Gallery(embeddings=data.features[:, 0, :], labels=data.labels, paths=paths, root=root,
                   source={"kind": "cache", "cache": str(cache.resolve()), "cache_fingerprint": fingerprint(cache),
                           "split": split, "dataset": info.dataset},
                   embedder=embedder_record(cache), class_names=_class_names(info, root), roles=roles)


def gallery_from_run(run_dir: Path, split: str = "test") -> Gallery:
    """A run's embeddings of a split: z_I of its cache's view-0 features (fit-heads, the cache checked as
    ``dvml evaluate`` checks it) or of the tuned backbone's features (finetune)."""
    info = R.load_run(run_dir)
    if info.kind == R.FINETUNE_KIND:
        import torch

        from dvml.finetune import extract_split, load_finetuned

        ft = load_finetuned(run_dir)
        feats, labels = extract_split(ft, split, device="cpu")
        with torch.no_grad():
            emb = ft.heads.embed(torch.from_numpy(feats)).numpy()
        root = str(ft.index.root.resolve())
        return Gallery(embeddings=emb, labels=labels, paths=[s.path for s in ft.index.split(split)], root=root,
                       source={"kind": "finetune", "run_dir": str(run_dir.resolve()), "split": split,
                               "dataset": ft.index.name},
                       embedder=embedder_record(run_dir),
                       class_names={str(k): v for k, v in ft.index.class_names.items()},
                       roles=None if split != "test" or ft.index.test_roles is None
                       else np.asarray(ft.index.test_roles, dtype=np.int8))
    from dvml.cache import fingerprint

    if info.cache is None or not Path(info.cache).exists():
        raise DvmlError(f"{run_dir}: its feature cache {info.cache} no longer exists; restore it or re-fit the heads")
    cache = Path(info.cache)
    if fingerprint(cache) != info.cache_fingerprint:
        raise DvmlError(f"{run_dir}: feature cache {cache} changed since the heads were fit; re-fit the heads or "
                        "restore the original file")
    g = gallery_from_cache(cache, split)
    from dvml.heads import embed

    g.embeddings = embed(run_dir, g.embeddings)
    g.source = {**g.source, "kind": "heads", "run_dir": str(run_dir.resolve())}
    g.embedder = embedder_record(run_dir)
    return g


def gallery_from_images(folder: Path, model: str | Path, *, weights: str | Path | None = None) -> Gallery:
    """Every image under ``folder``, embedded by ``model`` (see :func:`load_embedder`)."""
    images = image_files([folder])
    rel = [f.relative_to(folder).as_posix() for f in images]
    tops = sorted({r.split("/", 1)[0] for r in rel if "/" in r})
    code = {name: i for i, name in enumerate(tops)}
    labels = np.array([code[r.split("/", 1)[0]] if "/" in r else -1 for r in rel], dtype=np.int64)
    emb = load_embedder(model, weights=weights).embed_paths(images)
    return Gallery(embeddings=emb, labels=labels, paths=rel, root=str(folder.resolve()),
                   source={"kind": "images", "folder": str(folder.resolve()), "n_images": len(images)},
                   embedder=embedder_record(model), class_names={str(i): n for n, i in code.items()})


def gallery_from_source(source: str | Path, *, split: str = "test", model: str | Path | None = None,
                        weights: str | Path | None = None) -> Gallery:
    """A run directory or cache (with ``split``), or a folder of images (with ``model``)."""
    source = Path(source)
    if not source.exists():
        raise DvmlError(f"{source}: no such run directory, cache file or image folder")
    if source.is_dir() and not (source / R.CONFIG_FILE).is_file():
        if model is None:
            raise DvmlError(f"{source}: a folder of images needs `model` (an exported .pt2/.pt/.onnx, a run directory "
                            "or a cache) to embed them")
        return gallery_from_images(source, model, weights=weights)
    if model is not None:
        raise DvmlError(f"`model` applies to a folder of images; {source} is embedded by itself")
    if split not in ("train", "test"):
        raise FieldError(f"`split` must be train or test, got {split!r}")
    return gallery_from_run(source, split) if source.is_dir() else gallery_from_cache(source, split)


# ------------------------------------------------------------------------------------------------ build
@dataclass(frozen=True)
class IndexConfig:
    """What ``dvml index`` builds. ``nlist``/``nprobe`` for ivf, ``hnsw_m``/``ef_search`` for hnsw."""

    source: Path
    out: Path
    split: str = "test"
    model: Path | None = None
    weights: Path | None = None
    kind: IndexKind = IndexKind.flat
    metric: Metric = Metric.cosine
    nlist: int | None = None
    nprobe: int = 16
    hnsw_m: int = 32
    ef_search: int = 64
    seed: int = 0
    overwrite: bool = False

    def __post_init__(self):
        object.__setattr__(self, "source", Path(self.source))
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "kind", IndexKind(self.kind))
        object.__setattr__(self, "metric", Metric(self.metric))
        if self.split not in ("train", "test"):
            raise FieldError(f"`split` must be train or test, got {self.split!r}")
        for name in ("nprobe", "ef_search"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.nlist is not None and self.nlist < 1:
            raise FieldError(f"`nlist` must be >= 1, got {self.nlist}")
        if self.hnsw_m < 2:
            raise FieldError(f"`hnsw_m` must be >= 2, got {self.hnsw_m}")
        if files.is_stdout(self.out):
            raise ValueError("-o -: an index is a file with its row table beside it; name the index file")
        if self.out.suffix == SIDECAR_SUFFIX:
            raise ValueError(f"-o {self.out}: name the index file itself (its table goes to INDEX{SIDECAR_SUFFIX})")


def recall_vs_exact(gallery: np.ndarray, index, *, metric: Metric, k: int = RECALL_K, queries: int = RECALL_QUERIES,
                    seed: int = 0, nprobe: int | None = None, ef_search: int | None = None) -> dict:
    """Mean fraction of the exact top-k (query excluded) that the index returns, on up to ``queries`` gallery
    rows drawn with ``seed``: ``{"k", "queries", "recall"}``."""
    n = gallery.shape[0]
    k = min(k, n - 1)
    if k < 1:
        return {"k": 0, "queries": 0, "recall": 1.0}
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(queries, n), replace=False))
    _, exact = knn.search(gallery[rows], k + 1, database=gallery, metric=metric, exclude_self=False)
    _, approx = knn.search_index(index, gallery[rows], k + 1, metric=metric, nprobe=nprobe, ef_search=ef_search)
    hits = 0
    for q, e, a in zip(rows, exact, approx, strict=True):
        e_set = [i for i in e if i != q][:k]
        a_set = {i for i in a if i != q and i >= 0}
        hits += len(a_set.intersection(e_set))
    return {"k": int(k), "queries": int(rows.size), "recall": hits / (k * rows.size)}


def write_gallery_index(g: Gallery, cfg: IndexConfig) -> dict:
    """Build the index of ``g``, write INDEX and INDEX.json (each atomically, through :mod:`dvml.files`), return
    the sidecar dict.

    A query/gallery split (``g.roles``) indexes its gallery rows only, as ``dvml evaluate`` searches them; the
    row ids are then the rows' positions in the test split.
    """
    protocol = "all rows"
    if g.roles is not None:
        from dvml.cache import schema as S

        keep = np.flatnonzero((np.asarray(g.roles) & S.ROLE_GALLERY) > 0)
        g = Gallery(embeddings=g.embeddings[keep], labels=np.asarray(g.labels)[keep], paths=[g.paths[i] for i in keep],
                    root=g.root, source=g.source, embedder=g.embedder, class_names=g.class_names,
                    ids=keep if g.ids is None else np.asarray(g.ids)[keep])
        protocol = "gallery rows of a query/gallery test split (query with the query images)"
    index = knn.build_index(g.embeddings, metric=cfg.metric, kind=cfg.kind, nlist=cfg.nlist, hnsw_m=cfg.hnsw_m,
                            seed=cfg.seed)
    facts = knn.index_facts(index)
    recall = None
    if cfg.kind is not IndexKind.flat:
        recall = recall_vs_exact(g.embeddings, index, metric=cfg.metric, seed=cfg.seed, nprobe=cfg.nprobe,
                                 ef_search=cfg.ef_search)
        log.info("%s index: recall@%d of the exact neighbours %.4f on %d gallery queries", cfg.kind.value,
                 recall["k"], recall["recall"], recall["queries"])
    digest, size = _digest(), 0  # of the bytes as they are written: INDEX may be a pipe, and is not read back

    def write(f) -> None:
        def block(data: bytes) -> int:
            nonlocal size
            digest.update(data)
            size += len(data)
            return f.write(data)

        knn.write_index(index, block)

    files.write_file(cfg.out, write)
    n = int(g.embeddings.shape[0])
    ids = np.arange(n) if g.ids is None else g.ids
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "index_file": cfg.out.name, "index_bytes": size, "index_digest": digest.hexdigest(),
        **facts,
        "params": {"nlist": knn.index_nlist(index),
                   "hnsw_m": cfg.hnsw_m if cfg.kind is IndexKind.hnsw else None, "seed": cfg.seed},
        "search": {"nprobe": cfg.nprobe if cfg.kind is IndexKind.ivf else None,
                   "ef_search": cfg.ef_search if cfg.kind is IndexKind.hnsw else None},
        "recall_vs_exact": recall, "rows_indexed": protocol,
        "source": g.source, "embedder": g.embedder, "root": g.root, "class_names": g.class_names,
        "rows": {"ids": [int(i) for i in ids], "labels": [int(v) for v in g.labels], "paths": list(g.paths)},
        "versions": R.versions(),
    }
    files.write_text(json.dumps(meta) + "\n", sidecar_path(cfg.out))
    log.info("wrote %s (%s, %s, %d x %d) and %s", cfg.out, facts["kind"], facts["metric"], n, facts["dim"],
             sidecar_path(cfg.out))
    return meta


def run(cfg: IndexConfig) -> dict:
    """``dvml index``: gather the gallery of ``cfg.source`` and write INDEX + INDEX.json; returns the sidecar.

    Raises:
        WriteError: an output that cannot be written (a directory, a path under a regular file: found before the
            gallery is embedded), or a failed write.
    """
    outs = (cfg.out, sidecar_path(cfg.out))
    for p in outs:
        files.check_target(p)
    with files.output_guard(*outs, overwrite=cfg.overwrite):  # one writer; "exists" checked under the lock
        g = gallery_from_source(cfg.source, split=cfg.split, model=cfg.model, weights=cfg.weights)
        return write_gallery_index(g, cfg)


# ------------------------------------------------------------------------------------------------ load + search
@dataclass
class GalleryIndex:
    """A loaded, checked index: the faiss object and its sidecar."""

    path: Path
    index: object
    meta: dict

    @property
    def metric(self) -> Metric:
        return Metric(self.meta["metric"])

    @property
    def n(self) -> int:
        return int(self.meta["n"])

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    def row(self, i: int) -> dict:
        rows, root = self.meta["rows"], self.meta.get("root")
        label = rows["labels"][i]
        path = rows["paths"][i]
        return {"row": int(i), "id": rows["ids"][i], "label": label,
                "class_name": self.meta.get("class_names", {}).get(str(label)),
                "path": path, "file": str(Path(root) / path) if root else path}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _validate_sidecar(side: Path, meta: dict) -> None:
    """Every field search reads, of the type it needs; IndexFormatError naming the file and the field."""
    def bad(field: str, want: str, got) -> IndexFormatError:
        shown = repr(got) if len(repr(got)) <= 40 else repr(got)[:37] + "..."
        return IndexFormatError(f"{side}: field {field!r} must be {want}, got {shown}")

    for k in ("index_bytes", "dim", "n"):
        if not _is_int(meta[k]) or meta[k] < 0:
            raise bad(k, "a non-negative integer", meta[k])
    for k in ("index_digest", "kind", "metric"):
        if not isinstance(meta[k], str):
            raise bad(k, "a string", meta[k])
    if meta["metric"] not in {m.value for m in Metric}:
        raise bad("metric", f"one of {', '.join(m.value for m in Metric)}", meta["metric"])
    rows = meta["rows"]
    if not isinstance(rows, dict):
        raise bad("rows", "an object with ids, labels and paths", rows)
    for col, ok, want in (("ids", _is_int, "integers"), ("labels", _is_int, "integers"),
                          ("paths", lambda v: isinstance(v, str), "strings")):
        values = rows.get(col)
        if not isinstance(values, list):
            raise bad(f"rows.{col}", f"a list of {want}", values)
        wrong = next((v for v in values if not ok(v)), None)
        if wrong is not None or (values and not all(map(ok, values))):
            raise bad(f"rows.{col}", f"a list of {want}", wrong)
    if meta.get("root") is not None and not isinstance(meta["root"], str):
        raise bad("root", "a path string or null", meta["root"])
    names = meta.get("class_names", {})
    if not isinstance(names, dict) or not all(isinstance(v, str) for v in names.values()):
        raise bad("class_names", "an object of class names (strings)", names)
    search_defaults = meta.get("search")
    if search_defaults is not None:
        if not isinstance(search_defaults, dict):
            raise bad("search", "an object", search_defaults)
        for k in ("nprobe", "ef_search"):
            v = search_defaults.get(k)
            if v is not None and (not _is_int(v) or v < 1):
                raise bad(f"search.{k}", "a positive integer or null", v)
    emb = meta.get("embedder")
    if emb is not None and (not isinstance(emb, dict) or not isinstance(emb.get("path", ""), str)):
        raise bad("embedder", "an object with a path string", emb)


def load_index(path: str | Path) -> GalleryIndex:
    """Read INDEX and INDEX.json and check they belong together. Raises :class:`IndexFormatError`."""
    path = Path(path)
    side = sidecar_path(path)
    if not path.is_file():
        raise IndexFormatError(f"{path}: no such index file")
    if not side.is_file():
        raise IndexFormatError(f"{path}: its row table {side.name} is missing (dvml index writes both files; "
                               "keep them together)")
    try:
        meta = json.loads(side.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IndexFormatError(f"{side}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise IndexFormatError(f"{side}: not a dvml index table (format {found!r}, expected {FORMAT!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise IndexFormatError(f"{side}: format_version {meta.get('format_version')} is not supported (this dvml "
                               f"reads {FORMAT_VERSION})")
    missing = [k for k in ("index_bytes", "index_digest", "kind", "metric", "dim", "n", "rows") if k not in meta]
    if missing:
        raise IndexFormatError(f"{side}: missing key(s) {', '.join(missing)}")
    _validate_sidecar(side, meta)
    size = path.stat().st_size
    if size != meta["index_bytes"] or file_digest(path) != meta["index_digest"]:
        raise IndexFormatError(f"{path}: does not match {side.name} ({size:,} bytes, digest differs from the recorded "
                               f"{meta['index_bytes']:,} bytes): the index is damaged or the two files come from "
                               "different builds; rebuild with dvml index")
    try:
        index = knn.read_index(path)
    except knn.IndexFileError as e:
        raise IndexFormatError(str(e)) from None
    facts = knn.index_facts(index)
    wrong = [f"{k} {facts[k]} != {meta[k]}" for k in ("kind", "metric", "dim", "n") if facts[k] != meta[k]]
    rows = meta["rows"]
    for col in ("ids", "labels", "paths"):
        if not isinstance(rows.get(col), list) or len(rows[col]) != facts["n"]:
            wrong.append(f"rows.{col} has {len(rows.get(col) or [])} entries for {facts['n']} vectors")
    if wrong:
        raise IndexFormatError(f"{path}: does not match {side.name}: {'; '.join(wrong)}")
    return GalleryIndex(path=path, index=index, meta=meta)


@dataclass(frozen=True)
class SearchConfig:
    """What ``dvml search`` does."""

    index: Path
    queries: tuple[Path, ...]
    k: int = 5
    model: Path | None = None  # default: the embedder recorded in the index
    weights: Path | None = None
    exclude_self: bool = False  # drop gallery rows that are the query file itself
    nprobe: int | None = None
    ef_search: int | None = None
    json_path: Path | None = None

    def __post_init__(self):
        object.__setattr__(self, "index", Path(self.index))
        object.__setattr__(self, "queries", tuple(Path(q) for q in self.queries))
        if not self.queries:
            raise ValueError("give at least one query image or folder")
        if self.k < 1:
            raise ValueError(f"-k must be >= 1, got {self.k}")


def search_embeddings(g: GalleryIndex, queries: np.ndarray, k: int, *, exclude_rows: Sequence[int | None] = (),
                      nprobe: int | None = None, ef_search: int | None = None) -> list[list[dict]]:
    """Top-k gallery rows of each (Q, E) query embedding; ``exclude_rows[q]`` (a row or None) is skipped.

    Returns one list per query of :meth:`GalleryIndex.row` dicts plus ``rank`` (1-based) and ``distance``.
    """
    if queries.ndim != 2 or queries.shape[1] != g.dim:
        raise DvmlError(f"{g.path}: holds {g.dim}-D embeddings but the queries are {queries.shape[-1]}-D (was the "
                        "index built with another model?)")
    excluding = any(r is not None for r in exclude_rows)
    k_search = min(k + (1 if excluding else 0), g.n)
    s = g.meta.get("search") or {}
    dist, ids = knn.search_index(g.index, queries, k_search, metric=g.metric,
                                 nprobe=nprobe if nprobe is not None else s.get("nprobe"),
                                 ef_search=ef_search if ef_search is not None else s.get("ef_search"))
    out = []
    for q in range(queries.shape[0]):
        skip = exclude_rows[q] if q < len(exclude_rows) else None
        hits = []
        for d, i in zip(dist[q], ids[q], strict=True):
            if i < 0 or i == skip:
                continue
            hits.append({"rank": len(hits) + 1, "distance": float(d), **g.row(int(i))})
            if len(hits) == k:
                break
        out.append(hits)
    return out


def search(cfg: SearchConfig) -> dict:
    """``dvml search``: embed the query images and return ``{"index", "k", "metric", "embedder", "queries":
    [{"query", "results": [...]}, ...]}`` (also written to ``cfg.json_path``)."""
    if cfg.json_path is not None:
        files.check_target(cfg.json_path)  # a directory or an impossible path fails now, not after the embedding
    g = load_index(cfg.index)
    queries = image_files(cfg.queries)
    rec = g.meta.get("embedder") or {}
    spec = cfg.model if cfg.model is not None else rec.get("path")
    if spec is None:
        raise DvmlError(f"{cfg.index}: records no embedder; pass `model`")
    if cfg.model is None:
        check_embedder_unchanged(cfg.index, rec)
    embedder = load_embedder(spec, weights=cfg.weights)
    if embedder.embedding_dim != g.dim:
        raise DvmlError(f"{spec}: gives {embedder.embedding_dim}-D embeddings but {cfg.index} holds {g.dim}-D ones")
    emb = embedder.embed_paths(queries)
    exclude: list[int | None] = []
    if cfg.exclude_self:
        root = g.meta.get("root")
        where = {str((Path(root) / p).resolve()) if root else p: i for i, p in enumerate(g.meta["rows"]["paths"])}
        exclude = [where.get(str(f.resolve())) for f in queries]
    results = search_embeddings(g, emb, cfg.k, exclude_rows=exclude, nprobe=cfg.nprobe, ef_search=cfg.ef_search)
    out = {"index": str(cfg.index.resolve()), "k": cfg.k, "metric": g.metric.value, "kind": g.meta["kind"],
           "embedder": str(spec), "root": g.meta.get("root"),
           "queries": [{"query": str(f), "results": r} for f, r in zip(queries, results, strict=True)]}
    if cfg.json_path is not None:
        files.write_json(out, cfg.json_path)
        log.info("wrote %s", cfg.json_path)
    return out
