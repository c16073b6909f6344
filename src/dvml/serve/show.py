"""``dvml show``: N seeded random test queries and their top-k, marked correct or wrong, as a static page or PNG.

For each target (a run directory, or a cache for the raw-feature floor) the test split is embedded as
``dvml evaluate`` embeds it and searched with the same exact kNN (:func:`dvml.retrieval.knn.search`, the query
excluded); a query/gallery test split (a schema-2 cache, In-Shop) draws its queries from the query rows and
searches the gallery rows, as evaluate does. Several targets over the same test split share the queries (same
``seed``), so two runs — or a run and its cache — appear side by side, one row each under every query.

Output by suffix:

* ``.html``: one self-contained static page (no scripts, no server) plus the folder ``<name>_files/`` with a
  JPEG thumbnail of every image shown, referenced by relative links, so the pair can be copied anywhere.
  The page is well-formed XML (XHTML syntax), so any XML parser reads it. The folder is dvml's when it holds
  the marker file ``.dvml-show``: then its old thumbnails are replaced. An existing folder without the marker
  is refused unless ``overwrite`` (the thumbnails are then written into it, nothing of it removed); a
  symlinked folder is refused. Every file goes through :mod:`dvml.files` (atomic, writer lock).
* ``.png``: a grid (matplotlib): one row per (query, target), the query then its top-k, green frames
  for correct and red for wrong, class names above.
"""

from __future__ import annotations

import html
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dvml import files
from dvml.errors import DvmlError, FieldError
from dvml.files import write_file, write_text
from dvml.retrieval import knn
from dvml.retrieval.knn import Metric
from dvml.serve.index import Gallery, gallery_from_source

log = logging.getLogger(__name__)

THUMB_SUFFIX = "_files"
MARKER = ".dvml-show"  # in <name>_files/: the folder is dvml show's own
_THUMB_NAME = re.compile(r"row\d{6}\.jpg")


@dataclass(frozen=True)
class ShowConfig:
    """What ``dvml show`` draws. ``root=None`` uses the dataset root recorded in the cache."""

    targets: tuple[Path, ...]
    out: Path
    root: Path | None = None
    queries: int = 8
    k: int = 5
    seed: int = 0
    metric: Metric = Metric.cosine
    thumb: int = 128  # thumbnail box, pixels
    overwrite: bool = False

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(Path(t) for t in self.targets))
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "metric", Metric(self.metric))
        if self.root is not None:
            object.__setattr__(self, "root", Path(self.root))
        if not self.targets:
            raise ValueError("give at least one run directory or cache")
        if self.out.suffix.lower() not in (".html", ".png"):
            raise ValueError(f"-o {self.out}: use a .html or .png file")
        if self.queries < 1 or self.k < 1:
            raise FieldError(f"`queries` and `k` must be >= 1, got {self.queries} and {self.k}")
        if self.thumb < 16:
            raise FieldError(f"`thumb` must be >= 16 pixels, got {self.thumb}")


@dataclass
class Panel:
    """One target's retrievals: ``neighbours`` (Q, k) row ids and ``distances`` (Q, k) for the query rows."""

    name: str
    target: Path
    gallery: Gallery
    neighbours: np.ndarray
    distances: np.ndarray


def pick_queries(n: int, count: int, seed: int) -> np.ndarray:
    """``count`` distinct test rows (all when fewer), drawn with ``numpy.random.default_rng(seed)``, sorted."""
    return np.sort(np.random.default_rng(seed).choice(n, size=min(count, n), replace=False))


def _class_names(g: Gallery, root: Path | None) -> dict[str, str]:
    names = dict(g.class_names)
    dataset = g.source.get("dataset")
    if root is not None and dataset:
        try:
            from dvml.extract.datasets import read_dataset

            names = {str(k): v for k, v in read_dataset(dataset, root).class_names.items()} or names
        except (DvmlError, ValueError):
            pass
    return names


