#!/usr/bin/env python
"""Time every available masked-attention backend against eager in one run.

Shapes default to a small CEPE cross-attention: 4 queries' decoder streams of 32 tokens reading
20 documents of 64 tokens. Prints absolute milliseconds (median over --repeats) and the ratio to
eager for the forward pass and for forward+backward, plus each backend's largest deviation from
eager, and optionally writes the same as JSON.

    python scripts/bench_attention.py                      # CPU or the first GPU
    python scripts/bench_attention.py --dtype bfloat16 --device cuda --json bench.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch

from grerank_dist.method.attention import available_backends, masked_attention

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--queries", type=int, default=32, help="decoder tokens per row (M)")
    parser.add_argument("--keys", type=int, default=20 * 64, help="encoder tokens per row (N = docs * doc length)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per measurement (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before timing (compilation, caches)")
    parser.add_argument(
        "--backward", action=argparse.BooleanOptionalAction, default=True, help="also time forward+backward"
    )
    parser.add_argument("--padding", type=float, default=0.25, help="fraction of keys that are padding (-inf)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="OUT", help="write the results to this JSON file")
    return parser.parse_args(argv)


def make_inputs(args: argparse.Namespace) -> tuple[torch.Tensor, ...]:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    generator = torch.Generator(device=device).manual_seed(args.seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype)

    q = randn(args.batch, args.heads, args.queries, args.head_dim)
    k = randn(args.batch, args.kv_heads, args.keys, args.head_dim)
    v = randn(args.batch, args.kv_heads, args.keys, args.head_dim)
    bias = torch.randn(args.batch, args.keys, generator=generator, device=device)
    padding = torch.rand(args.batch, args.keys, generator=generator, device=device) < args.padding
    padding[:, 0] = False
    return q, k, v, bias.masked_fill(padding, float("-inf"))


def median_ms(run: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        run()
    synchronize()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        synchronize()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def benchmark(args: argparse.Namespace) -> list[dict]:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    q, k, v, bias = make_inputs(args)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, bias)]
    upstream = torch.randn_like(q)
    with torch.no_grad():
        eager_out = masked_attention(q, k, v, bias, backend="eager").float()

    def forward(backend: str) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with torch.no_grad():
                return masked_attention(q, k, v, bias, backend=backend)

        return run

    def forward_backward(backend: str) -> Callable[[], tuple[torch.Tensor, ...]]:
        def run() -> tuple[torch.Tensor, ...]:
            out = masked_attention(*leaves, backend=backend)
            return torch.autograd.grad(out, leaves, upstream)

        return run

    trainable = set(available_backends(device, dtype, requires_grad=True))
    results = []
    for backend in available_backends(device, dtype, requires_grad=False):
        row = {"backend": backend}
        row["max_abs_diff_vs_eager"] = (forward(backend)().float() - eager_out).abs().max().item()
        row["forward_ms"] = median_ms(forward(backend), device, args.warmup, args.repeats)
        if args.backward and backend in trainable:
            row["forward_backward_ms"] = median_ms(forward_backward(backend), device, args.warmup, args.repeats)
        results.append(row)
    eager = results[0]
    for row in results:
        row["forward_ratio_vs_eager"] = row["forward_ms"] / eager["forward_ms"]
        if "forward_backward_ms" in row:
            row["forward_backward_ratio_vs_eager"] = row["forward_backward_ms"] / eager["forward_backward_ms"]
    return results


def format_table(results: list[dict]) -> str:
    def cell(row: dict, key: str, pattern: str) -> str:
        return pattern.format(row[key]) if key in row else "-"

    header = f"{'backend':<8} {'fwd ms':>9} {'x eager':>8} {'fwd+bwd ms':>11} {'x eager':>8} {'max|diff|':>10}"
    lines = [header, "-" * len(header)]
    for row in results:
        lines.append(
            f"{row['backend']:<8} {cell(row, 'forward_ms', '{:.3f}'):>9} {cell(row, 'forward_ratio_vs_eager', '{:.2f}'):>8} "
            f"{cell(row, 'forward_backward_ms', '{:.3f}'):>11} {cell(row, 'forward_backward_ratio_vs_eager', '{:.2f}'):>8} "
            f"{row['max_abs_diff_vs_eager']:>10.2e}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.kv_heads < 1 or args.heads % args.kv_heads != 0:
        raise SystemExit(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    results = benchmark(args)
    shape = (
        f"B={args.batch} H={args.heads} Hkv={args.kv_heads} M={args.queries} N={args.keys} D={args.head_dim} "
        f"{args.dtype} on {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(shape)
    print(format_table(results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"config": vars(args), "torch": torch.__version__, "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
