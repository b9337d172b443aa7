"""The paper's method and its measures, free of any model or launcher: the Gumbel relaxed top-k
mask and its hard twin (``relax``), the per-document log-mask added to attention scores in every
backend (``attention``), the training objectives, each a small function of masked likelihoods
and scores (``objectives``: G-Rerank and the baselines), the retrieval and answer metrics
(``metrics``) and value checks that defer their device reads (``checks``)."""
