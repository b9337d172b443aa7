"""The named benchmark shapes and the engines both benchmarks build at them.

``grerank bench`` (:mod:`grerank_dist.perf.bench`: step time by phase) and its ``--world-size``
mode (:mod:`grerank_dist.perf.traffic`: collectives and memory over launched ranks) run the same
random-weight CEPE generator and BERT cross-encoder, on synthetic records, through the trainer's
own DeepSpeed engines; this module builds them, so neither benchmark imports the other's code.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from grerank_dist.config import TrainConfig, load_config
from grerank_dist.data.collate import Collator
from grerank_dist.models.cepe import CepeConfig, CepeForCausalContextLM, cepe_7b_config, tiny_cepe_config
from grerank_dist.interface import InputFormat
from grerank_dist.models.reranker import tiny_reranker
from grerank_dist.models.tokenization import build_word_tokenizer
from grerank_dist.training.strategy import DeepSpeedStrategy
from grerank_dist.training.train import lr_lambda

DS_CONFIGS = Path(__file__).resolve().parents[2] / "ds_configs"


@dataclass(frozen=True)
class Shape:
    """A benchmark shape: model widths and the batch (B queries, n candidates, document words)."""

    generator: Callable[[int], CepeConfig]  # vocab size -> config
    reranker_hidden: int
    reranker_layers: int
    batch: int
    n_candidates: int
    doc_words: tuple[int, int]  # document lengths drawn uniformly in this range (tokens)
    doc_max_tokens: int
    question_words: int = 10
    answer_words: int = 4
    vocab_words: int = 2000


def _small_cepe(vocab: int) -> CepeConfig:
    """Decoder 512 x 8 layers (cross-attention in each), encoder 256 x 4: matrix work dominates on a CPU."""
    return tiny_cepe_config(
        vocab_size=vocab, hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=8, num_cross_attn_layers=8,
        encoder_config={"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
                        "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 512},
    )


def _cepe_7b_slice(vocab: int) -> CepeConfig:
    """CEPE-LLaMA-2-7B's widths (and 32k vocabulary) with 2 decoder and 2 encoder layers."""
    return cepe_7b_config(num_hidden_layers=2, num_cross_attn_layers=2, encoder_config={"num_hidden_layers": 2})


SHAPES: dict[str, Shape] = {
    "tiny": Shape(lambda v: tiny_cepe_config(vocab_size=v), 64, 2, batch=2, n_candidates=4, doc_words=(4, 12),
                  doc_max_tokens=16, question_words=5, answer_words=2, vocab_words=200),
    # BERT-mini reranker (256 x 4); documents of 40-128 tokens in a 128-token window.
    "small": Shape(lambda v: _small_cepe(max(v, 32000)), 256, 4, batch=4, n_candidates=8, doc_words=(40, 128),
                   doc_max_tokens=128),
    # bge-base widths (768) with 2 layers beside the 7B slice.
    "7b-slice": Shape(lambda v: _cepe_7b_slice(v), 768, 2, batch=1, n_candidates=4, doc_words=(40, 128),
                      doc_max_tokens=128),
}


# ---------------------------------------------------------------------------------------- data


def synthetic_records(shape: Shape, count: int, seed: int) -> list[dict[str, Any]]:
    """Records of random words, document lengths uniform in ``shape.doc_words`` (one token per word)."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(shape.vocab_words)]

    def text(length: int) -> str:
        return " ".join(rng.choice(words) for _ in range(length))

    return [
        {
            "id": str(q),
            "question": text(shape.question_words),
            "answers": [text(shape.answer_words)],
            "ctxs": [{"title": "", "text": text(rng.randint(*shape.doc_words)), "score": None, "has_answer": None,
                      "is_supporting": None} for _ in range(shape.n_candidates)],
        }
        for q in range(count)
    ]


def bench_config(shape: Shape, variant: str, extra: list[str]) -> TrainConfig:
    """The training config of one variant (the DeepSpeed files of this repository)."""
    naive = variant == "naive"
    overrides = [
        f"data.n_candidates={shape.n_candidates}", f"data.doc_max_tokens={shape.doc_max_tokens}",
        "data.doc_template='{text}'", "data.passage_template='{text}'", "data.prompt_template='{question} :'",
        "relax.k=2", "train.lr=1e-4",
        f"train.micro_batch_size={1 if naive else shape.batch}",
        f"train.gradient_accumulation_steps={shape.batch if naive else 1}",
        f"generator.attention_backend={'eager' if naive else 'auto'}",
        f"generator.gradient_checkpointing={'true' if naive else 'false'}",
        f"generator.dtype={'bfloat16' if variant == 'bf16' else 'float32'}",
        f"reranker.max_length={shape.question_words + shape.doc_max_tokens + 3}",
        f"deepspeed.generator_config={DS_CONFIGS / 'generator_zero3.json'}",
        f"deepspeed.reranker_config={DS_CONFIGS / 'reranker_zero1.json'}",
    ]
    return load_config(None, overrides + list(extra))


@dataclass
class Engines:
    """One variant's engines and what its steps need, built the way the trainer builds them."""

    config: TrainConfig
    strategy: DeepSpeedStrategy
    model: CepeForCausalContextLM  # the generator's module (partitioned under ZeRO-3)
    model_config: CepeConfig
    generator: Any  # what training_step calls: the generator engine's module
    rr_model: torch.nn.Module
    reranker: Any  # the reranker engine
    collate: Collator


def build_engines(shape: Shape, config: TrainConfig, seed: int, docs_pad_to_batch: bool = True) -> Engines:
    """Random-weight models of ``shape`` in the DeepSpeed engines ``config`` names (one process
    or one rank of a launched group) and a collator for their tokenizers."""
    strategy = DeepSpeedStrategy(config)
    torch.manual_seed(seed)
    with strategy.generator_loading():
        gen_tokenizer_texts = [f"w{i}" for i in range(shape.vocab_words)] + [":"]
        gen_tokenizer = build_word_tokenizer(gen_tokenizer_texts, "decoder")
        model_config = shape.generator(len(gen_tokenizer))
        model_config.cross_attn_backend = config.generator.attention_backend
        model = CepeForCausalContextLM(model_config).to(strategy.dtype).requires_grad_(False).eval()
    if config.generator.gradient_checkpointing:
        model.activation_checkpointing_enable()
    generator = strategy.build_generator_engine(model)
    rr_model, rr_tokenizer = tiny_reranker(gen_tokenizer_texts, seed=seed, hidden_size=shape.reranker_hidden,
                                           layers=shape.reranker_layers)
    optimizer = strategy.reranker_optimizer(rr_model.parameters(), config.train.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    reranker = strategy.build_reranker_engine(rr_model, optimizer, scheduler)
    reranker.train()
    fmt = InputFormat(config.data.doc_template, config.data.prompt_template, prompt_bos=True,
                      docs_pad_to_batch=docs_pad_to_batch)
    collate = Collator(config.data, gen_tokenizer, rr_tokenizer, config.reranker.max_length, seed=seed,
                       input_format=fmt)
    return Engines(config, strategy, model, model_config, generator, rr_model, reranker, collate)
