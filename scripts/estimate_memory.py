"""Per-GPU memory estimate of a G-Rerank training step, counted analytically.

    python scripts/estimate_memory.py --world-size 8 --micro-batch 4
    python scripts/estimate_memory.py --world-size 1 --generator-stage 0 --micro-batch 2
    python scripts/estimate_memory.py --generator llama-8b --world-size 8 --micro-batch 2

Parameter counts come from the real model classes built on the meta device (CEPE-Llama2-7B
shapes from ``cepe_7b_config``; an 8B decoder-only instruct model at Llama-3.1-8B shapes; the
reranker at BGE-reranker-base / XLM-R base shapes), so they are exact; activation sizes are the tensors a step keeps alive, counted from the shapes
(documented per line below). It is an estimate: allocator fragmentation, NCCL buffers and the
CUDA context (about 1-2 GB together) come on top.
"""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM, XLMRobertaConfig, XLMRobertaForSequenceClassification

from grerank_dist.perf.cost_model import BF16, FP32, GB, LLAMA_8B, cepe_rows, count_params, decoder_only_rows
from grerank_dist.models.cepe import CepeForCausalContextLM, cepe_7b_config

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generator", choices=("cepe-7b", "llama-8b"), default="cepe-7b",
                        help="CEPE-Llama2-7B, or an 8B decoder-only instruct LLM in parallel-context mode")
    parser.add_argument("--world-size", type=int, default=8, help="GPUs the generator is sharded over")
    parser.add_argument("--generator-stage", type=int, choices=(0, 3), default=3)
    parser.add_argument("--max-live-params", type=float, default=1e9, help="stage3_max_live_parameters")
    parser.add_argument("--micro-batch", type=int, default=4, help="queries per GPU per micro-step (B)")
    parser.add_argument("--candidates", type=int, default=20, help="n")
    parser.add_argument("--doc-len", type=int, default=256, help="encoder tokens per document (L)")
    parser.add_argument("--dec-len", type=int, default=48, help="decoder tokens: prompt + answer (S)")
    parser.add_argument("--rr-len", type=int, default=200, help="reranker pair length after padding")
    parser.add_argument("--no-rr-checkpointing", action="store_true", help="reranker without activation checkpointing")
    args = parser.parse_args()

    with torch.device("meta"):
        generator = CepeForCausalContextLM(cepe_7b_config()) if args.generator == "cepe-7b" else LlamaForCausalLM(LlamaConfig(**LLAMA_8B))
        rr_config = XLMRobertaConfig(vocab_size=250002, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                     intermediate_size=3072, max_position_embeddings=514, num_labels=1)
        reranker = XLMRobertaForSequenceClassification(rr_config)
    p_gen, p_rr = count_params(generator), count_params(reranker)
    B, n, L, S = args.micro_batch, args.candidates, args.doc_len, args.dec_len
    config = generator.config
    shards = args.world_size if args.generator_stage == 3 else 1

    rows: list[tuple[str, float, str]] = []
    rows.append(("generator parameters (bf16)", p_gen * BF16 / shards / GB,
                 f"{p_gen / 1e9:.2f} B params / {shards} shard(s)"))
    if args.generator_stage == 3:
        layer_params = count_params(generator.model.layers[0])
        live = max(args.max_live_params, 2 * layer_params)
        rows.append(("ZeRO-3 gathered working set (bf16)", live * BF16 / GB,
                     f"max(stage3_max_live_parameters, 2 decoder layers of {layer_params / 1e6:.0f} M)"))
    rows += cepe_rows(config, B, n, L, S) if args.generator == "cepe-7b" else decoder_only_rows(config, B, n, L, S)
    rows.append(("reranker parameters + gradients (fp32)", 2 * p_rr * FP32 / GB, f"{p_rr / 1e6:.0f} M params"))
    rows.append(("reranker AdamW states, ZeRO-1 shard", 3 * p_rr * FP32 / args.world_size / GB,
                 "fp32 moments and master copy split over ranks"))
    pairs_tokens = B * n * args.rr_len
    hr, rr_layers, rr_heads = rr_config.hidden_size, rr_config.num_hidden_layers, rr_config.num_attention_heads
    if args.no_rr_checkpointing:
        per_layer = pairs_tokens * (34 * hr + 5 * rr_heads * args.rr_len) * FP32 / 2  # Korthikanti et al. count, fp32
        rows.append(("reranker activations (no checkpointing)", rr_layers * per_layer / GB, "every layer's saved tensors, fp32"))
    else:
        per_layer = pairs_tokens * (34 * hr + 5 * rr_heads * args.rr_len) * FP32 / 2
        rows.append(("reranker activations (checkpointed)", (rr_layers * pairs_tokens * hr * FP32 + per_layer) / GB,
                     "layer inputs + one layer recomputed, fp32"))
    total = sum(r[1] for r in rows)
    name = "CEPE-Llama2-7B" if args.generator == "cepe-7b" else "8B decoder-only (Llama-3.1-8B shapes, parallel context)"
    print(f"G-Rerank step, {name} generator (ZeRO stage {args.generator_stage} over {shards}), "
          f"BGE-reranker-base; B={B} n={n} L={L} S={S}, reranker pairs of {args.rr_len} tokens\n")
    print(f"{'item':48s} {'GiB':>7s}  how")
    for name, size, how in rows:
        print(f"{name:48s} {size:7.2f}  {how}")
    print(f"{'total (before fragmentation, NCCL, CUDA context)':48s} {total:7.2f}")


if __name__ == "__main__":
    main()
