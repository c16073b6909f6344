"""The dvml feature-cache format, schema version 1. The single source of every name in the file.

One HDF5 file per (dataset, backbone, weights, views) choice. Layout::

    /train/features  float16|float32  (N_train, P, D)   P views per training image
    /train/labels    int64            (N_train,)        class id
    /train/paths     utf-8 str        (N_train,)        optional, relative to the dataset root
    /test/features   float16|float32  (N_test, P_test, D)  view 0 is the centre view
    /test/labels     int64            (N_test,)         classes disjoint from train (zero-shot)
    /test/paths      utf-8 str        (N_test,)         optional

Root attributes: ``schema_version`` (=1), ``dataset``, ``backbone``, ``weights``, ``feature_dim`` (=D),
``views`` (JSON list describing each training view), ``complete`` (true only once every row of both
splits is written), ``dvml_version``. Writers may add more (``transforms``, ``seed``, ``skipped``,
``extra``); readers ignore attributes they do not know.

Per split group, the attribute ``n_written`` counts rows that are durably written; a writer that
resumes truncates to it. Files written by other tools need not carry it (readers do not require it).
"""

from __future__ import annotations

SCHEMA_VERSION = 1

TRAIN = "train"
TEST = "test"
SPLITS = (TRAIN, TEST)

FEATURES = "features"
LABELS = "labels"
PATHS = "paths"

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


def dataset_path(split: str, name: str) -> str:
    """HDF5 path of one array, e.g. ``dataset_path("train", FEATURES) == "train/features"``."""
    return f"{split}/{name}"
