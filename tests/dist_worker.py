"""Run by the distributed tests under torchrun (or alone): trains with the real recipe, then
dumps what each rank holds so the test can compare ranks and check the frozen generator.

    python tests/dist_worker.py CONFIG OUT_JSON [key=value ...]
"""

import hashlib
import json
import sys

import deepspeed
import torch

from grerank_dist.method import objectives
from grerank_dist.config import load_config
from grerank_dist.models import load_generator
from grerank_dist.training.train import record_texts, train
from grerank_dist.data.collate import Collator
from grerank_dist.data.records import read_records
from grerank_dist.training.strategy import shutdown_distributed


def state_hash(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    config_path, out_path, *overrides = sys.argv[1:]
    config = load_config(config_path, overrides)
    # Record the state of the noise generator the trainer hands the relaxation at its first call.
    drawn = []
    relax_fn = objectives.gumbel_attention_mask

    def recording(*args, generator=None, **kwargs):
        if not drawn:
            probe = torch.Generator(device="cpu").set_state(generator.get_state())
            drawn.append(torch.rand(8, generator=probe).tolist())
        return relax_fn(*args, generator=generator, **kwargs)

    objectives.gumbel_attention_mask = recording
    result = train(config, resume="none")
    strategy = result.strategy
    trace_complete = strategy.generator_engine.optimizer.get_param_coordinator().is_complete_trace()

    # The frozen generator after training, gathered from its ZeRO-3 partitions, against a fresh
    # unsharded copy built the same way.
    records, _ = read_records(config.data.train_file, config.data.n_candidates)
    reference, tokenizer = load_generator(config.generator.path, record_texts(records, config), seed=config.generator.seed)
    params = list(result.generator.parameters())
    max_diff = 0.0
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        trained = dict(result.generator.named_parameters())
        for name, ref in reference.named_parameters():
            max_diff = max(max_diff, (trained[name].detach().float() - ref.float()).abs().max().item())
        partitioned = all(hasattr(p, "ds_id") for p in params)
    # Backward through the 2-rank ZeRO-3 generator gives the log-mask gradient of the unsharded one.
    collate = Collator(config.data, tokenizer, None, config.reranker.max_length)
    batch = collate(records[:3], [0, 1, 2])
    log_mask = torch.randn(3, config.data.n_candidates, generator=torch.Generator().manual_seed(strategy.rank))
    grads = []
    for generator in (result.generator, reference):
        mask = log_mask.clone().requires_grad_(True)
        contexts = generator.encode_contexts(batch.encoder_input_ids, batch.encoder_attention_mask)
        generator.answer_logprobs(contexts, batch.input_ids, batch.attention_mask, batch.labels, mask).token_mean_nll().backward()
        grads.append(mask.grad)
    payload = {
        "rank": strategy.rank,
        "world_size": strategy.world_size,
        "reranker_hash": state_hash(result.reranker),
        "generator_max_abs_change": max_diff,
        "generator_partitioned": partitioned,
        "generator_requires_grad": any(p.requires_grad for p in result.generator.parameters()),
        "first_noise_sample": drawn[0] if drawn else None,  # None: an objective without a relaxed mask
        "prefetch_trace_complete": trace_complete,
        "final_loss": result.final_loss,
        "sharded_vs_unsharded_grad_max_diff": (grads[0] - grads[1]).abs().max().item(),
        "grad_abs_max": grads[1].abs().max().item(),
    }
    with open(f"{out_path}.rank{strategy.rank}", "w") as handle:
        json.dump(payload, handle)
    shutdown_distributed()


if __name__ == "__main__":
    main()
