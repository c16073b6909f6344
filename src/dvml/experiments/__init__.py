"""Experiments built on fit-heads and evaluate.

* :mod:`dvml.experiments.ablate`   baseline vs DVML over losses x seeds, resumable, with paired statistics
* :mod:`dvml.experiments.stats`    mean ± std and paired t-intervals
* :mod:`dvml.experiments.tune`     Optuna study on held-out training classes
* :mod:`dvml.experiments.analyze`  Gaussianity of central features, t-SNE plots
* :mod:`dvml.experiments.demo`     synthetic world + small ablation in one command
"""
