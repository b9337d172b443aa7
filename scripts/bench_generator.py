"""Cost of the G-Rerank log-mask in the CEPE generator: masked vs unmasked forward(+backward).

    OMP_NUM_THREADS=2 python scripts/bench_generator.py [--batch 4 --docs 20 --doc-len 32 ...]

Both runs encode the documents once (outside the timing, as training does) and run the
decoder with cross-attention over all n*L document tokens. "masked" passes a [B, n] log-mask
that requires grad and backpropagates to it (a G-Rerank step through the frozen generator);
"no mask" passes none, and, since nothing else needs a gradient in a frozen model, backpropagates
to the decoder's input embeddings instead, so both backward passes traverse every layer.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from grerank_dist.models.cepe import CepeForCausalContextLM, tiny_cepe_config


def interleaved_median_seconds(steps: Sequence[Callable[[], None]], repeats: int, warmup: int = 3) -> list[float]:
    """Median times of several steps measured in turn, so load drifts hit all alike."""
    for _ in range(warmup):
        for step in steps:
            step()
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(repeats):
        for step, bucket in zip(steps, times):
            start = time.perf_counter()
            step()
            bucket.append(time.perf_counter() - start)
    return [statistics.median(bucket) for bucket in times]


def paired_median_seconds(first: Callable[[], None], second: Callable[[], None], repeats: int) -> tuple[float, float]:
    """Median times of two steps measured alternately."""
    first_time, second_time = interleaved_median_seconds((first, second), repeats)
    return first_time, second_time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--docs", type=int, default=20)
    parser.add_argument("--doc-len", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--checkpointing", action="store_true")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = CepeForCausalContextLM(tiny_cepe_config(vocab_size=512, cross_attn_backend=args.backend)).eval()
    if args.checkpointing:
        model.activation_checkpointing_enable()
    enc_ids = torch.randint(4, 512, (args.batch, args.docs, args.doc_len))
    enc_mask = torch.ones_like(enc_ids)
    ids = torch.randint(4, 512, (args.batch, args.seq_len))
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, : args.seq_len // 2] = -100
    contexts = model.encode_contexts(enc_ids, enc_mask)

    def loss(doc_log_mask: torch.Tensor | None) -> torch.Tensor:
        return model(ids, mask, labels=labels, contexts=contexts, doc_log_mask=doc_log_mask).loss

    def masked_backward() -> None:
        log_mask = torch.log(torch.rand(args.batch, args.docs)).requires_grad_(True)
        loss(log_mask).backward()

    embedding_grad = model.model.embed_tokens.register_forward_hook(lambda m, i, out: out.requires_grad_(True))

    def unmasked_backward() -> None:
        loss(None).backward()

    with torch.enable_grad():
        rows = {"forward+backward": paired_median_seconds(masked_backward, unmasked_backward, args.repeats)}
    embedding_grad.remove()
    with torch.no_grad():
        log_mask = torch.log(torch.rand(args.batch, args.docs))
        rows["forward only"] = paired_median_seconds(lambda: loss(log_mask), lambda: loss(None), args.repeats)
    print(f"tiny CEPE, B={args.batch} n={args.docs} L={args.doc_len} S={args.seq_len}, backend={args.backend}, "
          f"checkpointing={args.checkpointing}, threads={torch.get_num_threads()}")
    for name, (masked, unmasked) in rows.items():
        print(f"{name:17s} masked {masked * 1e3:8.2f} ms   no mask {unmasked * 1e3:8.2f} ms   ratio {masked / unmasked:5.2f}")


if __name__ == "__main__":
    main()
