"""The dvml feature-cache format, schema versions 1 and 2. The single source of every name in the file.

One HDF5 file per (dataset, backbone, weights, views) choice. Layout::

    /train/features  float16|float32  (N_train, P, D)   P views per training image
    /train/labels    int64            (N_train,)        class id
    /train/paths     utf-8 str        (N_train,)        optional, relative to the dataset root
    /test/features   float16|float32  (N_test, P_test, D)  view 0 is the centre view
    /test/labels     int64            (N_test,)         classes disjoint from train (zero-shot)
    /test/paths      utf-8 str        (N_test,)         optional
    /test/roles      int8             (N_test,)         version 2 only: 1 query, 2 gallery, 3 both

Versions: a file's ``schema_version`` says which of these arrays it uses.

* **1**: no ``/test/roles``. Every test row is both query and gallery: each query is ranked against all
  other test rows (CUB, Cars196, SOP).
* **2**: ``/test/roles`` marks each test row as query, gallery or both (In-Shop Clothes Retrieval: a
  separate query set ranked against a gallery). Queries are ranked against gallery rows only; a row that is
  both never retrieves itself. A complete file has at least one query and one gallery row.

Writers write version 1 unless the test split has roles, so a file without query/gallery marks stays
readable by older dvml releases; readers accept both versions.

Root attributes: ``schema_version`` (1 or 2), ``dataset``, ``backbone``, ``weights``, ``feature_dim`` (=D),
``views`` (JSON list describing each training view), ``complete`` (true only once every row of both
splits is written), ``dvml_version``. Writers may add more (``transforms``, ``seed``, ``skipped``,
``extra``); readers ignore attributes they do not know.

Optional root attribute ``preprocess`` (JSON object): how an image became the backbone's input --
``resize`` (shorter side), ``crop`` (centre/random crop size), ``mean`` and ``std`` (RGB, on [0, 1] pixels),
``interpolation`` (torchvision name). dvml's extractor always writes it; other writers may omit it.

Per split group, the attribute ``n_written`` counts rows that are durably written; a writer that
resumes truncates to it. Files written by other tools need not carry it (readers do not require it).
"""

from __future__ import annotations

SCHEMA_VERSION = 2  # the newest version this dvml reads and writes
SCHEMA_VERSION_PLAIN = 1  # what a file without query/gallery roles is written as
SUPPORTED_VERSIONS = (1, 2)

TRAIN = "train"
TEST = "test"
SPLITS = (TRAIN, TEST)

FEATURES = "features"
LABELS = "labels"
PATHS = "paths"
ROLES = "roles"  # /test/roles, schema version 2

# test-row roles (bit flags: ROLE_BOTH == ROLE_QUERY | ROLE_GALLERY)
ROLE_QUERY = 1
ROLE_GALLERY = 2
ROLE_BOTH = 3
ROLE_VALUES = (ROLE_QUERY, ROLE_GALLERY, ROLE_BOTH)
ROLE_DTYPE = "int8"

FEATURE_DTYPES = ("float16", "float32")
LABEL_DTYPE = "int64"

# root attributes
ATTR_SCHEMA_VERSION = "schema_version"
ATTR_DATASET = "dataset"
ATTR_BACKBONE = "backbone"
ATTR_WEIGHTS = "weights"
ATTR_FEATURE_DIM = "feature_dim"
ATTR_VIEWS = "views"
ATTR_COMPLETE = "complete"
ATTR_DVML_VERSION = "dvml_version"
ATTR_WRITER_CONFIG = "writer_config"  # JSON of what the writer was asked to write; checked on resume
ATTR_PREPROCESS = "preprocess"  # optional JSON object: resize, crop, mean, std, interpolation
ATTR_EXTRA = "extra"  # JSON object of free-form provenance (transforms, seed, skipped files, ...)

REQUIRED_ROOT_ATTRS = (
    ATTR_SCHEMA_VERSION,
    ATTR_DATASET,
    ATTR_BACKBONE,
    ATTR_WEIGHTS,
    ATTR_FEATURE_DIM,
    ATTR_VIEWS,
    ATTR_COMPLETE,
)

# per-split group attribute
ATTR_N_WRITTEN = "n_written"


def version_for(query_gallery: bool) -> int:
    """The schema version a writer records: 2 when the test split has query/gallery roles, else 1."""
    return SCHEMA_VERSION if query_gallery else SCHEMA_VERSION_PLAIN


def dataset_path(split: str, name: str) -> str:
    """HDF5 path of one array, e.g. ``dataset_path("train", FEATURES) == "train/features"``."""
    return f"{split}/{name}"
