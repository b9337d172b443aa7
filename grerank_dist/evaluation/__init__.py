"""Evaluation: the paper's reranker, generator and mining settings against the retriever, the
oracle and every reranker given (``evaluate``), relevance mining with learned per-document weights
against App. F's scalar baselines (``mine``), a decoder-only generator's parallel-context
alignment picked on a dev file (``calibrate``) and the PNG plots of a run (``plots``)."""
