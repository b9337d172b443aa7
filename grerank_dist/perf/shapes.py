"""The named benchmark shapes and the engines the benchmarks build at them.

``grerank bench`` (:mod:`grerank_dist.perf.bench`: step time by phase), its ``--world-size``
mode (:mod:`grerank_dist.perf.traffic`: collectives and memory over launched ranks) and the GPU
check (:mod:`grerank_dist.perf.gpu_check`) run the same random-weight generators (CEPE, or a
decoder-only LLM) and BERT cross-encoder, on synthetic records, through the trainer's own
DeepSpeed engines; this module builds them, so no benchmark imports another's code.
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, T5Config

from grerank_dist.config import DataConfig, TrainConfig, load_config
from grerank_dist.data.collate import Collator
from grerank_dist.interface import Batch, InputFormat
from grerank_dist.models.cepe import CepeConfig, CepeForCausalContextLM, cepe_7b_config, tiny_cepe_config
from grerank_dist.models.decoder_only import ATTENTION_NAME, wrap_causal_lm
from grerank_dist.models.fid import FidForConditionalGeneration, fid_input_format
from grerank_dist.models.reranker import tiny_reranker
from grerank_dist.models.tokenization import build_word_tokenizer
from grerank_dist.training.strategy import DeepSpeedStrategy
from grerank_dist.training.train import lr_lambda

DS_CONFIGS = Path(__file__).resolve().parents[2] / "ds_configs"


@dataclass(frozen=True)
class Shape:
    """A benchmark shape: model widths and the batch (B queries, n candidates, document words)."""

    # vocab size -> a CepeConfig, a T5Config (FiD; ids of the word-level decoder tokenizer: pad 3,
    # EOS 2) or a causal LM's config (decoder-only)
    generator: Callable[[int], PretrainedConfig]
    reranker_hidden: int
    reranker_layers: int
    batch: int
    n_candidates: int
    doc_words: tuple[int, int]  # document lengths drawn uniformly in this range (tokens)
    doc_max_tokens: int
    question_words: int = 10
    answer_words: int = 4
    vocab_words: int = 2000
    reranker_heads: int | None = None  # None: tiny_reranker's hidden / 32
    reranker_vocab: int | None = None  # None: the word-level tokenizer's size


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
        f"generator.dtype={'bfloat16' if variant in ('bf16', 'bf16-all') else 'float32'}",
        f"reranker.dtype={'bfloat16' if variant == 'bf16-all' else 'float32'}",
        f"reranker.max_length={shape.question_words + shape.doc_max_tokens + 3}",
        f"deepspeed.generator_config={DS_CONFIGS / 'generator_zero3.json'}",
        f"deepspeed.reranker_config={DS_CONFIGS / 'reranker_zero1.json'}",
    ]
    return load_config(None, overrides + list(extra))


def generator_texts(shape: Shape) -> list[str]:
    """Every word of :func:`synthetic_records` and the prompt template's ':' (the tokenizers' vocabulary)."""
    return [f"w{i}" for i in range(shape.vocab_words)] + [":"]


def build_generator_model(
    shape: Shape, data: DataConfig, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> tuple[torch.nn.Module, Any]:
    """The shape's random-weight generator, frozen, in ``dtype`` on ``device``, with its word-level
    tokenizer and its :class:`InputFormat` (``model.input_format``).

    Built on ``device`` (a 7B model initialises in seconds on a GPU, minutes on a CPU), in fp32
    and then cast, so that builds in different dtypes hold the same weights up to rounding."""
    tokenizer = build_word_tokenizer(generator_texts(shape), "decoder")
    config = shape.generator(len(tokenizer))
    with torch.device(device):
        if isinstance(config, CepeConfig):
            model = CepeForCausalContextLM(config)
            model.input_format = InputFormat(data.doc_template, data.prompt_template, prompt_bos=True, docs_pad_to_batch=True)
        elif isinstance(config, T5Config):
            model = FidForConditionalGeneration(config)
            model.input_format = fid_input_format(data)
        else:
            model = wrap_causal_lm(AutoModelForCausalLM.from_config(config, attn_implementation=ATTENTION_NAME), tokenizer, data)
    return model.to(dtype).requires_grad_(False).eval(), tokenizer


@dataclass
class Engines:
    """One variant's engines and what its steps need, built the way the trainer builds them."""

    config: TrainConfig
    strategy: DeepSpeedStrategy
    model: torch.nn.Module  # the generator's module (partitioned under ZeRO-3)
    model_config: PretrainedConfig
    generator: Any  # what training_step calls: the generator engine's module
    rr_model: torch.nn.Module
    reranker: Any  # the reranker engine
    collate: Collator


def build_engines(shape: Shape, config: TrainConfig, seed: int, docs_pad_to_batch: bool = True) -> Engines:
    """Random-weight models of ``shape`` in the DeepSpeed engines ``config`` names (one process
    or one rank of a launched group) and a collator for their tokenizers. ``docs_pad_to_batch``
    False: documents at the fixed ``doc_max_tokens`` width even where the generator allows less."""
    strategy = DeepSpeedStrategy(config)
    torch.manual_seed(seed)
    with strategy.generator_loading():
        model, gen_tokenizer = build_generator_model(shape, config.data, strategy.dtype, strategy.device)
    if hasattr(model.config, "cross_attn_backend"):  # CEPE, FiD; a decoder-only LLM has one attention function
        model.config.cross_attn_backend = config.generator.attention_backend
    if config.generator.gradient_checkpointing:
        model.activation_checkpointing_enable()
    generator = strategy.build_generator_engine(model)
    rr_overrides = {name: value for name, value in (("num_attention_heads", shape.reranker_heads),
                                                    ("vocab_size", shape.reranker_vocab)) if value is not None}
    rr_model, rr_tokenizer = tiny_reranker(generator_texts(shape), seed=seed, hidden_size=shape.reranker_hidden,
                                           layers=shape.reranker_layers, **rr_overrides)
    if config.reranker.gradient_checkpointing:
        rr_model.activation_checkpointing_enable()
    optimizer = strategy.reranker_optimizer(rr_model.parameters(), config.train.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    reranker = strategy.build_reranker_engine(rr_model, optimizer, scheduler)
    reranker.train()
    fmt = model.input_format
    fmt = dataclasses.replace(fmt, docs_pad_to_batch=fmt.docs_pad_to_batch and docs_pad_to_batch)
    collate = Collator(config.data, gen_tokenizer, rr_tokenizer, config.reranker.max_length, seed=seed,
                       input_format=fmt)
    return Engines(config, strategy, model, model.config, generator, rr_model, reranker, collate)


def close_engines(built: Engines) -> None:
    """Free a variant's engines before the next is built (their memory would otherwise stay held)."""
    built.strategy.release_generator_params()
    built.strategy.destroy_engines()


def step_batches(
    shape: Shape, collate: Collator, records: list[dict[str, Any]], steps: int, per_call: int
) -> tuple[list[list[Batch]], list[float]]:
    """Each step's micro-batches of ``per_call`` queries (B = ``shape.batch`` queries a step),
    tokenised ahead of the step as DataLoader workers would, and the seconds each step's took."""
    batches, seconds = [], []
    for s in range(steps):
        chunk = records[(s * shape.batch) % len(records):][: shape.batch]
        start = time.perf_counter()
        batches.append([collate(chunk[i : i + per_call], list(range(i, i + per_call)))
                        for i in range(0, shape.batch, per_call)])
        seconds.append(time.perf_counter() - start)
    return batches, seconds
