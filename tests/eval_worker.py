"""Run by tests/test_evaluate.py under torchrun: the reranker and the generator setting in one
launch, then what each rank holds of the ZeRO-3 generator.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/eval_worker.py \
        OUT_DIR RERANKER_DIR CONFIG [key=value ...]
"""

import json
import sys
from pathlib import Path

from grerank_dist.config import load_config
from grerank_dist.evaluation.evaluate import evaluate
from grerank_dist.training.strategy import DeepSpeedStrategy, shutdown_distributed

KS = (1, 3)
BATCH_SIZE = 2


def main() -> None:
    out_dir, reranker_dir, config_path, *overrides = sys.argv[1:]
    config = load_config(config_path, overrides)
    strategy = DeepSpeedStrategy(config)
    for setting in ("reranker", "generator"):
        evaluate(
            config, {"tiny": reranker_dir}, config.data.eval_file, setting, KS, Path(out_dir) / setting,
            batch_size=BATCH_SIZE, strategy=strategy,
        )
    params = list(strategy.generator_engine.module.parameters())
    payload = {
        "rank": strategy.rank,
        "world_size": strategy.world_size,
        # Partitioned and released: no rank holds a full parameter outside a forward call.
        "partitioned": all(hasattr(p, "ds_id") and p.numel() == 0 for p in params),
        "local_fraction": sum(p.ds_tensor.numel() for p in params) / sum(p.ds_numel for p in params),
    }
    (Path(out_dir) / f"rank{strategy.rank}.json").write_text(json.dumps(payload))
    shutdown_distributed()


if __name__ == "__main__":
    main()
