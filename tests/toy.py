"""A toy retrieval task for trainer tests: exactly one candidate holds the answer.

Question "what is the code of KEY ?"; the gold candidate says "KEY has code VAL"; the others
name other keys with other codes. A reader that copies the code of the matching key needs that
one candidate, so a reranker that learns to pick it lowers the generator's loss.
"""

import json
import random


def toy_records(n_queries: int, n_candidates: int = 6, seed: int = 0, n_keys: int = 40) -> list[dict]:
    rng = random.Random(seed)
    keys = [f"key{i}" for i in range(n_keys)]
    codes = [f"code{i}" for i in range(n_keys)]
    records = []
    for q in range(n_queries):
        chosen = rng.sample(keys, n_candidates)
        values = rng.sample(codes, n_candidates)
        ctxs = [
            {"id": f"{q}-{i}", "title": key, "text": f"{key} has code {val}", "has_answer": i == 0}
            for i, (key, val) in enumerate(zip(chosen, values))
        ]
        gold = ctxs[0]
        rng.shuffle(ctxs)
        records.append({"id": str(q), "question": f"what is the code of {chosen[0]} ?", "answers": [values[0]], "ctxs": ctxs})
        assert gold in ctxs
    return records


def write_jsonl(path, records) -> str:
    with open(path, "w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    return str(path)
