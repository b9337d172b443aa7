"""Tokenisation and batching: records into the :class:`~grerank_dist.interface.Batch`
the reranker and the generator read, in the generator's :class:`InputFormat`, and the per-rank
micro-batch schedule."""

from __future__ import annotations

from typing import Any

import torch

from grerank_dist.config import DataConfig
from grerank_dist.data.records import training_answer
from grerank_dist.method.metrics import gold_labels
from grerank_dist.interface import Batch, InputFormat


def _pad(rows: list[list[int]], value: int, left: bool, width: int | None = None) -> torch.Tensor:
    width = width or max((len(r) for r in rows), default=1) or 1
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            if left:
                out[i, width - len(row) :] = torch.tensor(row)
            else:
                out[i, : len(row)] = torch.tensor(row)
    return out


class Collator:
    """Tokenises records for the reranker and the generator and pads them into a :class:`Batch`.

    The generator's :class:`InputFormat` (``model.input_format``) decides the templates and
    where BOS goes. Without one, tokenisation follows the public CEPE evaluation: documents as
    ``Document (Title: {title}): {text}`` without BOS (the template may also use ``{question}``,
    as FiD's ``question: {question} title: {title} context: {text}`` does), truncated to
    ``doc_max_tokens`` and left-padded to the batch's longest document; the decoder input is BOS + ``Question: {question}\\nAnswer:`` followed by
    the answer tokens as they continue the prompt (:meth:`_answer_ids`). Reranker pairs are
    (question, passage) truncated like the usual cross-encoders (longest-first to ``max_length``).
    """

    def __init__(
        self,
        data: DataConfig,
        generator_tokenizer: Any,
        reranker_tokenizer: Any | None,
        reranker_max_length: int,
        seed: int = 0,
        input_format: InputFormat | None = None,
    ) -> None:
        """``reranker_tokenizer`` None: batches for the generator alone (evaluation), with empty
        ``reranker_inputs``. ``input_format`` None: CEPE's (the data config's templates, BOS
        before the prompt)."""
        self.data = data
        self.format = input_format or InputFormat(
            data.doc_template, data.prompt_template, prompt_bos=True, docs_pad_to_batch=True
        )
        self.gen_tok = generator_tokenizer
        self.rr_tok = reranker_tokenizer
        self.rr_max_length = reranker_max_length
        self.seed = seed
        self.gen_pad = _pad_id(generator_tokenizer)

    def _gen_ids(self, texts: list[str], max_length: int | None = None) -> list[list[int]]:
        if not texts:
            return []
        kwargs = {"truncation": True, "max_length": max_length} if max_length else {}
        return self.gen_tok(texts, add_special_tokens=False, **kwargs)["input_ids"]

    def _answer_ids(self, prompts: list[str], prompt_ids: list[list[int]], answers: list[list[str]]) -> list[list[list[int]]]:
        """Every answer's tokens as they continue its prompt: the tokens of the joint text
        (:func:`_prompt_then_answer`) after the prompt's own. A byte-level BPE (Llama-3, Qwen2,
        SmolLM2) writes the space before a word into the word's token, so "Paris" alone would be an
        unnatural continuation of "Answer:" where " Paris" is the natural one; SentencePiece gives
        the same word-initial pieces either way. Where the prompt's tokens are not a prefix of the
        joint ones (the tokenizer merges across the join, e.g. a prompt ending in a space before a
        byte-level word), the model still reads the prompt's own tokens (generation starts from
        them), so the answer is tokenised alone after them and the row still spells prompt + answer."""
        joint_ids = iter(self._gen_ids([_prompt_then_answer(p, a) for p, alts in zip(prompts, answers) for a in alts]))
        rows = []
        for prompt, alts in zip(prompt_ids, answers):
            row = []
            for answer in alts:
                joint = next(joint_ids)
                row.append(joint[len(prompt) :] if joint[: len(prompt)] == prompt else self._gen_ids([answer])[0])
            rows.append(row)
        return rows

    def encode(self, records: list[dict[str, Any]]) -> dict[str, list[Any]]:
        """Everything of a batch that does not depend on the epoch, per record, unpadded: the
        token ids (every gold answer's: which one trains depends on the epoch), the candidate
        mask, the gold labels and the retriever's scores. :mod:`grerank_dist.data.dataset` stores it."""
        d, n = self.data, self.data.n_candidates
        features: dict[str, list[Any]] = {}
        if self.rr_tok is not None:
            pairs = self.rr_tok(*_reranker_texts(records, d), truncation=True, max_length=self.rr_max_length)
            for key, rows in pairs.items():
                if key != "attention_mask":  # all ones before padding
                    features[f"rr_{key}"] = [rows[b * n : (b + 1) * n] for b in range(len(records))]
        docs = [
            self.format.doc_template.format(title=ctx["title"], text=ctx["text"], question=r["question"])
            for r in records
            for ctx in _padded_ctxs([r], n)
        ]
        doc_ids = self._gen_ids(docs, d.doc_max_tokens)
        features["doc_ids"] = [doc_ids[b * n : (b + 1) * n] for b in range(len(records))]
        prompts = [self.format.prompt_template.format(question=r["question"]) for r in records]
        features["prompt_ids"] = self._gen_ids(prompts)
        features["answer_ids"] = self._answer_ids(prompts, features["prompt_ids"], [r["answers"] for r in records])
        features["valid"] = candidate_mask(records, n).tolist()
        features["relevant"] = relevance_mask(records, n).tolist()
        features["retriever_scores"] = retriever_score_matrix(records, n).tolist()
        return features

    def pad(self, features: dict[str, list[Any]], answer_index: list[int], record_ids: list[int]) -> Batch:
        """A :class:`Batch` from :meth:`encode`'s features of B records, training on answer
        ``answer_index[b]`` of record b."""
        d, n = self.data, self.data.n_candidates
        bsz = len(answer_index)
        rr = {}
        if self.rr_tok is not None:
            pairs = [pair for rows in features["rr_input_ids"] for pair in rows]
            left = self.rr_tok.padding_side == "left"
            rr["input_ids"] = _pad(pairs, self.rr_tok.pad_token_id, left)
            if "rr_token_type_ids" in features:
                types = [pair for rows in features["rr_token_type_ids"] for pair in rows]
                rr["token_type_ids"] = _pad(types, self.rr_tok.pad_token_type_id, left)
            rr["attention_mask"] = _pad([[1] * len(pair) for pair in pairs], 0, left)
        # A padded (invalid) candidate still gets one real token so the encoder never sees an
        # empty document; its log-mask is -inf, so the generator never attends to it.
        filler = self.gen_tok.eos_token_id if self.gen_tok.eos_token_id is not None else self.gen_pad
        doc_ids = [ids if ids else [filler] for rows in features["doc_ids"] for ids in rows]
        # CEPE's encoder gives every document position ids 0..L-1 whatever its padding (as the
        # release does), but RoPE scores depend only on position differences and padding keys are
        # masked: the batch's longest width gives the same outputs up to rounding
        # (tests/test_perf.py). Decoder-only documents keep doc_max_tokens (absolute positions).
        width = max(len(ids) for ids in doc_ids) if self.format.docs_pad_to_batch else d.doc_max_tokens
        enc = _pad(doc_ids, self.gen_pad, left=True, width=width)
        enc_mask = _pad([[1] * len(ids) for ids in doc_ids], 0, left=True, width=width)

        bos = [self.gen_tok.bos_token_id] if self.format.prompt_bos and self.gen_tok.bos_token_id is not None else []
        answers = [ids[i] for ids, i in zip(features["answer_ids"], answer_index)]
        eos = [self.gen_tok.eos_token_id] if d.answer_eos else []
        prompt_rows = [bos + p for p in features["prompt_ids"]]
        full_rows = [p + a + eos for p, a in zip(prompt_rows, answers)]
        label_rows = [[-100] * len(p) + a + eos for p, a in zip(prompt_rows, answers)]
        return Batch(
            reranker_inputs=rr,
            valid=torch.tensor(features["valid"], dtype=torch.bool).view(bsz, n),
            relevant=torch.tensor(features["relevant"], dtype=torch.bool).view(bsz, n),
            retriever_scores=torch.tensor(features["retriever_scores"], dtype=torch.float32).view(bsz, n),
            encoder_input_ids=enc.view(bsz, n, -1),
            encoder_attention_mask=enc_mask.view(bsz, n, -1),
            input_ids=_pad(full_rows, self.gen_pad, left=False),
            attention_mask=_pad([[1] * len(r) for r in full_rows], 0, left=False),
            labels=_pad(label_rows, -100, left=False),
            prompt_ids=_pad(prompt_rows, self.gen_pad, left=True),
            prompt_attention_mask=_pad([[1] * len(r) for r in prompt_rows], 0, left=True),
            record_ids=list(record_ids),
        )

    def answer_index(self, record: dict[str, Any], epoch: int) -> int:
        """Which of the record's answers trains in ``epoch`` (:func:`training_answer`)."""
        return record["answers"].index(training_answer(record, self.data.answer_choice, self.seed, epoch))

    def __call__(self, records: list[dict[str, Any]], record_ids: list[int], epoch: int = 0) -> Batch:
        return self.pad(self.encode(records), [self.answer_index(r, epoch) for r in records], record_ids)


