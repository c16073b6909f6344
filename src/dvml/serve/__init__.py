"""Using an embedding: export a model from images to z_I, index a gallery and search it, look at retrievals.

* :mod:`dvml.serve.embedder`  :class:`ImageEmbedder` (normalise → backbone → z_I) built from a run or a cache
* :mod:`dvml.serve.export`    ``dvml export``: TorchScript / ONNX files with their preprocessing, and the loader
* :mod:`dvml.serve.index`     ``dvml index`` / ``dvml search``: a faiss gallery index with its row table
* :mod:`dvml.serve.show`      ``dvml show``: seeded test queries and their top-k as a static HTML page / PNG

Layer: above :mod:`dvml.evaluate` (it embeds and searches the way evaluate does), below experiments and cli.
"""
