"""FiD generator: one candidate against T5ForConditionalGeneration, the log-mask's exactness and
gradient, batched masks, both checkpoint layouts, the attention-mass signal, training by config."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import T5ForConditionalGeneration
from transformers.models.t5.modeling_t5 import T5LayerNorm

from grerank_dist.config import DataConfig, load_config
from grerank_dist.data.collate import Collator
from grerank_dist.interface import ParallelContextGenerator
from grerank_dist.models import load_generator
from grerank_dist.models.fid import (
    FID_FORMAT,
    FidForConditionalGeneration,
    check_fid_weights,
    load_fid,
    random_tiny_fid,
    tiny_fid_config,
)
from grerank_dist.models.tokenization import build_word_tokenizer, split_words

NEG_INF = float("-inf")
VOCAB = 40
ATOL = 1e-5


def build(dtype: torch.dtype = torch.float32, seed: int = 0) -> FidForConditionalGeneration:
    """A tiny FiD whose pad/start embedding is shrunk: with tied embeddings a random T5 would
    otherwise keep predicting its start token, and greedy answers would not vary."""
    torch.manual_seed(seed)
    model = FidForConditionalGeneration(tiny_fid_config(vocab_size=VOCAB)).to(dtype).eval()
    with torch.no_grad():
        model.shared.weight[0].mul_(0.05)
    return model


@pytest.fixture(scope="module")
def model() -> FidForConditionalGeneration:
    return build()


@pytest.fixture(scope="module")
def model64() -> FidForConditionalGeneration:
    return build(torch.float64)


def docs(batch: int, n: int, length: int = 7, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, n, L] encoder inputs, some left-padded, as the Collator pads them."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, n, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[:, ::2, :2] = 0
    return ids.masked_fill(mask == 0, 0), mask


def answers(batch: int, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded answers (the decoder input without start token) and their labels."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, 4), generator=gen)
    ids[:, -1] = 1  # EOS
    mask = torch.ones_like(ids)
    mask[0, 2:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask, ids.masked_fill(mask == 0, -100)


def reference(model: FidForConditionalGeneration) -> T5ForConditionalGeneration:
    ref = T5ForConditionalGeneration(model.config).to(model.dtype).eval()
    ref.load_state_dict(model.state_dict())
    return ref


def test_implements_the_generator_protocol(model):
    assert isinstance(model, ParallelContextGenerator)
    assert FID_FORMAT.doc_template.format(question="q", title="t", text="x") == "question: q title: t context: x"


def test_one_candidate_equals_t5_for_conditional_generation(model):
    """With one candidate, answer log-likelihood and greedy generation (cached and uncached) are
    those of transformers' own T5 run on that candidate's encoder input."""
    enc, enc_mask = docs(3, 1)
    ids, mask, labels = answers(3)
    ref = reference(model)
    contexts = model.encode_contexts(enc, enc_mask)
    got = model.answer_logprobs(contexts, ids, mask, labels, None)
    with torch.no_grad():
        logits = ref(input_ids=enc[:, 0], attention_mask=enc_mask[:, 0], labels=labels).logits
    expected = torch.log_softmax(logits, -1).gather(-1, labels.clamp_min(0)[..., None])[..., 0] * (labels != -100)
    torch.testing.assert_close(got.token_logprobs, expected, atol=ATOL, rtol=0)
    assert torch.equal(got.token_mask, labels != -100)

    empty_prompt = torch.zeros(3, 1, dtype=torch.long)  # the Collator's prompt_ids for FiD's empty prompt
    for use_cache in (True, False):
        out = model.generate(contexts, empty_prompt, torch.zeros_like(empty_prompt), None, 6, use_cache=use_cache)
        with torch.no_grad():
            want = ref.generate(input_ids=enc[:, 0], attention_mask=enc_mask[:, 0], max_new_tokens=6, do_sample=False,
                                num_beams=1)
        assert torch.equal(out, want[:, 1:]), (out, want)  # both pad after EOS
    assert len(set(out.flatten().tolist())) > 2  # the check is not passed by a constant answer


def test_hard_mask_equals_removing_candidates_and_constant_masks_change_nothing(model):
    enc, enc_mask = docs(2, 4)
    ids, mask, labels = answers(2)
    contexts = model.encode_contexts(enc, enc_mask)
    keep = torch.tensor([[True, False, True, False], [False, True, True, True]])
    log_mask = torch.zeros(2, 4).masked_fill(~keep, NEG_INF)
    masked = model.answer_logprobs(contexts, ids, mask, labels, log_mask).token_logprobs
    masked_gen = model.generate(contexts, ids[:, :0], mask[:, :0], log_mask, 5)
    for b in range(2):
        sub = model.encode_contexts(enc[b : b + 1, keep[b]], enc_mask[b : b + 1, keep[b]])
        alone = model.answer_logprobs(sub, ids[b : b + 1], mask[b : b + 1], labels[b : b + 1], None).token_logprobs
        torch.testing.assert_close(masked[b : b + 1], alone, atol=ATOL, rtol=0)
        assert torch.equal(masked_gen[b : b + 1], model.generate(sub, ids[:1, :0], mask[:1, :0], None, 5))
    plain = model.answer_logprobs(contexts, ids, mask, labels, None).token_logprobs
    for constant in (0.0, -3.7):
        shifted = model.answer_logprobs(contexts, ids, mask, labels, torch.full((2, 4), constant)).token_logprobs
        torch.testing.assert_close(shifted, plain, atol=ATOL, rtol=0)


def test_log_mask_gradient_matches_finite_differences_and_reaches_no_parameter(model64, monkeypatch):
    """fp64 finite differences. T5LayerNorm computes its variance in fp32 even for fp64 inputs,
    which rounds the loss far above a finite-difference step; here it runs the same formula in
    the input's dtype."""

    def layer_norm_in_input_dtype(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    monkeypatch.setattr(T5LayerNorm, "forward", layer_norm_in_input_dtype)
    enc, enc_mask = docs(2, 3)
    ids, mask, labels = answers(2)
    contexts = model64.encode_contexts(enc, enc_mask)
    log_mask = torch.tensor([[0.0, -0.7, -1.9], [-0.3, 0.0, -2.5]], dtype=torch.float64, requires_grad=True)

    def loss(m: torch.Tensor) -> torch.Tensor:
        return model64.answer_logprobs(contexts, ids, mask, labels, m).token_mean_nll()

    assert torch.autograd.gradcheck(loss, (log_mask,), eps=1e-6, atol=1e-7)
    model64.activation_checkpointing_enable()
    try:
        checkpointed = log_mask.detach().clone().requires_grad_(True)
        loss(checkpointed).backward()
    finally:
        model64.activation_checkpointing_disable()
    plain = log_mask.detach().clone().requires_grad_(True)
    loss(plain).backward()
    torch.testing.assert_close(checkpointed.grad, plain.grad, atol=1e-12, rtol=0)
    assert all(p.grad is None and not p.requires_grad for p in model64.parameters())


def test_m_masks_batched_equal_one_by_one(model):
    enc, enc_mask = docs(2, 3)
    ids, mask, labels = answers(2)
    contexts = model.encode_contexts(enc, enc_mask)
    masks = torch.tensor([[[0.0, NEG_INF, -1.0], [-0.5, 0.0, 0.0]], [[NEG_INF, 0.0, NEG_INF], [-2.0, -1.0, 0.0]]])
    batched = model.answer_logprobs(contexts, ids, mask, labels, masks)
    generated = model.generate(contexts, ids[:, :0], mask[:, :0], masks, 5)
    mass = model.document_attention_mass(contexts, ids, mask, labels, masks)
    assert batched.token_logprobs.shape == (2, 2, 4) and generated.shape[:2] == (2, 2) and mass.shape == (2, 2, 3)
    for j in range(2):
        one = model.answer_logprobs(contexts, ids, mask, labels, masks[:, j])
        torch.testing.assert_close(batched.token_logprobs[:, j], one.token_logprobs, atol=ATOL, rtol=0)
        single_gen = model.generate(contexts, ids[:, :0], mask[:, :0], masks[:, j], 5)
        assert torch.equal(generated[:, j, : single_gen.shape[1]], single_gen)
        torch.testing.assert_close(mass[:, j], model.document_attention_mass(contexts, ids, mask, labels, masks[:, j]))


def test_m_masks_share_one_projection_of_the_encoder_states(model):
    """Every decoder layer projects the cross-attention keys and values of the B queries once
    ([B, n*L, d] into k and v, not B*m rows) and the m masks of a query read them; answer
    log-probabilities, their mask gradient, attention mass and cached generation equal m
    separate calls."""
    batch, n_masks, n_docs = 2, 5, 3
    enc, enc_mask = docs(batch, n_docs)
    ids, mask, labels = answers(batch)
    contexts = model.encode_contexts(enc, enc_mask)
    masks = -2 * torch.rand(batch, n_masks, n_docs, generator=torch.Generator().manual_seed(3))
    masks[0, 1, :2] = NEG_INF
    masks[1, 3, 1:] = NEG_INF
    masks.requires_grad_(True)
    projected: list[tuple[int, ...]] = []
    hooks = [
        projection.register_forward_hook(lambda module, args, out: projected.append(tuple(args[0].shape)))
        for block in model.decoder.block
        for projection in (block.layer[1].EncDecAttention.k, block.layer[1].EncDecAttention.v)
    ]
    try:
        batched = model.answer_logprobs(contexts, ids, mask, labels, masks)
        batched.token_logprobs.sum().backward()
        mass = model.document_attention_mass(contexts, ids, mask, labels, masks)
        generated = model.generate(contexts, ids[:, :0], mask[:, :0], masks.detach(), 5)
    finally:
        for hook in hooks:
            hook.remove()
    assert set(projected) == {tuple(contexts.states[0].shape)}, projected
    assert len(projected) == 3 * 2 * len(model.decoder.block)  # generation projects once, then reads its cache
    for j in range(n_masks):
        one_mask = masks.detach()[:, j].clone().requires_grad_(True)
        one = model.answer_logprobs(contexts, ids, mask, labels, one_mask)
        one.token_logprobs.sum().backward()
        torch.testing.assert_close(batched.token_logprobs[:, j], one.token_logprobs, atol=1e-6, rtol=0)
        torch.testing.assert_close(masks.grad[:, j], one_mask.grad, atol=1e-6, rtol=0)
        torch.testing.assert_close(
            mass[:, j], model.document_attention_mass(contexts, ids, mask, labels, one_mask.detach()), atol=1e-6, rtol=0
        )
        single = model.generate(contexts, ids[:, :0], mask[:, :0], one_mask.detach(), 5)
        assert torch.equal(generated[:, j, : single.shape[1]], single)


def test_document_attention_mass_against_eager_attention_probabilities(model):
    """The mass is transformers' own eager T5 cross-attention probabilities (recorded with
    output_attentions), summed per candidate, averaged over heads, layers and answer positions."""
    enc, enc_mask = docs(2, 3)
    ids, mask, labels = answers(2)
    contexts = model.encode_contexts(enc, enc_mask)
    ref = reference(model)
    ref.config._attn_implementation = "eager"
    ref.decoder.config._attn_implementation = "eager"
    decoder_ids = torch.cat([torch.zeros(2, 1, dtype=torch.long), ids[:, :-1]], dim=1)
    with torch.no_grad():
        out = ref.decoder(
            input_ids=decoder_ids, attention_mask=mask, encoder_hidden_states=contexts.states[0],
            encoder_attention_mask=enc_mask.reshape(2, -1), output_attentions=True,
        )
    probs = torch.stack(out.cross_attentions).mean(dim=(0, 2))  # [B, S, n*L] averaged over layers, heads
    per_doc = probs.reshape(2, ids.shape[1], 3, -1).sum(-1)
    is_answer = (labels != -100).float()
    expected = (per_doc * is_answer[..., None]).sum(1) / is_answer.sum(1, keepdim=True)
    got = model.document_attention_mass(contexts, ids, mask, labels, None)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.sum(-1), torch.ones(2))
    removed = model.document_attention_mass(contexts, ids, mask, labels, torch.tensor([[0.0, NEG_INF, 0.0]] * 2))
    assert torch.all(removed[:, 1] == 0)
    weighted = model.document_attention_mass(contexts, ids, mask, labels, None, value_norm=True)
    torch.testing.assert_close(weighted.sum(-1), torch.ones(2))
    assert not torch.allclose(weighted, got)


