"""grerank_dist: end-to-end reranker training with Gumbel relaxed top-k masks (G-Rerank)."""

__version__ = "0.1.0"
