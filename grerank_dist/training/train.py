"""The G-Rerank training recipe: read it top to bottom.

    grerank train --config configs/tiny_cpu.yaml [--resume auto] [key.sub=value ...]

One process or many (torchrun, DeepSpeed's launcher, Slurm) run the same code. A frozen
parallel-context generator sits in a ZeRO-3 engine with no optimizer; the reranker is trained
data-parallel from the generator's answer loss through a Gumbel relaxed top-k document mask.
"""

from __future__ import annotations

import argparse
import math
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from grerank_dist.method.checks import deferred_checks
from grerank_dist.config import TrainConfig, load_config
from grerank_dist.data.collate import Collator, MicroBatchSchedule
from grerank_dist.interface import Batch
from grerank_dist.data.dataset import Ranks, StepBatches, candidate_counts, load_records, load_tokens, step_loader
from grerank_dist.interface import ParallelContextGenerator
from grerank_dist.models import RANDOM_PREFIX, configure_generator, load_generator
from grerank_dist.method.objectives import GENERATOR_FREE_OBJECTIVES, OBJECTIVES, ObjectiveOutput
from grerank_dist.method.relax import noise_generator
from grerank_dist.models.reranker import export_reranker, load_reranker, reranker_scores, tiny_reranker
from grerank_dist.training.strategy import DeepSpeedStrategy
from grerank_dist.training.tracking import MetricsLogger, ThroughputWindow


