"""Data: records (``records``: reading and checking FiD/DPR-style files, the retriever's candidate
order), collation (``collate``: records into the tokenised ``Batch`` the reranker and the generator
read, the per-rank micro-batch schedule), the Arrow dataset that training streams (``dataset``)
and converters of NQ/TQA, HotpotQA, MuSiQue and 2Wiki files (``prepare``).

``grerank_dist.data`` was one module; its names still resolve here, with a DeprecationWarning
naming their new module.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

# The public names of the former grerank_dist.data module -> their module now.
_FORMER_NAMES = {
    **dict.fromkeys(("RecordError", "ReadReport", "normalize_record", "raw_records", "iter_records", "read_records",
                     "training_answer"), "grerank_dist.data.records"),
    **dict.fromkeys(("Collator", "reranker_pairs", "candidate_mask", "relevance_mask", "retriever_score_matrix",
                     "MicroBatchSchedule"), "grerank_dist.data.collate"),
    "Batch": "grerank_dist.interface",
}


def __getattr__(name: str) -> Any:
    home = _FORMER_NAMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(f"{__name__}.{name} moved to {home}.{name}; import it from there", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(home), name)