def word_tokenizer(size: int):
    """A T5-style word-level tokenizer of exactly ``size`` tokens (its 3 special tokens included)."""
    return build_word_tokenizer([" ".join(f"w{i}" for i in range(size - 3))], "seq2seq")


def write_checkpoint(
    model: FidForConditionalGeneration,
    target: Path,
    layout: str,
    fmt: str = "safetensors",
    tokenizer_size: int | None = VOCAB,
) -> Path:
    """``model``'s weights in the plain T5 layout or the public FiD code's (encoder wrappers),
    the way each writes them (FiD: a torch.save'd pytorch_model.bin with all tied copies), with a
    tokenizer of ``tokenizer_size`` tokens (None: no tokenizer files, as the FiD code saves)."""
    target.mkdir(parents=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if layout == "fid":
        renamed = {}
        for key, value in state.items():
            if key.startswith("encoder.block."):
                block, rest = key[len("encoder.block.") :].split(".", 1)
                key = f"encoder.encoder.block.{block}.module.{rest}"
            elif key.startswith("encoder."):
                key = "encoder." + key
            renamed[key] = value
        state = renamed
    else:
        for tied in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"):
            state.pop(tied)
    if fmt == "safetensors":
        save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(state, target / "pytorch_model.bin")
    config = model.config.to_dict()
    (target / "config.json").write_text(json.dumps(config))
    if tokenizer_size is not None:
        word_tokenizer(tokenizer_size).save_pretrained(target)
    return target


def test_both_checkpoint_layouts_load_to_the_same_outputs(model, tmp_path):
    enc, enc_mask = docs(2, 3)
    ids, mask, labels = answers(2)
    log_mask = torch.tensor([[0.0, -1.0, NEG_INF], [-0.2, 0.0, -0.4]])
    plain_dir = write_checkpoint(model, tmp_path / "t5", "t5")
    fid_dir = write_checkpoint(model, tmp_path / "fid", "fid", fmt="bin")
    assert check_fid_weights(plain_dir, model.config) == "t5" and check_fid_weights(fid_dir, model.config) == "fid"
    expected = model.answer_logprobs(model.encode_contexts(enc, enc_mask), ids, mask, labels, log_mask).token_logprobs
    for directory in (plain_dir, fid_dir):
        loaded, tokenizer = load_generator(str(directory))
        assert isinstance(loaded, FidForConditionalGeneration) and tokenizer.bos_token_id is None
        assert not any(p.requires_grad for p in loaded.parameters())
        got = loaded.answer_logprobs(loaded.encode_contexts(enc, enc_mask), ids, mask, labels, log_mask).token_logprobs
        assert torch.equal(got, expected), directory.name


def test_loading_is_strict_and_errors_name_the_key(model, tmp_path):
    directory = write_checkpoint(model, tmp_path / "bad", "fid", fmt="bin")
    state = torch.load(directory / "pytorch_model.bin", weights_only=True)
    missing = dict(state)
    missing.pop("encoder.encoder.block.1.module.layer.0.SelfAttention.q.weight")
    torch.save(missing, directory / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"missing weight\(s\) encoder\.block\.1\.layer\.0\.SelfAttention\.q\.weight"):
        load_fid(directory)
    torch.save({**state, "encoder.encoder.extra.weight": torch.zeros(1)}, directory / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"unexpected weight\(s\) encoder\.extra\.weight"):
        load_fid(directory)
    state["decoder.block.0.layer.2.DenseReluDense.wi.weight"] = torch.zeros(3, 3)
    torch.save(state, directory / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"decoder\.block\.0\.layer\.2\.DenseReluDense\.wi\.weight .* has shape \[3, 3\]"):
        load_fid(directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "model_type": "bart"}))
    with pytest.raises(ValueError, match="not a supported generator"):
        load_generator(str(directory))


