"""Cost of one G-Rerank generator step, decoder-only (parallel context) against CEPE of similar size,
or (``--backends``) the decoder-only prompt/answer pass's attention backends against eager.

    OMP_NUM_THREADS=2 PYTHONPATH=. python scripts/bench_decoder_only.py [--batch 4 --docs 20 --doc-len 32 ...]
    OMP_NUM_THREADS=2 PYTHONPATH=. python scripts/bench_decoder_only.py --backends eager,sdpa,folded --doc-len 128

A step is what training runs per micro-batch: encode (pre-fill) the B*n documents without
autograd, score the answer under a [B, n] log-mask that requires grad, and backpropagate to it.
Both models have the same decoder (tiny CEPE's: 2 layers, hidden 64, GQA 4/2 heads); CEPE adds
its 2-layer encoder (hidden 48) and cross-attention, the decoder-only model pre-fills the
documents with its own layers. Medians of alternating runs (scripts/bench_generator.py).
``--backends`` times the whole step and its answer pass alone (forward + backward over encoded
documents) per backend, and the answer pass's peak tensor memory (bytes allocated inside it and
alive at once, counted in a separate untimed run); ``--hidden/--heads/--kv-heads/--layers`` change
the decoder's shape, ``--temperature/--scale`` set generator.doc_key_temperature/doc_attention_scale
(``--form``: generator.doc_temperature_form; the fused backends take ``per_key`` only when T != 1).
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generator import interleaved_median_seconds, paired_median_seconds  # noqa: E402

from grerank_dist.models.cepe import CepeForCausalContextLM, tiny_cepe_config  # noqa: E402
from grerank_dist.models.decoder_only import DecoderOnlyGenerator, tiny_config  # noqa: E402
from grerank_dist.interface import InputFormat  # noqa: E402
from grerank_dist.perf.traffic import TensorMemoryMeter  # noqa: E402


def compare_backends(args: argparse.Namespace, backends: list[str]) -> None:
    """Step time and peak memory of each backend of the prompt/answer pass, ratios to the first."""
    from transformers import AutoModelForCausalLM

    vocab = 512
    torch.manual_seed(0)
    shape = {"hidden_size": args.hidden, "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads,
             "num_hidden_layers": args.layers, "intermediate_size": 2 * args.hidden}
    lm = AutoModelForCausalLM.from_config(tiny_config("llama", vocab, **shape))
    decoder = DecoderOnlyGenerator(lm, list(range(4, 4 + args.prefix_len)), InputFormat("{text}", "{question}", prompt_bos=False))
    decoder.set_context_alignment(args.temperature, args.scale, args.form)
    enc_ids = torch.randint(4, vocab, (args.batch, args.docs, args.doc_len))
    enc_mask = torch.ones_like(enc_ids)
    ids = torch.randint(4, vocab, (args.batch, args.seq_len))
    labels = ids.masked_fill(torch.arange(args.seq_len) < args.seq_len // 2, -100)
    log_mask = torch.log(torch.rand(args.batch, args.docs))
    encoded = decoder.encode_contexts(enc_ids, enc_mask)

    def answer(backend: str, contexts) -> None:
        decoder.config.cross_attn_backend = backend
        point = log_mask.clone().requires_grad_(True)
        decoder.answer_logprobs(contexts, ids, torch.ones_like(ids), labels, point).token_mean_nll().backward()

    def step(backend: str) -> None:
        answer(backend, decoder.encode_contexts(enc_ids, enc_mask))

    steps = [functools.partial(step, b) for b in backends]
    answers = [functools.partial(answer, b, encoded) for b in backends]
    with torch.enable_grad():
        step_s = interleaved_median_seconds(steps, args.repeats)
        answer_s = interleaved_median_seconds(answers, args.repeats)
        peaks = []
        for backend in backends:
            with TensorMemoryMeter() as meter:
                answer(backend, encoded)
            peaks.append(meter.peak / 2**20)
    print(f"decoder-only llama hidden={args.hidden} heads={args.heads}/{args.kv_heads} layers={args.layers}, "
          f"B={args.batch} n={args.docs} L={args.doc_len} S={args.seq_len} prefix={args.prefix_len}, "
          f"T={args.temperature} S_docs={args.scale}, threads={torch.get_num_threads()}, median of {args.repeats}")
    print(f"{'backend':10s}{'step ms':>10s}{'ratio':>7s}{'answer ms':>11s}{'ratio':>7s}{'peak MB':>9s}{'ratio':>7s}")
    for name, step, ans, peak in zip(backends, step_s, answer_s, peaks):
        print(f"{name:10s}{step * 1e3:10.1f}{step / step_s[0]:7.2f}{ans * 1e3:11.1f}{ans / answer_s[0]:7.2f}"
              f"{peak:9.1f}{peak / peaks[0]:7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--docs", type=int, default=20)
    parser.add_argument("--doc-len", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=24)
    parser.add_argument("--prefix-len", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--backends", default="", help="comma-separated, eager first: compare the decoder-only backends")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--form", choices=("group", "per_key"), default="per_key",
                        help="generator.doc_temperature_form (default per_key: every backend computes it)")
    parser.add_argument("--scale", type=float, default=1.0)
    args = parser.parse_args()
    if args.backends:
        compare_backends(args, args.backends.split(","))
        return

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
