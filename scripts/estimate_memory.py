"""Per-GPU memory estimate of a G-Rerank training step, counted analytically.

    python scripts/estimate_memory.py --world-size 8 --micro-batch 4
    python scripts/estimate_memory.py --world-size 1 --generator-stage 0 --micro-batch 2
    python scripts/estimate_memory.py --generator llama-8b --world-size 8 --micro-batch 2

Parameter counts come from the real model classes built on the meta device (CEPE-Llama2-7B
shapes from ``cepe_7b_config``; an 8B decoder-only instruct model at Llama-3.1-8B shapes; the
reranker at BGE-reranker-base / XLM-R base shapes), so they are exact; activation sizes are the
tensors a step keeps alive, counted from the shapes (each row says how:
:func:`grerank_dist.perf.cost_model.step_memory_rows`, which the GPU check also compares with a
measured peak). It is an estimate: allocator fragmentation, NCCL buffers and the CUDA context
(about 1-2 GB together) come on top.
"""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM, XLMRobertaConfig, XLMRobertaForSequenceClassification

from grerank_dist.perf.cost_model import LLAMA_8B, step_memory_rows
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
    parser.add_argument("--no-generator-checkpointing", action="store_true",
                        help="generator without activation checkpointing (every decoder layer keeps its activations)")
    args = parser.parse_args()

    with torch.device("meta"):
        generator = CepeForCausalContextLM(cepe_7b_config()) if args.generator == "cepe-7b" else LlamaForCausalLM(LlamaConfig(**LLAMA_8B))
        rr_config = XLMRobertaConfig(vocab_size=250002, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                     intermediate_size=3072, max_position_embeddings=514, num_labels=1)
        reranker = XLMRobertaForSequenceClassification(rr_config)
    B, n, L, S = args.micro_batch, args.candidates, args.doc_len, args.dec_len
    shards = args.world_size if args.generator_stage == 3 else 1
    rows = step_memory_rows(
        generator, reranker, B=B, n=n, L=L, S=S, rr_len=args.rr_len, world_size=args.world_size,
        generator_stage=args.generator_stage, max_live_params=args.max_live_params,
        generator_checkpointing=not args.no_generator_checkpointing, rr_checkpointing=not args.no_rr_checkpointing,
    )
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
