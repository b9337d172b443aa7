"""Time one G-Rerank training step by phase at a named shape (the same as `grerank bench`).

    OMP_NUM_THREADS=2 python scripts/bench_step.py --shape small --variants efficient,naive,bf16

See grerank_dist/bench.py for what each variant and column means, and docs/PERFORMANCE.md for
measured tables.
"""

from __future__ import annotations

import argparse
import sys

from grerank_dist import bench

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench.configure_parser(parser)
    sys.exit(bench.run(parser.parse_args()))
