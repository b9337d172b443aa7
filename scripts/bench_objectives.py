"""Step cost of each training objective relative to a G-Rerank step, on one random CEPE.

    OMP_NUM_THREADS=2 python scripts/bench_objectives.py [--batch 4 --docs 20 --doc-len 32 ...]

Every step does what ``train.training_step`` asks of the generator: encode the n documents once,
then the objective (G-Rerank: one relaxed [B, n] mask, backward through the decoder; PDist/EMDR:
the n single-document masks, LOOP: n + 1 leave-one-out masks, DRO: m subsets, all as one batched
decoder call [B, m, n] under no_grad; ADist: one eager pass recording attention mass) and the
backward into the scores. The steps are timed in turn, round after round (so load drifts hit all
alike), and the median of each is printed with its ratio to G-Rerank. ``pdist (keys repeated)``
copies each query's cross-attention keys and values once per mask, as CEPE did before its masks
shared them, to show what the sharing saves; ``pdist (naive)`` is the step a first implementation
would write: one full generator forward per mask, each encoding the documents again.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from types import SimpleNamespace

import torch

from grerank_dist.method import objectives
from grerank_dist.config import ObjectiveConfig, RelaxConfig
from grerank_dist.interface import AnswerLogProbs
from grerank_dist.models.cepe import CepeCrossAttention, CepeForCausalContextLM, tiny_cepe_config
from grerank_dist.method.objectives import OBJECTIVES


def repeated_keys(forward: Callable) -> Callable:
    """CrossAttention.forward with the keys and values copied to every decoder row (the old path)."""

    def copying(self, hidden_states, keys, values, key_bias):
        copies = hidden_states.shape[0] // keys.shape[0]
        return forward(self, hidden_states, keys.repeat_interleave(copies, 0), values.repeat_interleave(copies, 0), key_bias)

    return copying


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--docs", type=int, default=20)
    parser.add_argument("--doc-len", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=256, help="decoder width (the encoder stays tiny: it runs once in every step)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--dro-samples", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = tiny_cepe_config(
        vocab_size=512, cross_attn_backend=args.backend, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers, num_cross_attn_layers=args.layers,
    )
    model = CepeForCausalContextLM(config).to(args.device).eval()
    model.activation_checkpointing_enable()
    device = torch.device(args.device)
    enc_ids = torch.randint(4, 512, (args.batch, args.docs, args.doc_len), device=device)
    ids = torch.randint(4, 512, (args.batch, args.seq_len), device=device)
    labels = ids.clone()
    labels[:, : args.seq_len // 2] = -100
    batch = SimpleNamespace(
        valid=torch.ones(args.batch, args.docs, dtype=torch.bool, device=device), input_ids=ids,
        attention_mask=torch.ones_like(ids), labels=labels,
    )
    relax, settings = RelaxConfig(k=args.k, tau=0.5), ObjectiveConfig(dro_samples=args.dro_samples)
    noise = torch.Generator(device=device).manual_seed(0)

    def step(name: str) -> Callable[[], None]:
        def run() -> None:
            scores = torch.randn(args.batch, args.docs, device=device, requires_grad=True)
            contexts = model.encode_contexts(enc_ids, torch.ones_like(enc_ids))
            OBJECTIVES[name](model, contexts, batch, scores, relax, noise, settings).loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize()

        return run

    steps = {name: step(name) for name in ("grerank", "pdist", "emdr", "loop", "adist", "dro")}
    shared_forward = CepeCrossAttention.forward

    def pdist_repeated() -> None:
        CepeCrossAttention.forward = repeated_keys(shared_forward)
        try:
            steps["pdist"]()
        finally:
            CepeCrossAttention.forward = shared_forward

    steps["pdist (keys repeated)"] = pdist_repeated
    batched_masks = objectives.answer_under_masks

    def one_forward_per_mask(generator, contexts, batch, masks):
        """m separate generator calls, each encoding the documents again (the naive baseline)."""
        with torch.no_grad():
            answers = [
                generator.answer_logprobs(generator.encode_contexts(enc_ids, torch.ones_like(enc_ids)), batch.input_ids,
                                          batch.attention_mask, batch.labels, masks[:, j].contiguous())
                for j in range(masks.shape[1])
            ]
        return AnswerLogProbs(token_logprobs=torch.stack([a.token_logprobs for a in answers], dim=1),
                              token_mask=torch.stack([a.token_mask for a in answers], dim=1))

    def pdist_naive() -> None:
        objectives.answer_under_masks = one_forward_per_mask
        try:
            steps["pdist"]()
        finally:
            objectives.answer_under_masks = batched_masks

    steps["pdist (naive)"] = pdist_naive
    for run in steps.values():  # warm-up
        run()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, run in steps.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"CEPE hidden={args.hidden} layers={args.layers}, B={args.batch} n={args.docs} L={args.doc_len} "
          f"S={args.seq_len} k={args.k} m={args.dro_samples}, backend={args.backend}, device={args.device}, "
          f"threads={torch.get_num_threads()}, median of {args.repeats}")
    for name, seconds in medians.items():
        print(f"{name:22s} {seconds * 1e3:9.1f} ms   x{seconds / medians['grerank']:5.2f} of a G-Rerank step")


if __name__ == "__main__":
    main()