def build_panels(cfg: ShowConfig) -> tuple[list[Panel], np.ndarray, Path, dict[str, str]]:
    """Embed and search every target; returns (panels, query rows, image root, class names).

    Raises DvmlError: targets over different test splits, no image paths, no root, a missing image.
    """
    galleries = [gallery_from_source(t, split="test") for t in cfg.targets]
    first = galleries[0]
    for t, g in zip(cfg.targets[1:], galleries[1:], strict=True):
        same_roles = (g.roles is None) == (first.roles is None) and (g.roles is None or
                                                                    np.array_equal(g.roles, first.roles))
        if g.paths != first.paths or not np.array_equal(g.labels, first.labels) or not same_roles:
            raise DvmlError(f"{t}: its test split differs from {cfg.targets[0]}'s (other images or labels); "
                            "targets shown together must share one test split")
    if first.paths and first.paths[0].startswith("test["):
        raise DvmlError(f"{cfg.targets[0]}: its cache stores no image paths (/test/paths); nothing to show")
    root = cfg.root or (Path(first.root) if first.root else None)
    root = root.resolve() if root is not None else None
    if root is None:
        raise DvmlError(f"{cfg.targets[0]}: records no dataset root; pass `root`")
    n = len(first.paths)
    if first.roles is None:  # all against all, each query excluded (dvml evaluate's protocol)
        q_rows, qg = np.arange(n), None
        k = min(cfg.k, n - 1)
    else:  # queries against the gallery; a row in both never retrieves itself (dvml evaluate's protocol)
        from dvml.retrieval.protocol import query_gallery

        qg = query_gallery(first.roles)
        q_rows = qg.query
        k = min(cfg.k, qg.gallery.size - 1 if (qg.exclude >= 0).any() else qg.gallery.size)
    if k < 1 or not q_rows.size:
        raise DvmlError(f"{cfg.targets[0]}: the test split has too few items to retrieve from ({n} rows)")
    picked = pick_queries(q_rows.size, cfg.queries, cfg.seed)
    rows = q_rows[picked]
    panels = []
    for t, g in zip(cfg.targets, galleries, strict=True):
        if qg is None:
            d, i = knn.search(g.embeddings, k, metric=cfg.metric, exclude_self=True)
            d, i = d[rows], i[rows]
        else:
            d, i = knn.search(g.embeddings[rows], k, database=g.embeddings[qg.gallery], metric=cfg.metric,
                              exclude=qg.exclude[picked])
            i = qg.gallery[i]  # gallery positions -> test rows
        panels.append(Panel(name=t.name, target=t, gallery=g, neighbours=i, distances=d))
    used = sorted({int(r) for r in rows} | {int(j) for p in panels for j in p.neighbours.ravel()})
    missing = [first.paths[r] for r in used if not (root / first.paths[r]).is_file()]
    if missing:
        raise DvmlError(f"{root / missing[0]}: image not found ({len(missing)} of the {len(used)} images to show are "
                        "missing; is `root` the dataset directory?)")
    return panels, rows, root, _class_names(first, cfg.root)


def _label_name(label: int, names: dict[str, str]) -> str:
    return names.get(str(label), f"class {label}")


def _thumbnail(src: Path, dst: Path, box: int) -> None:
    from dvml.extract.transforms import load_rgb

    img = load_rgb(src)
    img.thumbnail((box, box))
    write_file(dst, lambda f: img.save(f, format="JPEG", quality=85))


def thumb_folder(out: Path) -> Path:
    """``<dir>/<stem>_files``: the thumbnails of page ``out``."""
    return out.with_name(out.stem + THUMB_SUFFIX)


def check_thumb_folder(folder: Path, overwrite: bool) -> bool:
    """Whether ``folder`` may receive the thumbnails; True when it is dvml show's own (the marker). Raises
    DvmlError for a symlink, a non-folder, or a foreign folder without ``overwrite``."""
    if os.path.islink(folder):
        raise DvmlError(f"{folder}: is a symbolic link; dvml show writes its thumbnails into a real folder beside "
                        "the page: remove the link or choose another -o")
    if not folder.exists():
        return False
    if not folder.is_dir():
        raise DvmlError(f"{folder}: exists and is not a folder; the page's thumbnails go there: move it away or "
                        "choose another -o")
    if (folder / MARKER).is_file():
        return True
    if not overwrite:
        raise DvmlError(f"{folder}: exists and was not written by dvml show; pass `overwrite` to write the "
                        "thumbnails into it (nothing in it is removed), or choose another -o")
    return False


