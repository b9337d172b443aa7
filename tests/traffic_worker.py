"""Run under torchrun (2 ranks, gloo): one known all-gather through DeepSpeed's comms logger,
so the test can compare grerank_dist.perf.traffic's count with the hand-computed size."""

import json
import sys

import torch

from grerank_dist.config import load_config
from grerank_dist.training.strategy import DeepSpeedStrategy, shutdown_distributed
from grerank_dist.perf.traffic import logged_collectives


def main() -> None:
    strategy = DeepSpeedStrategy(load_config(None, []))
    import deepspeed.comm as dist

    dist.configure(enabled=True, prof_all=True, verbose=False)
    shard = torch.full((3, 5), float(strategy.rank))  # 15 fp32 elements = 60 bytes per rank
    gathered = torch.empty(strategy.world_size * 15)
    dist.all_gather_into_tensor(gathered, shard.reshape(-1))
    counts = logged_collectives()
    with open(f"{sys.argv[1]}.rank{strategy.rank}", "w") as handle:
        json.dump({"counts": counts, "gathered": gathered.tolist()}, handle)
    shutdown_distributed()


if __name__ == "__main__":
    main()
