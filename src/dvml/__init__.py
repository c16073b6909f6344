"""dvml: Deep Variational Metric Learning as a fast cached-feature two-stage pipeline.

Stages: :mod:`dvml.extract` (images -> HDF5 feature cache), :mod:`dvml.heads` (DVML heads + decoder + four-term
loss trained on cached features), :mod:`dvml.evaluate` (Recall@K by exact FAISS kNN, NMI/F1, MAP@R), with the
optional end-to-end :mod:`dvml.finetune` and the :mod:`dvml.experiments` built on them.

Layer order: a module imports only from the layers before its own (never a later one; no cycles)::

    errors, seeding      user-facing errors; seeds and the one hold-out-classes rule
    files                the one way files are written (atomic, through symlinks), write errors, the writer lock
    devices              the device rule (auto = cuda, then mps, then cpu), autocast dtype, pinned memory
    cache                the feature-cache format
    runs                 the run-directory format
    retrieval            exact kNN / k-means (the only faiss import) and pure numpy metrics
    extract              datasets, backbones, the extraction loop, synth
    losses               metric losses by name, their parameter defaults
    heads                DVML heads, objective, sampler, the training core, fit, embed
    finetune             backbone + heads end to end (torchrun/DDP)
    evaluate             embed a target and score it; plots
    serve                use an embedding: export a model file, gallery index + search, retrieval pages
    experiments          ablate, stats, tune, analyze, demo
    cli                  thin typer commands; the only layer that prints
"""

__version__ = "0.1.0"