def write_html(cfg: ShowConfig, panels: list[Panel], rows: np.ndarray, root: Path, names: dict[str, str]) -> Path:
    """The page and its thumbnail folder (replaced whole). Returns the page's path."""
    g = panels[0].gallery
    labels = g.labels
    folder = thumb_folder(cfg.out)
    if check_thumb_folder(folder, cfg.overwrite):  # ours: its old thumbnails go (nothing else in it)
        for old in folder.iterdir():
            if _THUMB_NAME.fullmatch(old.name) and old.is_file() and not old.is_symlink():
                old.unlink()
    files.make_dir(folder)
    write_text(f"thumbnails of {cfg.out.name}, written by dvml show (replaced when the page is)\n", folder / MARKER)
    srcs: dict[int, str] = {}

    def src(row: int) -> str:
        if row not in srcs:
            name = f"row{row:06d}.jpg"
            _thumbnail(root / g.paths[row], folder / name, cfg.thumb)
            srcs[row] = f"{folder.name}/{name}"
        return html.escape(srcs[row], quote=True)

    e = html.escape
    k = panels[0].neighbours.shape[1]
    out = ['<!DOCTYPE html>', '<html lang="en">', "<head>", '<meta charset="utf-8"/>',
           f"<title>dvml retrievals: {e(', '.join(p.name for p in panels))}</title>",
           "<style>body{font-family:sans-serif;margin:1em}table{border-collapse:collapse;margin-bottom:1.5em}"
           "td,th{padding:4px;vertical-align:top;text-align:center;font-size:12px}"
           "img{display:block;margin:auto}.ok img{outline:4px solid #2a2}.bad img{outline:4px solid #d22}"
           ".query img{outline:4px solid #444}.target{text-align:left;font-weight:bold;max-width:12em;"
           "word-break:break-all}.ok .mark{color:#2a2}.bad .mark{color:#d22}</style>",
           "</head>", "<body>",
           f"<h1>Top-{k} retrievals of {rows.size} test queries</h1>",
           f"<p>Queries drawn with seed {cfg.seed} from {labels.size} test items"
           + (" (query rows, searched among the gallery rows)" if g.roles is not None else "")
           + f"; exact kNN, {cfg.metric.value} distance, the query excluded (as <code>dvml evaluate</code>). "
           "Green: same class as the query; red: "
           f"another class. Images from <code>{e(str(root))}</code>.</p>",
           "<table><tr><th>target</th><th>what</th>"
           f"<th>precision@{k} (shown queries)</th><th>Recall@1 (shown queries)</th></tr>"]
    for p in panels:
        hit = labels[p.neighbours] == labels[rows][:, None]
        what = p.gallery.source.get("kind", "")
        out.append(f'<tr><td class="target">{e(str(p.target))}</td><td>{e(what)}</td>'
                   f"<td>{hit.mean():.3f}</td><td>{hit[:, 0].mean():.3f}</td></tr>")
    out.append("</table>")
    for qi, row in enumerate(rows):
        qlabel = int(labels[row])
        out.append(f"<h2>Query {qi + 1}: {e(_label_name(qlabel, names))}</h2>")
        out.append(f'<table><tr><td class="query" rowspan="{len(panels)}"><img src="{src(int(row))}" alt="query"/>'
                   f"{e(g.paths[row])}<br/>{e(_label_name(qlabel, names))}</td>")
        for pi, p in enumerate(panels):
            if pi:
                out.append("<tr>")
            out.append(f'<td class="target">{e(p.name)}</td>')
            for rank, (j, d) in enumerate(zip(p.neighbours[qi], p.distances[qi], strict=True), 1):
                ok = int(labels[j]) == qlabel
                mark = "&#10003;" if ok else "&#10007;"
                out.append(f'<td class="{"ok" if ok else "bad"}"><img src="{src(int(j))}" alt="rank {rank}"/>'
                           f'<span class="mark">{mark}</span> #{rank} {e(_label_name(int(labels[j]), names))}'
                           f"<br/>d={d:.4f}</td>")
            out.append("</tr>")
        out.append("</table>")
    out += ["</body>", "</html>", ""]
    write_text("\n".join(out), cfg.out)
    return cfg.out