def _prompt_then_answer(prompt: str, answer: str) -> str:
    """The text the model reads for prompt + answer: one space between them unless the prompt is
    empty (FiD's decoder) or whitespace already sits at the join (a chat template's assistant turn
    ends in a newline): "Answer:" + "Paris" -> "Answer: Paris"."""
    space = bool(prompt) and not prompt[-1].isspace() and not answer[:1].isspace()
    return prompt + (" " if space else "") + answer


def _padded_ctxs(records: list[dict[str, Any]], n: int) -> list[dict[str, str]]:
    """The first n candidates of each record, padded with empty ones, flattened to B*n."""
    empty = {"title": "", "text": ""}
    return [ctx for r in records for ctx in (r["ctxs"][:n] + [empty] * max(0, n - len(r["ctxs"])))]


def _reranker_texts(records: list[dict[str, Any]], data: DataConfig) -> tuple[list[str], list[str]]:
    """The (question, passage) pairs of every candidate, padding included, flattened to B*n."""
    n = data.n_candidates
    passages = [data.passage_template.format(title=c["title"], text=c["text"]) for c in _padded_ctxs(records, n)]
    return [r["question"] for r in records for _ in range(n)], passages


def reranker_pairs(
    records: list[dict[str, Any]], tokenizer: Any, data: DataConfig, max_length: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Cross-encoder inputs for every (question, passage) pair, flattened to [B*n, Lr], and the
    [B, n] mask of real candidates. Pairs are truncated longest-first to ``max_length``, as the
    usual cross-encoder tools do."""
    questions, passages = _reranker_texts(records, data)
    inputs = tokenizer(questions, passages, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    return dict(inputs), candidate_mask(records, data.n_candidates)


def candidate_mask(records: list[dict[str, Any]], n: int) -> torch.Tensor:
    """[B, n] True for each record's real candidates, False for padding."""
    valid = torch.zeros(len(records), n, dtype=torch.bool)
    for b, record in enumerate(records):
        valid[b, : min(n, len(record["ctxs"]))] = True
    return valid


def relevance_mask(records: list[dict[str, Any]], n: int) -> torch.Tensor:
    """[B, n] True for each record's gold candidates (supporting documents for multi-hop
    records, answer-bearing ones otherwise), the labels the retrieval metrics use."""
    relevant = torch.zeros(len(records), n, dtype=torch.bool)
    for b, record in enumerate(records):
        labels = gold_labels(record)[0][:n]
        relevant[b, : len(labels)] = torch.tensor(labels, dtype=torch.bool)
    return relevant


def retriever_score_matrix(records: list[dict[str, Any]], n: int) -> torch.Tensor:
    """[B, n] the candidates' ``score`` fields (the retriever's), NaN where absent or padded."""
    scores = torch.full((len(records), n), float("nan"))
    for b, record in enumerate(records):
        for i, ctx in enumerate(record["ctxs"][:n]):
            if ctx.get("score") is not None:
                scores[b, i] = float(ctx["score"])
    return scores


def _pad_id(tokenizer: Any) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    return 0


class MicroBatchSchedule:
    """Which records each rank reads at each micro-step, as a pure function of the step.

    Every epoch is a permutation seeded by (seed, epoch); rank r takes positions
    r, r + W, r + 2W, ... of it, cut to a whole number of micro-batches on every rank. Because
    the position is just the global micro-step, resuming needs no sampler state beyond the step
    counter, and every rank always runs the same number of steps (ZeRO-3 needs lock step).
    """

    def __init__(self, num_records: int, micro_batch_size: int, world_size: int, rank: int, seed: int) -> None:
        per_step = micro_batch_size * world_size
        if num_records < per_step:
            raise ValueError(
                f"{num_records} training records cannot fill one step of {micro_batch_size} queries "
                f"on each of {world_size} ranks"
            )
        self.num_records = num_records
        self.micro_batch_size = micro_batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.steps_per_epoch = num_records // per_step
        self._epoch_cache: tuple[int, list[int]] | None = None

    def _permutation(self, epoch: int) -> list[int]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch_cache = (epoch, torch.randperm(self.num_records, generator=gen).tolist())
        return self._epoch_cache[1]

    def epoch_of(self, micro_step: int) -> int:
        return micro_step // self.steps_per_epoch

    def indices(self, micro_step: int) -> list[int]:
        epoch, pos = divmod(micro_step, self.steps_per_epoch)
        perm = self._permutation(epoch)
        start = pos * self.micro_batch_size * self.world_size
        block = perm[start : start + self.micro_batch_size * self.world_size]
        return block[self.rank :: self.world_size]
