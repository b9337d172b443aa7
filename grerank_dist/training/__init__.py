"""Training: the recipe readable top to bottom (``train``: scores -> relaxed mask -> masked
generator -> loss -> reranker step), everything DeepSpeed in one object (``strategy``: process
group, the two engines, checkpoints with their manifests), metrics logs and TensorBoard
(``tracking``) and checkpoint export to a reranker directory (``export``)."""