def test_a_directory_without_the_matching_tokenizer_is_refused(model, tmp_path):
    """The public FiD code saves no tokenizer; transformers would then hand back a default
    T5Tokenizer of about 100 tokens (every word <unk> for a 32k vocabulary). No tokenizer, or
    one much smaller than the model's vocabulary, is an error naming the directory and the files
    to copy in."""
    bare = write_checkpoint(model, tmp_path / "bare", "fid", fmt="bin", tokenizer_size=None)
    small = write_checkpoint(model, tmp_path / "small", "t5", tokenizer_size=VOCAB // 2)
    too_small = f"tokenizer has {VOCAB // 2} tokens for vocab_size {VOCAB}"
    for directory, problem in ((bare, "holds no tokenizer"), (small, too_small)):
        with pytest.raises(ValueError, match=problem) as raised:
            load_generator(str(directory))
        message = str(raised.value)
        assert message.startswith(f"{directory}:") and "spiece.model" in message and "tokenizer_config.json" in message
    # T5's own tokenizer is 28 tokens short of its vocab_size (32100 of 32128): still accepted
    _, tokenizer = load_generator(str(write_checkpoint(model, tmp_path / "t5", "t5", tokenizer_size=VOCAB - 3)))
    assert len(tokenizer) == VOCAB - 3


def test_fid_reads_its_own_templates_unless_the_data_config_sets_them(tmp_path):
    """Templates left at the data config's defaults (the CEPE layout, no question in the
    documents) give way to FiD's own, so the question reaches FiD's encoder in every document;
    a template the config sets is honoured, with a warning if no template holds the question.
    CEPE and decoder-only generators keep the data config's templates."""
    from toy import toy_records

    records = toy_records(1, 3, seed=4)
    texts = [records[0]["question"], *records[0]["answers"], *(f"{c['title']} {c['text']}" for c in records[0]["ctxs"])]
    fid_model, fid_tokenizer = random_tiny_fid([*texts, FID_FORMAT.doc_template.format(question="", title="", text="")])
    fid_model.save_pretrained(tmp_path / "fid")
    fid_tokenizer.save_pretrained(tmp_path / "fid")
    for path in ("random:tiny-fid", str(tmp_path / "fid")):
        model, tokenizer = load_generator(path, texts, data=DataConfig())
        fmt = model.input_format
        assert (fmt.doc_template, fmt.prompt_template) == ("question: {question} title: {title} context: {text}", "")
        batch = Collator(DataConfig(), tokenizer, None, 0, input_format=model.input_format)(records, [0])
        for ctx, ids, keep in zip(records[0]["ctxs"], batch.encoder_input_ids[0], batch.encoder_attention_mask[0]):
            encoded = split_words(tokenizer.decode(ids[keep.bool()]))
            assert encoded == split_words(f"question: {records[0]['question']} title: {ctx['title']} context: {ctx['text']}")
        explicit = DataConfig(doc_template="{title} {text} {question}")
        assert load_generator(path, texts, data=explicit)[0].input_format.doc_template == explicit.doc_template
        explicit = DataConfig(doc_template="{text}", prompt_template="question: {question}")
        fmt = load_generator(path, texts, data=explicit)[0].input_format
        assert (fmt.doc_template, fmt.prompt_template) == ("{text}", "question: {question}")
        with pytest.warns(UserWarning, match=r"no \{question\}"):
            load_generator(path, texts, data=DataConfig(doc_template="{title} {text}"))
    for path in ("random:tiny", "random:tiny-llama"):
        fmt = load_generator(path, texts, data=DataConfig())[0].input_format
        assert (fmt.doc_template, fmt.prompt_template) == (DataConfig().doc_template, DataConfig().prompt_template)


@pytest.mark.distributed
def test_grerank_train_runs_two_process_zero3_with_fid(tmp_path):
    """`configs/tiny_fid_cpu.yaml` (generator.path random:tiny-fid, FiD's input format), torchrun
    with 2 ranks under ZeRO-3: ranks stay identical, the generator partitioned and unchanged,
    its log-mask gradient that of an unsharded copy."""
    from test_train import ROOT, check, run_cli
    from toy import toy_records, write_jsonl

    config = ROOT / "configs" / "tiny_fid_cpu.yaml"
    assert load_config(config).data.doc_template == FID_FORMAT.doc_template
    data = write_jsonl(tmp_path / "train.jsonl", toy_records(32, 6, seed=3))
    out = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    check(
        run_cli(
            [str(ROOT / "tests" / "dist_worker.py"), str(config), str(out / "worker.json"), f"output_dir={out}",
             f"data.train_file={data}", "train.max_steps=2", "train.save_every=0"],
            launcher=torchrun,
        )
    )
    ranks = [json.loads((out / f"worker.json.rank{r}").read_text()) for r in range(2)]
    assert ranks[0]["reranker_hash"] == ranks[1]["reranker_hash"]
    for rank in ranks:
        assert rank["generator_partitioned"] and not rank["generator_requires_grad"]
        assert rank["generator_max_abs_change"] == 0.0
        assert rank["grad_abs_max"] > 0 and rank["sharded_vs_unsharded_grad_max_diff"] < 1e-6 * max(1.0, rank["grad_abs_max"])


def test_grerank_eval_generator_setting_runs_with_a_fid_checkpoint(tmp_path):
    """`grerank eval --setting generator` with `configs/tiny_fid_cpu.yaml` and a saved tiny FiD:
    the retriever's answers are those FiD gives from the retriever's top-k documents alone
    (a smoke test of the wiring: the random model's answers barely vary; the hard-mask
    equivalence itself is tested above)."""
    from test_train import ROOT, check, run_cli
    from toy import toy_records, write_jsonl

    from grerank_dist.training.train import record_texts

    config_file = ROOT / "configs" / "tiny_fid_cpu.yaml"
    records = toy_records(4, 6, seed=5)
    data = write_jsonl(tmp_path / "test.jsonl", records)
    config = load_config(config_file, [f"generator.path={tmp_path / 'fid'}", "relax.k=2", "generator.max_new_tokens=4"])
    model, tokenizer = random_tiny_fid(record_texts(records, config), seed=1)
    model.save_pretrained(tmp_path / "fid")
    tokenizer.save_pretrained(tmp_path / "fid")
    out = tmp_path / "eval"
    check(run_cli(["-m", "grerank_dist.cli", "eval", "--config", str(config_file), "--setting", "generator",
                   "--data", str(data), "--out", str(out), "--k", "2", f"generator.path={tmp_path / 'fid'}",
                   "relax.k=2", "generator.max_new_tokens=4", "train.micro_batch_size=2"]))
    predictions = sorted((json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()),
                         key=lambda q: q["index"])
    assert len(predictions) == 4
    loaded, tokenizer = load_generator(str(tmp_path / "fid"))
    for record, prediction in zip(records, predictions):
        retriever = prediction["methods"]["retriever"]
        by_id = {str(ctx.get("id", i)): ctx for i, ctx in enumerate(record["ctxs"])}
        kept = [by_id[doc_id] for doc_id in retriever["ranking"][:2]]
        alone = Collator(config.data, tokenizer, None, 0)([{**record, "ctxs": kept}], [0])
        contexts = loaded.encode_contexts(alone.encoder_input_ids, alone.encoder_attention_mask)
        tokens = loaded.generate(contexts, alone.prompt_ids, alone.prompt_attention_mask, None, 4)
        assert retriever["prediction"] == tokenizer.decode(tokens[0], skip_special_tokens=True).strip()
