"""Cost of one G-Rerank generator step, decoder-only (parallel context) against CEPE of similar size.

    OMP_NUM_THREADS=2 PYTHONPATH=. python scripts/bench_decoder_only.py [--batch 4 --docs 20 --doc-len 32 ...]

A step is what training runs per micro-batch: encode (pre-fill) the B*n documents without
autograd, score the answer under a [B, n] log-mask that requires grad, and backpropagate to it.
Both models have the same decoder (tiny CEPE's: 2 layers, hidden 64, GQA 4/2 heads); CEPE adds
its 2-layer encoder (hidden 48) and cross-attention, the decoder-only model pre-fills the
documents with its own layers. Medians of alternating runs (scripts/bench_generator.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generator import paired_median_seconds  # noqa: E402

from grerank_dist.models.cepe import CepeForCausalContextLM, tiny_cepe_config  # noqa: E402
from grerank_dist.models.decoder_only import DecoderOnlyGenerator, tiny_config  # noqa: E402
from grerank_dist.interface import InputFormat  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--docs", type=int, default=20)
    parser.add_argument("--doc-len", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=24)
    parser.add_argument("--prefix-len", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    vocab = 512
    torch.manual_seed(0)
    cepe = CepeForCausalContextLM(tiny_cepe_config(vocab_size=vocab)).eval()
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_config(tiny_config("llama", vocab))
    fmt = InputFormat("{text}", "{question}", prompt_bos=False)
    decoder = DecoderOnlyGenerator(lm, list(range(4, 4 + args.prefix_len)), fmt)
    enc_ids = torch.randint(4, vocab, (args.batch, args.docs, args.doc_len))
    enc_mask = torch.ones_like(enc_ids)
    ids = torch.randint(4, vocab, (args.batch, args.seq_len))
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, : args.seq_len // 2] = -100

    def step(model) -> None:
        contexts = model.encode_contexts(enc_ids, enc_mask)
        log_mask = torch.log(torch.rand(args.batch, args.docs)).requires_grad_(True)
        model.answer_logprobs(contexts, ids, mask, labels, log_mask).token_mean_nll().backward()

    with torch.enable_grad():
        t_cepe, t_decoder = paired_median_seconds(lambda: step(cepe), lambda: step(decoder), args.repeats)
    with torch.no_grad():
        e_cepe, e_decoder = paired_median_seconds(
            lambda: cepe.encode_contexts(enc_ids, enc_mask), lambda: decoder.encode_contexts(enc_ids, enc_mask), args.repeats
        )
    print(f"B={args.batch} n={args.docs} L={args.doc_len} S={args.seq_len} prefix={args.prefix_len}, "
          f"threads={torch.get_num_threads()}")
    print(f"{'':24s}{'CEPE':>10s}{'decoder-only':>14s}{'ratio':>8s}")
    print(f"{'encode (no grad)':24s}{e_cepe * 1e3:9.1f}ms{e_decoder * 1e3:13.1f}ms{e_decoder / e_cepe:8.2f}")
    print(f"{'full step (fwd+bwd)':24s}{t_cepe * 1e3:9.1f}ms{t_decoder * 1e3:13.1f}ms{t_decoder / t_cepe:8.2f}")


if __name__ == "__main__":
    main()
