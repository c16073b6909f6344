"""The optional end-to-end mode: GoogLeNet backbone and DVML heads trained together from images (torchrun/DDP).

* :mod:`dvml.finetune.config`       :class:`FinetuneConfig`
* :mod:`dvml.finetune.data`         augmented training images keyed for determinism
* :mod:`dvml.finetune.distributed`  process group, distributed class-balanced sampler, gathers
* :mod:`dvml.finetune.model`        backbone + heads network, initial model, warm start from a heads run
* :mod:`dvml.finetune.train`        :func:`finetune` (the method and run directory are documented there)
* :mod:`dvml.finetune.inference`    :func:`load_finetuned`, :func:`embed_test_split`
"""

from dvml._lazy import lazy_exports

# imported on first use: importing a light submodule (e.g. a config) must not import torch
__getattr__, __dir__ = lazy_exports(__name__, {
    "dvml.finetune.config": ["FinetuneConfig"],
    "dvml.finetune.inference": ["Finetuned", "embed_test_split", "extract_split", "load_finetuned"],
    "dvml.finetune.train": ["finetune"],
})

__all__ = ["FinetuneConfig", "Finetuned", "embed_test_split", "extract_split", "finetune", "load_finetuned"]