def _plain(text: str) -> str:
    """``text`` as matplotlib shows it literally: ``$`` escaped (else a class name like ``e$x^{$`` is parsed as
    mathtext and fails)."""
    return text.replace("$", r"\$")


def write_png(cfg: ShowConfig, panels: list[Panel], rows: np.ndarray, root: Path, names: dict[str, str]) -> Path:
    """A (queries × targets) by (1 + k) grid of thumbnails. Returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dvml.extract.transforms import load_rgb

    g = panels[0].gallery
    labels = g.labels
    k = panels[0].neighbours.shape[1]
    n_rows = rows.size * len(panels)
    fig, axes = plt.subplots(n_rows, k + 1, figsize=(1.7 * (k + 1), 1.9 * n_rows), squeeze=False)
    cache: dict[int, np.ndarray] = {}

    def image(row: int) -> np.ndarray:
        if row not in cache:
            img = load_rgb(root / g.paths[row])
            img.thumbnail((cfg.thumb, cfg.thumb))
            cache[row] = np.asarray(img)
        return cache[row]

    def cell(ax, row: int, title: str, colour: str) -> None:
        ax.imshow(image(row))
        ax.set_xticks([])
        ax.set_yticks([])
        for s in ax.spines.values():
            s.set_edgecolor(colour)
            s.set_linewidth(4)
        ax.set_title(_plain(title), fontsize=7)

    for qi, row in enumerate(rows):
        qlabel = int(labels[row])
        for pi, p in enumerate(panels):
            r = qi * len(panels) + pi
            cell(axes[r, 0], int(row), f"query: {_label_name(qlabel, names)[:20]}", "#444444")
            if len(panels) > 1:
                axes[r, 0].set_ylabel(_plain(p.name[:18]), fontsize=7)
            for c, (j, d) in enumerate(zip(p.neighbours[qi], p.distances[qi], strict=True), 1):
                ok = int(labels[j]) == qlabel
                cell(axes[r, c], int(j), f"{'✓' if ok else '✗'} {_label_name(int(labels[j]), names)[:16]}\nd={d:.3f}",
                     "#22aa22" if ok else "#dd2222")
    fig.tight_layout()
    try:
        write_file(cfg.out, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)
    return cfg.out


def run(cfg: ShowConfig) -> dict:
    """``dvml show``: write ``cfg.out``; returns ``{"out", "queries" (test rows), "k", "targets": [{"target",
    "precision@k", "recall@1"}]}`` for the shown queries."""
    html_page = cfg.out.suffix.lower() == ".html"
    files.check_target(cfg.out)
    files.refuse_existing(cfg.out, cfg.overwrite)
    if html_page:
        check_thumb_folder(thumb_folder(cfg.out), cfg.overwrite)  # before the embedding
    guarded = (cfg.out, thumb_folder(cfg.out)) if html_page else (cfg.out,)
    with files.output_guard(*guarded[:1], overwrite=cfg.overwrite), files.writer_lock(guarded[-1]):
        panels, rows, root, names = build_panels(cfg)
        writer = write_html if html_page else write_png
        path = writer(cfg, panels, rows, root, names)
    labels = panels[0].gallery.labels
    summary = []
    for p in panels:
        hit = labels[p.neighbours] == labels[rows][:, None]
        summary.append({"target": str(p.target), f"precision@{hit.shape[1]}": float(hit.mean()),
                        "recall@1": float(hit[:, 0].mean())})
    k = int(panels[0].neighbours.shape[1])
    log.info("wrote %s (%d queries x %d target(s), top-%d)", path, rows.size, len(panels), k)
    return {"out": str(path), "queries": [int(r) for r in rows], "k": k,
            "targets": summary}