class StopSignal:
    """Remembers a SIGTERM/SIGUSR1 instead of dying mid-step, so the loop can checkpoint first."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def record_texts(records: Iterable[dict[str, Any]], config: TrainConfig) -> list[str]:
    """Every text a word-level tokenizer of a random:tiny model must cover."""
    d = config.data
    texts = [d.prompt_template.format(question=r["question"]) for r in records]
    texts += [a for r in records for a in r["answers"]]
    texts += [d.doc_template.format(title=c["title"], text=c["text"], question=r["question"]) for r in records for c in r["ctxs"]]
    return texts


def build_generator(
    config: TrainConfig, strategy: DeepSpeedStrategy, vocab_texts: list[str] | tuple = ()
) -> tuple[ParallelContextGenerator, Any]:
    """The frozen generator in its engine (partitioned as it loads under ZeRO-3), and its tokenizer."""
    with strategy.generator_loading():
        model, tokenizer = load_generator(
            config.generator.path, vocab_texts, seed=config.generator.seed, dtype=strategy.dtype, data=config.data
        )
    configure_generator(model, config.generator)
    if config.generator.gradient_checkpointing:
        model.activation_checkpointing_enable()
    return strategy.build_generator_engine(model), tokenizer


def build_reranker(config: TrainConfig, records: Iterable[dict[str, Any]]) -> tuple[torch.nn.Module, Any]:
    spec = config.reranker
    if spec.path.startswith(RANDOM_PREFIX):
        if spec.path != f"{RANDOM_PREFIX}tiny":
            raise ValueError(f"reranker.path {spec.path!r}: the only random reranker is 'random:tiny'")
        passages = [config.data.passage_template.format(title=c["title"], text=c["text"]) for r in records for c in r["ctxs"]]
        model, tokenizer = tiny_reranker([r["question"] for r in records] + passages, seed=spec.seed)
    else:
        model, tokenizer = load_reranker(spec.path, lora=spec.lora)
    if spec.gradient_checkpointing:
        model.activation_checkpointing_enable()
    return model, tokenizer


def lr_lambda(config: TrainConfig):
    """Linear warmup, then linear or cosine decay to 0 (or constant) over max_steps."""
    t = config.train

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.schedule == "constant":
            return 1.0
        progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
        progress = min(1.0, progress)
        return 1.0 - progress if t.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def training_step(
    strategy: DeepSpeedStrategy,
    reranker: torch.nn.Module,
    generator: ParallelContextGenerator,
    batch: Batch,
    config: TrainConfig,
    noise: torch.Generator,
) -> ObjectiveOutput:
    """One micro-step: scores -> relaxed mask -> masked generator -> loss -> reranker step.

    The encoder runs once, without autograd (documents are encoded independently, so it does
    not depend on the mask); the gradient reaches the reranker only through the log-mask in the
    decoder's cross-attention. ``strategy.step`` applies the update at accumulation boundaries.
    The reference objectives that never read the generator skip it (every rank alike).
    """
    scores = reranker_scores(reranker, batch.reranker_inputs, config.data.n_candidates)  # [B, n]
    contexts = None
    if config.train.objective not in GENERATOR_FREE_OBJECTIVES:
        strategy.begin_generator_step()
        contexts = generator.encode_contexts(batch.encoder_input_ids, batch.encoder_attention_mask)
    objective = OBJECTIVES[config.train.objective]
    out = objective(generator, contexts, batch, scores, config.relax, noise, config.objective)  # mask -> generator -> loss
    strategy.backward(out.loss)
    strategy.step()
    return out


@dataclass
class TrainResult:
    """What a finished run leaves in memory (the demo and the tests inspect it)."""

    reranker_dir: Path
    strategy: DeepSpeedStrategy
    reranker: torch.nn.Module  # the reranker engine's module
    generator: torch.nn.Module  # the generator engine's module (ZeRO-3 partitioned)
    final_loss: float


def train(config: TrainConfig, resume: str = "auto", local_rank: int | None = None) -> TrainResult:
    """Train a reranker with the configured objective and export it to OUTPUT/reranker."""
    strategy = DeepSpeedStrategy(config, local_rank=local_rank)
    out_dir = Path(config.output_dir)
    ckpt_dir = out_dir / "checkpoints"
    torch.manual_seed(config.seed)

    # Data: rank 0 reads and checks the file into Arrow once (cached); every rank memory-maps it,
    # and the schedule picks each rank's share. A query with no more than k candidates gets mask 1
    # everywhere and no gradient: left out.
    ranks = Ranks(strategy.rank, strategy.local_rank, strategy.all_gather_object)
    all_records, report, records_key = load_records(config.data, ranks)
    keep = [i for i, count in enumerate(candidate_counts(all_records)) if count > config.relax.k]
    records = all_records.select(keep)
    if strategy.is_main:
        print(report.summary(), flush=True)
        if len(records) < report.kept:
            print(f"left out {report.kept - len(records)} records with <= relax.k={config.relax.k} candidates", flush=True)

    # Models: the frozen generator into its ZeRO-3 engine first, then the trained reranker.
    random_generator = config.generator.path.startswith(RANDOM_PREFIX)
    generator, gen_tokenizer = build_generator(config, strategy, record_texts(records, config) if random_generator else ())
    rr_model, rr_tokenizer = build_reranker(config, records)
    trainable = [p for p in rr_model.parameters() if p.requires_grad]
    optimizer = strategy.reranker_optimizer(trainable, config.train.lr, config.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    reranker = strategy.build_reranker_engine(rr_model, optimizer, scheduler)

    collate = Collator(
        config.data, gen_tokenizer, rr_tokenizer, config.reranker.max_length, seed=config.seed,
        input_format=generator.input_format,
    )
    # Token ids are built once per file and tokenizers (cached like the records); DataLoader
    # workers pad the coming micro-steps' batches during the step.
    tokens = load_tokens(all_records, records_key, collate, config.data, ranks).select(keep)
    schedule = MicroBatchSchedule(
        len(records), config.train.micro_batch_size, strategy.world_size, strategy.rank, config.seed
    )
    accum = config.train.gradient_accumulation_steps

    def export(target: Path) -> None:
        """Every rank calls it (a bf16/fp16 engine's fp32 masters are gathered); rank 0 writes."""
        weights = strategy.reranker_master_weights()
        if strategy.is_main:
            export_reranker(reranker.module, rr_tokenizer, target, training_config=config.to_dict(), weights=weights)

    start_step, loss = 0, float("nan")
    tag = strategy.resume_tag(ckpt_dir) if resume == "auto" else (None if resume == "none" else resume)
    if tag is not None:
        state = strategy.load_checkpoint(ckpt_dir, Path(tag).name)
        start_step = int(state["step"])
        if strategy.is_main:
            print(f"resumed from {ckpt_dir / Path(tag).name} at step {start_step}", flush=True)
    else:
        strategy.start_new_run(ckpt_dir)
    strategy.write_json(out_dir / "train_config.json", config.to_dict())

    # Records past the resumed step are logged again below: the logger drops the earlier ones.
    logger = MetricsLogger(out_dir, enabled=strategy.is_main, resume_step=start_step)
    throughput = ThroughputWindow()
    queries = config.train.micro_batch_size * accum * strategy.world_size  # per optimizer step
    bar = tqdm(total=config.train.max_steps, initial=start_step, disable=not strategy.is_main, desc="train")
    reranker.train()
    # A preempted job (SIGTERM, or Slurm's SIGUSR1 warning) finishes its step, checkpoints, exits.
    stop_signal = StopSignal()
    last_step = min(config.train.stop_at_step or config.train.max_steps, config.train.max_steps)
    done, signalled = start_step, False
    # Workers start here, after the stop-signal handlers, which they inherit.
    batches = iter(step_loader(StepBatches(tokens, schedule, collate), start_step * accum, last_step * accum,
                               config.data.num_workers, pin_memory=strategy.device.type == "cuda"))
    # Value checks (NaN scores, masks that remove every document) are read at each log point,
    # with the losses, instead of stalling every step on a device read (grerank_dist.method.checks).
    with deferred_checks() as value_checks:
        for step in range(start_step, last_step):
            lr = strategy.learning_rate()  # the rate this step's update uses
            losses, max_weights, max_masks, objective_stats = [], [], [], []
            data_time = compute_time = 0.0
            for micro in range(accum):
                micro_step = step * accum + micro
                # Dropout and Gumbel noise are functions of (seed, rank, micro-step): runs resume exactly.
                torch.manual_seed(config.seed * 1_000_003 + micro_step * 4099 + strategy.rank)
                noise = noise_generator(config.seed, strategy.rank, micro_step, strategy.device)
                started = time.perf_counter()  # data time: the wait for the prepared batch
                batch = next(batches).to(strategy.device)
                batched = time.perf_counter()
                out = training_step(strategy, reranker, generator, batch, config, noise)
                losses.append(out.loss.detach())
                max_weights.append(out.mean_max_weight)
                max_masks.append(out.mean_max_mask)
                data_time += batched - started
                compute_time += time.perf_counter() - batched
                objective_stats.append(out.stats)
            throughput.add_step(queries, data_time, compute_time)
            done = step + 1
            bar.update(1)
            signalled = strategy.any_rank(stop_signal.received)
            stopping = done == last_step or signalled
            saving = bool(config.train.save_every and done % config.train.save_every == 0) or stopping
            if done % config.train.log_every == 0 or saving:
                value_checks.raise_failed(f"training steps up to {done}")
            if done % config.train.log_every == 0 or stopping:
                loss = strategy.all_reduce_mean(torch.stack(losses).mean()).item()
                max_weight = strategy.all_reduce_mean(torch.stack(max_weights).mean()).item()
                logger.log(
                    done,
                    {
                        "loss": loss,
                        "lr": lr,
                        "grad_norm": strategy.grad_norm(),
                        "mean_max_weight": max_weight,
                        "mean_max_mask": strategy.all_reduce_mean(torch.stack(max_masks).mean()).item(),
                        **throughput.summary(),  # queries_per_s over the window, data_time_s, step_time_s
                        **{
                            name: strategy.all_reduce_mean(torch.stack([s[name] for s in objective_stats]).float().mean()).item()
                            for name in objective_stats[0]
                        },
                    },
                )
                bar.set_postfix(loss=f"{loss:.4f}", max_weight=f"{max_weight:.3f}")
            if saving:
                strategy.save_checkpoint(ckpt_dir, done, {"step": done}, export_fn=export)
            if stopping:
                break
    stop_signal.restore()
    bar.close()
    logger.close()

    if done < config.train.max_steps:
        # Stopped early (a signal or train.stop_at_step): OUTPUT/reranker is kept for a finished
        # run; the checkpoint just written holds this run's reranker so far.
        checkpoint = ckpt_dir / f"step_{done}"
        if strategy.is_main:
            reason = "on a stop signal" if signalled else f"at train.stop_at_step={config.train.stop_at_step}"
            print(
                f"stopped early at step {done} of {config.train.max_steps} ({reason}); the reranker so far is in "
                f"{checkpoint / 'reranker'}. To continue, run the same command with --resume auto",
                flush=True,
            )
        strategy.barrier()
        return TrainResult(checkpoint / "reranker", strategy, reranker.module, generator, loss)
    final = out_dir / "reranker"
    export(final)
    if strategy.is_main:
        print(f"exported reranker to {final}", flush=True)
    strategy.barrier()
    return TrainResult(final, strategy, reranker.module, generator, loss)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML training config (see configs/)")
    parser.add_argument(
        "--resume",
        default="auto",
        help="auto: continue from OUTPUT/checkpoints/latest if present; none: start fresh; "
        "or a checkpoint tag such as step_200",
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="config overrides as dotted key=value, e.g. relax.k=3 train.lr=1e-4")


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    train(config, resume=args.resume, local_rank=args.local_rank)
    return 0
