"""Analytic cost of one G-Rerank step: FLOPs, ZeRO-3 all-gather bytes, reranker reduction bytes, memory.

One source for every prediction the benchmarks print beside their measurements
(``grerank_dist.perf.bench``, ``grerank_dist.perf.traffic``) and for the GPU-cluster projection
(``scripts/project_scale.py``). Everything here is computed from shapes (parameter counts come
from the model classes built on the meta device) and from the DeepSpeed config values; nothing is
read back from a run.

ZeRO-3 traffic follows DeepSpeed 0.19's parameter coordinator (``partitioned_param_coordinator``),
in the steady state (from the third micro-step: the first records the module trace, the second
gathers the persistent parameters once, for good):

- a parameter of at most ``stage3_param_persistence_threshold`` elements is persistent: never
  gathered again;
- every other parameter is all-gathered when a module that owns it is about to run (forward, or
  backward where the module's output required grad) and it is not resident; the gathered buffer
  holds ``ceil(numel / world) * world`` elements (DeepSpeed pads partitions to equal size);
- after a use it is released unless it is used again within the next
  ``stage3_max_reuse_distance`` parameter elements of the module trace (or the prefetcher has
  already looked past that next use, which :func:`gather_schedule` bounds by the prefetch bucket).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

from grerank_dist.models.cepe import CepeConfig

FLOP_FORMULA = """\
model FLOPs per step (matmuls only, 2 per multiply-add; no recompute counted):
  total   = 3*F_rr + F_enc + F_kv + 2*F_dec   (reranker trained: fwd + 2x bwd; encoder and K/V
            without grad; frozen decoder: bwd = input gradients only, about 1x its fwd)
  Llama layer over a sequence of s tokens (hidden h, H heads, H_kv kv heads of d, FFN f):
            2*s*(h*d*(H + 2*H_kv) + H*d*h + 3*h*f) + 4*s*s*H*d
  F_rr    = sum over pairs, BERT layer: 2*s*(4*h*h + 2*h*f) + 4*s*s*h
  F_enc   = sum over documents of the encoder's layers (s = document tokens)
  F_kv    = per cross layer 2*N*h_enc*2*H_kv*d, N = document tokens of the batch
  F_dec   = decoder layers over the B rows + per cross layer 2*S*2*h*H*d + 4*S*N_b*H*d
            (N_b = the query's document tokens) + lm head 2*A*h*V (A = answer tokens)
  useful: real tokens only (attention masks); executed: the padded shapes the step runs"""


# ---------------------------------------------------------------------------------------- FLOPs


@dataclass(frozen=True)
class StepLengths:
    """Token counts of one micro-batch: what the FLOP formulas need, from a batch or from a plan."""

    pair_lengths: Sequence[int]  # reranker (question, document) pairs, B*n
    doc_lengths: Sequence[int]  # documents, B*n (query b's n documents consecutive)
    row_lengths: Sequence[int]  # decoder rows (prompt + answer), B
    n_candidates: int
    answer_tokens: int  # tokens that go through the lm head

    @classmethod
    def uniform(cls, batch: int, n: int, pair: int, doc: int, row: int, answer: int) -> "StepLengths":
        """Every pair, document and row of the same length (the projection's planning shape)."""
        return cls([pair] * batch * n, [doc] * batch * n, [row] * batch, n, answer * batch)


def llama_layer_flops(config: Any, lengths: Iterable[int]) -> float:
    """Matmul FLOPs of one Llama layer over sequences of these lengths (see FLOP_FORMULA)."""
    h, heads, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    d = getattr(config, "head_dim", None) or h // heads
    per_token = 2 * (h * d * (heads + 2 * kv) + heads * d * h + 3 * h * config.intermediate_size)
    return sum(per_token * s + 4 * s * s * heads * d for s in lengths)


def reranker_flops(rr: Any, pair_lengths: Iterable[int]) -> float:
    """Forward matmul FLOPs of a BERT-style cross-encoder over its pairs."""
    h, f = rr.hidden_size, rr.intermediate_size
    return rr.num_hidden_layers * sum(2 * s * (4 * h * h + 2 * h * f) + 4 * s * s * h for s in pair_lengths)


def cepe_step_flops(gen: Any, rr: Any, lengths: StepLengths) -> dict[str, float]:
    """Analytic FLOPs of one CEPE G-Rerank micro-step (see :data:`FLOP_FORMULA`)."""
    f_rr = reranker_flops(rr, lengths.pair_lengths)
    enc = gen.encoder_llama_config()
    f_enc = enc.num_hidden_layers * llama_layer_flops(enc, lengths.doc_lengths)
    d = gen.head_dim
    cross_layers = gen.num_cross_attn_layers if gen.do_cross_attention else 0
    f_kv = cross_layers * 2 * sum(lengths.doc_lengths) * enc.hidden_size * 2 * gen.num_key_value_heads * d
    n = lengths.n_candidates
    keys_per_query = [sum(lengths.doc_lengths[b * n : (b + 1) * n]) for b in range(len(lengths.row_lengths))]
    f_dec = gen.num_hidden_layers * llama_layer_flops(gen, lengths.row_lengths) + cross_layers * sum(
        2 * s * 2 * gen.hidden_size * gen.num_attention_heads * d + 4 * s * keys * gen.num_attention_heads * d
        for s, keys in zip(lengths.row_lengths, keys_per_query)
    )
    f_dec += 2 * lengths.answer_tokens * gen.hidden_size * gen.vocab_size
    return {"reranker": 3 * f_rr, "encoder": f_enc, "cross_kv": f_kv, "decoder": 2 * f_dec,
            "total": 3 * f_rr + f_enc + f_kv + 2 * f_dec}


def decoder_only_step_flops(gen: Any, rr: Any, lengths: StepLengths) -> dict[str, float]:
    """A decoder-only LLM in parallel-context mode: every document pre-filled alone through all
    layers without grad ("encoder"), then the prompt+answer rows through all layers attending to
    their query's document K/V (forward + input-gradient backward, like CEPE's decoder)."""
    f_rr = reranker_flops(rr, lengths.pair_lengths)
    f_prefill = gen.num_hidden_layers * llama_layer_flops(gen, lengths.doc_lengths)
    d = getattr(gen, "head_dim", None) or gen.hidden_size // gen.num_attention_heads
    n = lengths.n_candidates
    keys_per_query = [sum(lengths.doc_lengths[b * n : (b + 1) * n]) for b in range(len(lengths.row_lengths))]
    f_dec = gen.num_hidden_layers * (llama_layer_flops(gen, lengths.row_lengths) + sum(
        4 * s * keys * gen.num_attention_heads * d for s, keys in zip(lengths.row_lengths, keys_per_query)))
    f_dec += 2 * lengths.answer_tokens * gen.hidden_size * gen.vocab_size
    return {"reranker": 3 * f_rr, "encoder": f_prefill, "cross_kv": 0.0, "decoder": 2 * f_dec,
            "total": 3 * f_rr + f_prefill + 2 * f_dec}


def batch_lengths(batch: Any, useful: bool) -> StepLengths:
    """The token counts of a collated :class:`grerank_dist.interface.Batch`: real tokens (``useful``)
    or the padded shapes the step executes."""
    def lengths(mask: torch.Tensor) -> list[int]:
        flat = mask.reshape(-1, mask.shape[-1])
        return flat.sum(-1).tolist() if useful else [flat.shape[-1]] * flat.shape[0]

    return StepLengths(lengths(batch.reranker_inputs["attention_mask"]), lengths(batch.encoder_attention_mask),
                       lengths(batch.attention_mask), batch.encoder_attention_mask.shape[1],
                       int((batch.labels != -100).sum()))


def step_flops(gen: Any, rr: Any, batch: Any, useful: bool) -> dict[str, float]:
    """Analytic FLOPs of one step (CEPE, or a decoder-only LLM for any other generator config)
    for one micro-batch's tensors (see :data:`FLOP_FORMULA`)."""
    flops = cepe_step_flops if isinstance(gen, CepeConfig) else decoder_only_step_flops
    return flops(gen, rr, batch_lengths(batch, useful))


# ---------------------------------------------------------------------------------------- ZeRO-3 trace


@dataclass(frozen=True)
class ModuleUse:
    """One call of a module that owns parameters, in the order the step makes it."""

    module: str
    params: tuple[tuple[str, int], ...]  # (name, numel) of the module's own parameters
    backward: bool  # its output requires grad, so ZeRO-3 gathers it again for backward


def _own_params(model: torch.nn.Module, prefix: str) -> tuple[tuple[str, int], ...]:
    module = model.get_submodule(prefix)
    return tuple((f"{prefix}.{name}", p.numel()) for name, p in module.named_parameters(recurse=False))


def cepe_module_trace(model: torch.nn.Module) -> list[ModuleUse]:
    """The forward order in which one G-Rerank micro-step calls the CEPE modules that own
    parameters, and which of them run again in backward.

    The encoder runs without grad; the decoder's hidden states need grad from the first
    cross-attention's output projection on (the log-mask enters there), so every module after
    it, and that ``o_proj``, is gathered again for backward; cross-attention K/V projections read
    the encoder's states and never need grad. Reading only the module structure (no run), this
    is the trace DeepSpeed records.
    """
    config = model.config
    uses: list[ModuleUse] = []

    def call(name: str, backward: bool) -> None:
        uses.append(ModuleUse(name, _own_params(model, name), backward))

    def llama_layer(prefix: str, grad: bool) -> None:
        call(f"{prefix}.input_layernorm", grad)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            call(f"{prefix}.self_attn.{proj}", grad)

    def mlp(prefix: str, grad: bool) -> None:
        call(f"{prefix}.post_attention_layernorm", grad)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            call(f"{prefix}.mlp.{proj}", grad)

    call("encoder.embed_tokens", False)
    for i in range(config.encoder_llama_config().num_hidden_layers):
        llama_layer(f"encoder.layers.{i}", False)
        mlp(f"encoder.layers.{i}", False)
    call("encoder.norm", False)
    call("model.embed_tokens", False)
    grad = False
    for i, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{i}"
        llama_layer(prefix, grad)
        if layer.cross_attn is not None:
            call(f"{prefix}.cross_attn.k_proj", False)
            call(f"{prefix}.cross_attn.v_proj", False)
            call(f"{prefix}.cross_attn.layernorm", grad)
            call(f"{prefix}.cross_attn.q_proj", grad)
            grad = True
            call(f"{prefix}.cross_attn.o_proj", grad)
        mlp(prefix, grad)
    call("model.norm", grad)
    call("lm_head", grad)
    return uses


def decoder_only_module_trace(model: torch.nn.Module, grad_from_layer: int = 0) -> list[ModuleUse]:
    """A decoder-only LLM in parallel-context mode, one micro-step: the documents' pre-fill
    (no grad) through every layer, then the prompt+answer rows, whose attention reads the
    log-mask in every layer from ``grad_from_layer`` on (gathered again in backward)."""
    uses: list[ModuleUse] = []
    n_layers = model.config.num_hidden_layers
    for rows_pass in (False, True):
        uses.append(ModuleUse("model.embed_tokens", _own_params(model, "model.embed_tokens"), False))
        for i in range(n_layers):
            prefix = f"model.layers.{i}"
            attn_grad = rows_pass and i >= grad_from_layer
            for name, grad in [("input_layernorm", rows_pass and i > grad_from_layer),
                               *[(f"self_attn.{p}", rows_pass and i > grad_from_layer) for p in ("q_proj", "k_proj", "v_proj")],
                               ("self_attn.o_proj", attn_grad), ("post_attention_layernorm", attn_grad),
                               *[(f"mlp.{p}", attn_grad) for p in ("gate_proj", "up_proj", "down_proj")]]:
                uses.append(ModuleUse(f"{prefix}.{name}", _own_params(model, f"{prefix}.{name}"), grad))
        if rows_pass:
            uses.append(ModuleUse("model.norm", _own_params(model, "model.norm"), True))
            uses.append(ModuleUse("lm_head", _own_params(model, "lm_head"), True))
    return uses


@dataclass(frozen=True)
class ZeroSettings:
    """The values of a generator DeepSpeed config that decide its parameter traffic."""

    stage: int
    world_size: int
    dtype_bytes: int
    persistence_threshold: int = 100_000  # DeepSpeed's defaults
    max_reuse_distance: int = 1_000_000_000
    prefetch_bucket: int = 50_000_000
    max_live_parameters: int = 1_000_000_000
    hpz_partition_size: int = 1

    @classmethod
    def from_ds_config(cls, tree: dict[str, Any], world_size: int, dtype_bytes: int) -> "ZeroSettings":
        zero = tree.get("zero_optimization", {})
        return cls(
            stage=int(zero.get("stage", 0)), world_size=world_size, dtype_bytes=dtype_bytes,
            persistence_threshold=int(zero.get("stage3_param_persistence_threshold", cls.persistence_threshold)),
            max_reuse_distance=int(zero.get("stage3_max_reuse_distance", cls.max_reuse_distance)),
            prefetch_bucket=int(zero.get("stage3_prefetch_bucket_size", cls.prefetch_bucket)),
            max_live_parameters=int(zero.get("stage3_max_live_parameters", cls.max_live_parameters)),
            hpz_partition_size=int(zero.get("zero_hpz_partition_size", 1)),
        )

    def padded(self, numel: int) -> int:
        """Elements of one gathered buffer: DeepSpeed pads each partition to ceil(numel / world)."""
        return math.ceil(numel / self.world_size) * self.world_size

    def persistent(self, numel: int) -> bool:
        return numel <= self.persistence_threshold


@dataclass
class GatherSchedule:
    """Predicted all-gathers of one steady-state micro-step (bytes are the gathered buffers'
    sizes on each rank; a ring all-gather moves (world-1)/world of them over each rank's link)."""

    forward_bytes: int = 0
    backward_bytes: int = 0
    forward_gathers: int = 0
    backward_gathers: int = 0
    peak_gathered_bytes: int = 0  # most non-persistent parameter bytes resident at once
    per_param: dict[str, int] = field(default_factory=dict)  # gathers per step by parameter

    @property
    def total_bytes(self) -> int:
        return self.forward_bytes + self.backward_bytes


def step_trace(uses: Sequence[ModuleUse]) -> list[tuple[ModuleUse, bool]]:
    """(module, is_backward) in execution order: the forward, then the backward in reverse."""
    return [(u, False) for u in uses] + [(u, True) for u in reversed(uses) if u.backward]


def gather_schedule(uses: Sequence[ModuleUse], zero: ZeroSettings) -> GatherSchedule:
    """All-gathers of one steady-state micro-step under ZeRO-3 (see the module docstring).

    A parameter stays resident between two uses when the parameter elements of the modules
    traced after the first use, up to the second, total less than the reuse distance, or less
    than the prefetch bucket (the prefetcher walks the trace ahead by about one bucket and keeps
    what it finds resident). Stage 0: nothing is gathered.
    """
    schedule = GatherSchedule()
    if zero.stage != 3:
        return schedule
    trace = step_trace(uses)
    numels = [sum(n for _, n in use.params) for use, _ in trace]
    positions: dict[str, list[int]] = {}
    sizes: dict[str, int] = {}
    for i, (use, _) in enumerate(trace):
        for name, numel in use.params:
            if not zero.persistent(numel):
                positions.setdefault(name, []).append(i)
                sizes[name] = numel
    horizon = max(zero.max_reuse_distance, zero.prefetch_bucket)
    resident_delta = [0] * (len(trace) + 1)
    for name, where in positions.items():
        gathers, start = 0, where[0]
        for k, i in enumerate(where):
            if k == 0 or sum(numels[where[k - 1] + 1 : i]) >= horizon:
                gathers += 1
                nbytes = zero.padded(sizes[name]) * zero.dtype_bytes
                if trace[i][1]:
                    schedule.backward_bytes += nbytes
                    schedule.backward_gathers += 1
                else:
                    schedule.forward_bytes += nbytes
                    schedule.forward_gathers += 1
                if k:
                    resident_delta[start] += nbytes
                    resident_delta[where[k - 1] + 1] -= nbytes
                start = i
        nbytes = zero.padded(sizes[name]) * zero.dtype_bytes
        resident_delta[start] += nbytes
        resident_delta[where[-1] + 1] -= nbytes
        schedule.per_param[name] = gathers
    live = 0
    for delta in resident_delta:
        live += delta
        schedule.peak_gathered_bytes = max(schedule.peak_gathered_bytes, live)
    return schedule


# ---------------------------------------------------------------------------------------- memory

GB = 1024**3
BF16, FP32 = 2, 4
# Llama-3.1-8B-Instruct's shapes (config.json of the public release).
LLAMA_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False)


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _activation_rows(
    per_layer: list[tuple[str, float, str]], layers: int, checkpointing: bool, prefix: str
) -> list[tuple[str, float, str]]:
    """A stack's per-layer activations: with checkpointing, one layer recomputed in backward;
    without, every layer keeps them until its backward."""
    if checkpointing:
        return [(f"{prefix} recompute: {what}", size, how) for what, size, how in per_layer]
    return [(f"{prefix}, every layer: {what}", layers * size, f"{layers} layers x {how}")
            for what, size, how in per_layer]


def cepe_rows(config, B: int, n: int, L: int, S: int, checkpointing: bool = True) -> list[tuple[str, float, str]]:
    """CEPE: a small encoder reads the documents; the decoder cross-attends to its states."""
    h, he, ff, layers = config.hidden_size, config.encoder_config["hidden_size"], config.intermediate_size, config.num_hidden_layers
    heads, keys = config.num_attention_heads, n * L
    rows = [
        ("encoder states kept for the step", B * keys * he * BF16 / GB, "B*n*L*H_enc, bf16"),
        ("encoder layer working set (no autograd)", B * keys * (3 * he + config.encoder_config["intermediate_size"]) * BF16 / GB,
         "one layer's q,k,v and MLP activations at a time"),
    ]
    if checkpointing:
        rows.append(("decoder checkpoints (layer inputs)", layers * B * S * h * BF16 / GB, f"{layers} layers x B*S*H, bf16"))
    return rows + _activation_rows([
        ("cross K/V", 2 * B * keys * h * BF16 / GB, "K and V over n*L keys, bf16"),
        ("cross-attention probabilities", B * heads * S * keys * FP32 / GB, "fp32 softmax, B*heads*S*n*L"),
        ("self-attention + MLP", B * S * (4 * h + 3 * ff) * BF16 / GB, "B*S*(4H + 3 FFN), bf16"),
    ], layers, checkpointing, "decoder")


def decoder_only_rows(config, B: int, n: int, L: int, S: int, checkpointing: bool = True) -> list[tuple[str, float, str]]:
    """A decoder-only LLM in parallel-context mode: each document is pre-filled on its own (same
    positions, no autograd: a document's states do not depend on the mask), its K/V kept for every
    layer; the prompt+answer tokens then attend to all documents' K/V plus the per-document
    log-mask bias, with gradient checkpointing over the S query tokens only."""
    h, ff, layers, heads = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.num_attention_heads
    kv = config.num_key_value_heads * (getattr(config, "head_dim", None) or h // heads)
    keys = n * L
    rows = [
        ("document K/V cache, all layers (no autograd)", layers * 2 * B * keys * kv * BF16 / GB,
         f"{layers} layers x K,V x B*n*L x {kv} (GQA), bf16"),
        ("document pre-fill working set (no autograd)", B * keys * (3 * h + 2 * ff) * BF16 / GB,
         "one layer's q,k,v and MLP over B*n*L tokens (SDPA/flash: no L x L matrix)"),
    ]
    if checkpointing:
        rows.append(("query checkpoints (layer inputs)", layers * B * S * h * BF16 / GB, f"{layers} layers x B*S*H, bf16"))
    rows += _activation_rows([
        ("attention probabilities", B * heads * S * (keys + S) * FP32 / GB, "fp32 softmax, B*heads*S*(n*L+S)"),
        ("q,k,v + MLP", B * S * (4 * h + 3 * ff) * BF16 / GB, "B*S*(4H + 3 FFN), bf16"),
    ], layers, checkpointing, "query")
    rows.append(("logits of the answer positions (fp32)", B * S * config.vocab_size * FP32 / GB, "B*S*vocab, fp32 log-softmax"))
    return rows


def step_memory_rows(
    generator: torch.nn.Module, reranker: torch.nn.Module, *, B: int, n: int, L: int, S: int, rr_len: int,
    world_size: int, generator_stage: int = 3, max_live_params: float = 1e9, generator_checkpointing: bool = True,
    rr_checkpointing: bool = True,
) -> list[tuple[str, float, str]]:
    """Per-GPU memory of one G-Rerank micro-step, (item, GiB, how) rows counted from shapes.

    ``generator``: a CEPE model or a causal LM (its ``model.layers``), ``reranker`` a BERT-style
    cross-encoder, real or on the meta device (only their shapes are read; under ZeRO-3 build
    them unpartitioned). Allocator fragmentation, NCCL buffers and the CUDA context come on top.
    """
    p_gen, p_rr = count_params(generator), count_params(reranker)
    config = generator.config
    shards = world_size if generator_stage == 3 else 1
    rows: list[tuple[str, float, str]] = [("generator parameters (bf16)", p_gen * BF16 / shards / GB,
                                           f"{p_gen / 1e9:.2f} B params / {shards} shard(s)")]
    if generator_stage == 3:
        layer_params = count_params(generator.model.layers[0])
        live = max(max_live_params, 2 * layer_params)
        rows.append(("ZeRO-3 gathered working set (bf16)", live * BF16 / GB,
                     f"max(stage3_max_live_parameters, 2 decoder layers of {layer_params / 1e6:.0f} M)"))
    family_rows = cepe_rows if isinstance(config, CepeConfig) else decoder_only_rows
    rows += family_rows(config, B, n, L, S, generator_checkpointing)
    rows.append(("reranker parameters + gradients (fp32)", 2 * p_rr * FP32 / GB, f"{p_rr / 1e6:.0f} M params"))
    rows.append(("reranker AdamW states, ZeRO-1 shard", 3 * p_rr * FP32 / world_size / GB,
                 "fp32 moments and master copy split over ranks"))
    rr = reranker.config
    pairs_tokens = B * n * rr_len
    per_layer = pairs_tokens * (34 * rr.hidden_size + 5 * rr.num_attention_heads * rr_len) * FP32 / 2  # Korthikanti et al. count, fp32
    if rr_checkpointing:
        rows.append(("reranker activations (checkpointed)",
                     (rr.num_hidden_layers * pairs_tokens * rr.hidden_size * FP32 + per_layer) / GB,
                     "layer inputs + one layer recomputed, fp32"))
    else:
        rows.append(("reranker activations (no checkpointing)", rr.num_hidden_layers * per_layer / GB,
                     "every layer's saved tensors, fp32"))
    return rows


def generator_resident_bytes(named_numels: Iterable[tuple[str, int]], zero: ZeroSettings) -> int:
    """Generator parameter bytes each rank holds between steps: stage 0 the whole model; ZeRO-3
    each parameter's padded partition, plus the full copy of the persistent ones, plus (hpZ) the
    secondary partition over the hpZ group."""
    total = 0
    for _, numel in named_numels:
        if zero.stage != 3:
            total += numel
            continue
        total += math.ceil(numel / zero.world_size)
        if zero.persistent(numel):
            total += numel
        elif zero.hpz_partition_size > 1:
            total += math.ceil(numel / zero.hpz_partition_size)
    return total * zero.dtype_bytes


def reranker_state_bytes(numel: int, world_size: int, stage: int, param_bytes: int = 4) -> int:
    """The trained reranker between steps under DeepSpeed ZeRO 0/1/2 with a torch AdamW: its
    parameters, plus (stage 1/2) the optimizer's fp32 copy of this rank's partition, plus the
    two AdamW moments of what this rank updates (its partition; the whole model at stage 0)."""
    shard = math.ceil(numel / world_size) if stage in (1, 2) else numel
    fp32_copy = shard * 4 if stage in (1, 2) else 0
    return numel * param_bytes + fp32_copy + 2 * shard * 4


def reranker_param_gather_bytes(numel: int, world_size: int, param_bytes: int = 4) -> int:
    """ZeRO-1/2 all-gathers the updated parameters after each step, flattened and padded to a
    multiple of 2 x world elements (DeepSpeed's NCCL start alignment of 2 per rank)."""
    return math.ceil(numel / (2 * world_size)) * 2 * world_size * param_bytes


def reduce_bucket_bytes(rr_ds_config: dict[str, Any], grad_bytes: int = 4) -> int:
    """ZeRO-1/2 stages gradients in a buffer of ``reduce_bucket_size`` elements (two with
    ``overlap_comm``), allocated whole each micro-step however small the model (DeepSpeed
    0.19's ``setup_buckets``; default 5e8 elements)."""
    zero = rr_ds_config.get("zero_optimization", {})
    if zero.get("stage", 0) not in (1, 2) or not zero.get("contiguous_gradients", True):
        return 0
    buffers = 2 if zero.get("overlap_comm", zero.get("stage") == 3) else 1
    return buffers * int(zero.get("reduce_bucket_size", 500_000_000)) * grad_bytes


def bert_activation_bytes(rr: Any, pair_lengths: Sequence[int], act_bytes: int = 4) -> int:
    """Activations a BERT-style reranker keeps for backward in training mode (dropout on):
    per layer and token 34*h + 5*a*s bytes at 2 bytes an element (Korthikanti et al. 2022,
    'Reducing Activation Recomputation'), rescaled to ``act_bytes``; plus the embeddings' output."""
    h, a = rr.hidden_size, rr.num_attention_heads
    per_layer = sum(s * (34 * h + 5 * a * s) for s in pair_lengths) * act_bytes / 2
    return int(rr.num_hidden_layers * per_layer + sum(pair_lengths) * h * act_bytes)


# ---------------------------------------------------------------------------------------- peaks

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, by a substring of
# torch.cuda.get_device_name(): the first match wins, so the specific names come first
# (an H100 SXM reports "NVIDIA H100 80GB HBM3"; a GH200 matches "H200" at the same peak).
DENSE_BF16_PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200 NVL", 835e12), ("H200", 989e12), ("H100", 989e12),
    ("A100", 312e12), ("L40S", 362e12),
)


def dense_bf16_peak(device_name: str) -> float | None:
    """The datasheet's dense bf16 FLOP/s of a GPU named ``device_name``, or None if not listed."""
    return next((peak for key, peak in DENSE_BF16_PEAK_FLOPS if key in device_name), None)


# ---------------------------------------------------------------------------------------- projection


@dataclass(frozen=True)
class Cluster:
    """Assumed GPU cluster (every number an assumption, printed with the projection): H100 SXM
    dense bf16 peak, a model FLOP utilisation, NVLink per direction per GPU inside a node, one
    400 Gb/s InfiniBand NIC per GPU between nodes."""

    nodes: int
    gpus_per_node: int = 8
    peak_flops: float = 989e12
    mfu: float = 0.45
    nvlink_bytes_per_s: float = 450e9
    ib_bytes_per_s: float = 50e9

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


def all_gather_seconds(nbytes: float, group: int, cluster: Cluster, within_node: bool) -> float:
    """A ring all-gather of an ``nbytes`` buffer over ``group`` ranks: each rank receives
    (group - 1) / group of it over its slowest link (NVLink inside a node, else InfiniBand)."""
    if group <= 1:
        return 0.0
    bandwidth = cluster.nvlink_bytes_per_s if within_node else cluster.ib_bytes_per_s
    return (group - 1) / group * nbytes / bandwidth


def compute_seconds(flops: float, cluster: Cluster) -> float:
    return flops / (cluster.peak_flops * cluster.mfu)
