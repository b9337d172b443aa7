"""SmolLM2-135M-Instruct's zero-shot reading accuracy on the natural-sentence records.

    grerank fetch-models --only smollm2
    python scripts/smollm2_reading.py --queries 60

Greedy answers (plain model, no parallel context) scored by SubEM, with the gold passage alone,
one lookalike distractor alone (the highest-ranked one), and all candidates concatenated in the
noisy retriever order; once with a plain "Question: ... Answer:" prompt, once with the model's
chat template. The gap between "gold alone" and "all candidates" is what a reranker can recover.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from grerank_dist.models.fetch import model_dir
from grerank_dist.method.metrics import substring_exact_match
from grerank_dist.demos.reading import generate_reading_records

INSTRUCTION = "Answer the question with a few words, using the passages."


def prompt(tokenizer, question: str, passages: list[str], chat: bool) -> str:
    context = "\n".join(passages)
    if not chat:
        return f"{context}\nQuestion: {question}\nAnswer:"
    messages = [{"role": "user", "content": f"{INSTRUCTION}\n\n{context}\n\nQuestion: {question}"}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str], max_new_tokens: int, batch: int) -> list[str]:
    """Greedy continuations of left-padded prompts, cut at the first line break."""
    tokenizer.padding_side = "left"
    answers = []
    for start in range(0, len(prompts), batch):
        inputs = tokenizer(prompts[start : start + batch], return_tensors="pt", padding=True)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(out[:, inputs.input_ids.shape[1] :], skip_special_tokens=True)
        answers += [text.strip().split("\n")[0] for text in texts]
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=None, help="default: the fetch-models cache")
    parser.add_argument("--queries", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=20, help="the chat answers are whole sentences")
    parser.add_argument("--batch", type=int, default=12)
    args = parser.parse_args()

    path = args.model_dir or model_dir("smollm2")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    records = generate_reading_records(args.queries, args.seed)
    settings = {
        "gold alone": lambda r: [c["text"] for c in r["ctxs"] if c["is_supporting"]],
        "distractor alone": lambda r: [next(c["text"] for c in r["ctxs"] if not c["is_supporting"])],
        "all candidates (retriever order)": lambda r: [c["text"] for c in r["ctxs"]],
    }
    print(f"SmolLM2-135M-Instruct, {len(records)} queries (seed {args.seed}), greedy, SubEM")
    print(f"{'passages':36s} {'plain prompt':>13s} {'chat template':>14s}")
    for name, passages in settings.items():
        row = []
        for chat in (False, True):
            prompts = [prompt(tokenizer, r["question"], passages(r), chat) for r in records]
            answers = greedy_answers(model, tokenizer, prompts, args.max_new_tokens, args.batch)
            row.append(sum(substring_exact_match(a, r["answers"]) for a, r in zip(answers, records)) / len(records))
        print(f"{name:36s} {row[0]:13.3f} {row[1]:14.3f}", flush=True)


if __name__ == "__main__":
    main()
