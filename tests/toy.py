"""A toy retrieval task for trainer tests: exactly one candidate holds the answer.

Question "what is the code of KEY ?"; the gold candidate says "KEY has code VAL"; the others
name other keys and hold no code. A reader that copies the one code it sees needs that
candidate, so a reranker that learns to pick it lowers the generator's loss.
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
            {"id": f"{q}-{i}", "title": key, "text": f"{key} has code {val}" if i == 0 else f"{key} has no code",
             "has_answer": i == 0}
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


def train_toy_reader(records: list[dict], out_dir, steps: int = 500, seed: int = 0) -> str:
    """A tiny CEPE reader trained (all candidates visible) to copy the one code it sees, saved
    with its tokenizer: the frozen generator of the trainer tests."""
    from pathlib import Path

    from grerank_dist.config import load_config
    from grerank_dist.demos.reader import ReaderConfig, build_reader_tokenizer, train_reader

    config = load_config(None, ["data.n_candidates=6", "data.doc_max_tokens=12", "data.answer_eos=true",
                                "data.doc_template='{title} : {text}'", "data.prompt_template='question : {question} answer :'"])
    reader = ReaderConfig(steps=steps, seed=seed, encoder_layers=2, learning_rate=3e-3, warmup_steps=0,
                          gold_only_fraction=0.0, all_candidates_fraction=1.0)
    tokenizer = build_reader_tokenizer(records, config.data)
    return str(train_reader(records, tokenizer, reader, Path(out_dir), data=config.data, log_every=10**9))
