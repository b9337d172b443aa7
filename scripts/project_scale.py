"""Projected cost of a G-Rerank step on N nodes x 8 H100 GPUs (bf16), per GPU; every number projected.

    python scripts/project_scale.py [--micro-batch 4 --candidates 20 --doc-len 256 --dec-len 48 --answer-len 16]

For CEPE-Llama2-7B and an 8B decoder-only LLM (Llama-3.1-8B shapes, parallel-context mode), each
with a BGE-reranker-base (XLM-R base) reranker, and each generator placement: ZeRO-3 over all
GPUs, ZeRO-3 with hpZ inside a node (zero_hpz_partition_size 8), a replicated generator (stage 0),
and ZeRO-3 with its partitions offloaded to CPU. Parameter counts come from the model classes on
the meta device; FLOPs, all-gather bytes and memory from grerank_dist.perf.cost_model (the same code
whose small-shape predictions `grerank bench --world-size 2` checks against counted collectives);
bandwidths and utilisation are the stated assumptions of ``cost_model.Cluster``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, XLMRobertaConfig

from grerank_dist.perf import cost_model as cm
from grerank_dist.models.cepe import CepeForCausalContextLM, cepe_7b_config

DS_CONFIGS = Path(__file__).resolve().parents[1] / "ds_configs"
RERANKER = XLMRobertaConfig(vocab_size=250002, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                            intermediate_size=3072, max_position_embeddings=514, num_labels=1)
PCIE_BYTES_PER_S = 25e9  # assumed host-to-GPU copy rate of offloaded partitions (PCIe Gen5 x16, about half its peak)
RERANKER_PARAMS = 278_044_417  # XLMRobertaForSequenceClassification(RERANKER), counted once on the meta device


def generators() -> dict[str, tuple[torch.nn.Module, list[cm.ModuleUse], str]]:
    with torch.device("meta"):
        cepe = CepeForCausalContextLM(cepe_7b_config())
        llama = LlamaForCausalLM(LlamaConfig(**cm.LLAMA_8B))
    return {"cepe-7b": (cepe, cm.cepe_module_trace(cepe), "cepe"),
            "llama-8b": (llama, cm.decoder_only_module_trace(llama), "decoder-only")}


def project(args: argparse.Namespace) -> list[dict]:
    zero_file = json.loads((DS_CONFIGS / "generator_zero3.json").read_text())
    rows = []
    lengths = cm.StepLengths.uniform(args.micro_batch, args.candidates, args.rr_len, args.doc_len, args.dec_len,
                                     args.answer_len)
    for name, (model, trace, family) in generators().items():
        config = model.config
        numels = [(n, p.numel()) for n, p in model.named_parameters()]
        flops_fn = cm.cepe_step_flops if family == "cepe" else cm.decoder_only_step_flops
        flops = flops_fn(config, RERANKER, lengths)
        rows_fn = cm.cepe_rows if family == "cepe" else cm.decoder_only_rows
        # checkpointed: one layer recomputed; without: every decoder layer keeps its activations
        act_ckpt, act_full = (sum(size for _, size, _ in rows_fn(config, args.micro_batch, args.candidates, args.doc_len,
                                                                 args.dec_len, checkpointing)) * cm.GB
                              for checkpointing in (True, False))
        rr_acts = cm.bert_activation_bytes(RERANKER, lengths.pair_lengths, act_bytes=2)
        for nodes in (1, 2, 4, 8):
            cluster = cm.Cluster(nodes)
            world = cluster.world
            rr_state = cm.reranker_state_bytes(RERANKER_PARAMS, world, 1) + RERANKER_PARAMS * 4  # + fp32 grads
            bucket = cm.reduce_bucket_bytes(json.loads((DS_CONFIGS / "reranker_zero1.json").read_text()))
            for placement in ("zero3", "hpz8", "replicated", "zero3-offload"):
                stage = 0 if placement == "replicated" else 3
                hpz = 8 if placement == "hpz8" and nodes > 1 else 1
                zero = cm.ZeroSettings.from_ds_config({"zero_optimization": {**zero_file["zero_optimization"], "stage": stage,
                                                       "zero_hpz_partition_size": hpz}}, world, 2)
                schedule = cm.gather_schedule(trace, zero)
                within = nodes == 1 or hpz > 1
                t_gather = cm.all_gather_seconds(schedule.total_bytes, hpz if hpz > 1 else world, cluster, within)
                if placement == "zero3-offload":  # each gather first copies this rank's shard host -> GPU
                    t_gather += schedule.total_bytes / world / PCIE_BYTES_PER_S
                t_compute = cm.compute_seconds(flops["total"], cluster)
                t_compute_ckpt = cm.compute_seconds(flops["total"] + flops["decoder"] / 2, cluster)
                resident = 0 if placement == "zero3-offload" else cm.generator_resident_bytes(numels, zero)
                working = schedule.peak_gathered_bytes
                base = resident + working + rr_state + bucket + rr_acts
                rows.append({
                    "generator": name, "nodes": nodes, "gpus": world, "placement": placement,
                    "gather_GB_per_step": schedule.total_bytes / 1e9,
                    "gather_GB_per_query": schedule.total_bytes / 1e9 / args.micro_batch,
                    "t_compute_ms": 1e3 * t_compute, "t_gather_ms": 1e3 * t_gather,
                    "bound": "compute" if t_compute >= t_gather else "all-gather",
                    "step_ms_overlap": 1e3 * max(t_compute, t_gather), "step_ms_serial": 1e3 * (t_compute + t_gather),
                    "t_compute_ckpt_ms": 1e3 * t_compute_ckpt,
                    "mem_GB_ckpt": (base + act_ckpt) / cm.GB, "mem_GB_no_ckpt": (base + act_full) / cm.GB,
                    "queries_per_s_per_gpu": args.micro_batch / max(t_compute, t_gather),
                })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--micro-batch", type=int, default=4, help="queries per GPU per micro-step (B)")
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--doc-len", type=int, default=256)
    parser.add_argument("--dec-len", type=int, default=48, help="prompt + answer tokens (S)")
    parser.add_argument("--answer-len", type=int, default=16)
    parser.add_argument("--rr-len", type=int, default=200)
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0)
    args = parser.parse_args()
    c = cm.Cluster(1)
    print(f"PROJECTED (not measured). Assumptions: {c.peak_flops / 1e12:.0f} TFLOP/s dense bf16 peak per GPU at "
          f"{c.mfu:.0%} MFU; NVLink {c.nvlink_bytes_per_s / 1e9:.0f} GB/s per GPU per direction inside a node; "
          f"InfiniBand {c.ib_bytes_per_s / 1e9:.0f} GB/s per GPU between nodes; offloaded shards copied at "
          f"{PCIE_BYTES_PER_S / 1e9:.0f} GB/s host-to-GPU; ring all-gather (P-1)/P x bytes / "
          f"slowest link; generator bf16 under ds_configs/generator_zero3.json's reuse/prefetch/persistence values; "
          f"reranker BGE-reranker-base fp32 under ZeRO-1 (ds_configs/reranker_zero1.json); B={args.micro_batch} "
          f"n={args.candidates} L={args.doc_len} S={args.dec_len} A={args.answer_len}; memory excludes CUDA "
          f"context, NCCL buffers and fragmentation (1-3 GB)")
    rows = project(args)
    head = ("generator", "nodes", "placement", "AG GB/step", "AG GB/query", "compute ms", "gather ms", "bound",
            "step ms (overlap)", "step ms (serial)", "mem GB ckpt", "mem GB no-ckpt", "q/s/GPU")
    print(" | ".join(head))
    for r in rows:
        print(" | ".join([r["generator"], str(r["nodes"]), r["placement"], f"{r['gather_GB_per_step']:.1f}",
                          f"{r['gather_GB_per_query']:.2f}", f"{r['t_compute_ms']:.0f}", f"{r['t_gather_ms']:.0f}",
                          r["bound"], f"{r['step_ms_overlap']:.0f}", f"{r['step_ms_serial']:.0f}",
                          f"{r['mem_GB_ckpt']:.1f}", f"{r['mem_GB_no_ckpt']:.1f}", f"{r['queries_per_s_per_gpu']:.1f}"]))
    print("recommended placement per generator and node count: the fastest step if prefetch hides nothing "
          f"(serial), then the overlapped step, among those that fit {args.gpu_memory_gb:.0f} GB with checkpointing:")
    for name in dict.fromkeys(r["generator"] for r in rows):
        for nodes in (1, 2, 4, 8):
            fits = [r for r in rows if r["generator"] == name and r["nodes"] == nodes and r["mem_GB_ckpt"] <= args.gpu_memory_gb]
            best = min(fits, key=lambda r: (round(r["step_ms_serial"]), round(r["step_ms_overlap"])), default=None)
            print(f"  {name}, {nodes} node(s): {best['placement'] if best else 'none fits'}"
                  + (f" ({best['step_ms_serial']:.0f} ms serial, {best['mem_GB_ckpt']:.1f} GB)" if best else ""))


if __name__ == "__main__":
    main()
