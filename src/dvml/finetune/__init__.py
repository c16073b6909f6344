"""The optional end-to-end mode: GoogLeNet backbone and DVML heads trained together from images (torchrun/DDP).

* :mod:`dvml.finetune.config`       :class:`FinetuneConfig`
* :mod:`dvml.finetune.data`         augmented training images keyed for determinism
* :mod:`dvml.finetune.distributed`  process group, distributed class-balanced sampler, gathers
* :mod:`dvml.finetune.model`        backbone + heads network, initial model, warm start from a heads run
* :mod:`dvml.finetune.train`        :func:`finetune` (the method and run directory are documented there)
* :mod:`dvml.finetune.inference`    :func:`load_finetuned`, :func:`embed_test_split`
"""

from dvml.finetune.config import FinetuneConfig
from dvml.finetune.inference import Finetuned, embed_test_split, extract_split, load_finetuned
from dvml.finetune.train import finetune

__all__ = ["FinetuneConfig", "Finetuned", "embed_test_split", "extract_split", "finetune", "load_finetuned"]
