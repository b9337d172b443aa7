"""Config loading/validation and record checking: errors name the file, the line and the field."""

import json

import pytest

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaTokenizer, PreTrainedTokenizerFast, T5Tokenizer

from grerank_dist.config import ConfigError, DataConfig, load_config
from grerank_dist.data.collate import Collator, MicroBatchSchedule
from grerank_dist.data.records import RecordError, read_records, training_answer
from grerank_dist.evaluation.evaluate import clean_prediction
from grerank_dist.interface import InputFormat
from grerank_dist.method.metrics import substring_exact_match
from grerank_dist.models.decoder_only import decoder_input_format
from grerank_dist.models.tokenization import build_word_tokenizer
from grerank_dist.training.train import record_texts


def write_yaml(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_overrides_and_defaults(tmp_path):
    path = write_yaml(tmp_path, "relax:\n  k: 3\ntrain:\n  lr: 1.0e-4\n")
    config = load_config(path, ["relax.tau=0.25", "train.weight_decay=2e-3", "data.n_candidates=10", "reranker.lora={r: 4}"])
    assert (config.relax.k, config.relax.tau, config.train.lr) == (3, 0.25, 1e-4)
    assert config.data.n_candidates == 10 and config.train.weight_decay == 2e-3
    assert config.reranker.lora.r == 4 and config.reranker.lora.alpha == 16


def test_parallel_context_alignment_defaults_to_no_change():
    config = load_config(None)
    g = config.generator
    assert (g.doc_key_temperature, g.doc_attention_scale, g.doc_temperature_form) == (1.0, 1.0, "group")
    config = load_config(None, ["generator.doc_key_temperature=0.5", "generator.doc_attention_scale=2",
                                "generator.doc_temperature_form=per_key"])
    g = config.generator
    assert (g.doc_key_temperature, g.doc_attention_scale, g.doc_temperature_form) == (0.5, 2.0, "per_key")


@pytest.mark.parametrize(
    "text, overrides, needle",
    [
        ("relax:\n  kk: 3\n", [], "relax: unknown key(s) ['kk']"),
        ("nonsense: 1\n", [], "unknown key(s) ['nonsense']"),
        ("", ["relax.k=30"], "relax.k: k=30 exceeds data.n_candidates=20"),
        ("", ["relax.tau=0"], "relax.tau: must be > 0"),
        ("", ["relax.k=0"], "relax.k: must be an integer >= 1"),
        ("", ["train.objective=foo"], "train.objective: must be one of"),
        ("", ["data.doc_template='{passage}'"], "data.doc_template: unknown placeholder {passage}"),
        # placeholders the collator fills for one template but not for another
        ("", ["data.prompt_template='{title}: {question}'"], "data.prompt_template: unknown placeholder {title}"),
        ("", ["data.passage_template='{question} {text}'"], "data.passage_template: unknown placeholder {question}"),
        ("", ["data.passage_template='{0} {text}'"], "data.passage_template: unknown placeholder {0}"),
        ("", ["data.doc_template='{text.upper}'"], "data.doc_template: unknown placeholder {text.upper}"),
        ("", ["data.doc_template='{text'"], "data.doc_template: malformed template"),
        ("", ["data.candidate_order=rank"], "data.candidate_order: must be one of ('score', 'file'), got 'rank'"),
        ("", ["relax.k=three"], "relax.k: expected int, got 'three'"),
        ("", ["train.lr=[1]"], "train.lr: expected float"),
        ("relax: [1, 2]\n", [], "relax: expected a mapping"),
        ("", ["relax.k"], "expected key.sub=value"),
        ("", ["generator.doc_key_temperature=0"], "generator.doc_key_temperature: must be a finite number > 0"),
        ("", ["generator.doc_attention_scale=-2"], "generator.doc_attention_scale: must be a finite number > 0"),
        ("", ["generator.doc_attention_scale=.inf"], "generator.doc_attention_scale: must be a finite number > 0"),
        ("", ["generator.doc_key_temperature=hot"], "generator.doc_key_temperature: expected float, got 'hot'"),
        ("", ["generator.doc_temperature_form=ape"],
         "generator.doc_temperature_form: must be one of ('group', 'per_key'), got 'ape'"),
        ("", ["generator.doc_temperature_form=1"], "generator.doc_temperature_form: expected str"),
        ("", ["generator.doc_key_temperature=0.5", "generator.attention_backend=sdpa"],
         "generator.attention_backend: 'sdpa' cannot carry the group form's per-query offset"),
    ],
)
def test_bad_configs_name_the_key(tmp_path, text, overrides, needle):
    """Each bad value is refused at load, naming its key (the group form at T != 1 with a fused
    backend too, before any weights are read)."""
    path = write_yaml(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    assert needle in str(err.value)


def test_doc_template_may_hold_the_question_and_the_collator_fills_it(tmp_path):
    """FiD-style encoder inputs ("question: ... title: ... context: ..."): {question} passes
    validation and reaches every document of its query, padding candidates included."""
    template = "question: {question} title: {title} context: {text}"
    config = load_config(None, [f"data.doc_template='{template}'", "data.n_candidates=3", "data.doc_max_tokens=16",
                                   "relax.k=1"])
    records = [
        {"question": "who wrote it", "answers": ["ann"], "ctxs": [
            {"title": "book", "text": "ann wrote it"}, {"title": "film", "text": "bob made it"}]},
        {"question": "where is it", "answers": ["oslo"], "ctxs": [{"title": "city", "text": "it is in oslo"}] * 3},
    ]
    tokenizer = build_word_tokenizer(record_texts(records, config), "decoder")  # as random:tiny runs build it
    batch = Collator(config.data, tokenizer, None, config.reranker.max_length)(records, [0, 1])
    decoded = [[tokenizer.decode(ids[mask.bool()]) for ids, mask in zip(*rows)]
               for rows in zip(batch.encoder_input_ids, batch.encoder_attention_mask)]
    assert decoded[0][:2] == ["question : who wrote it title : book context : ann wrote it",
                              "question : who wrote it title : film context : bob made it"]
    assert decoded[0][2] == "question : who wrote it title : context :"  # the padding candidate
    assert decoded[1][0] == "question : where is it title : city context : it is in oslo"


def test_malformed_yaml_names_the_file(tmp_path):
    path = write_yaml(tmp_path, "relax: {k: 3\n")
    with pytest.raises(ConfigError, match="c.yaml: not valid YAML"):
        load_config(path)


GOOD = {"question": "q?", "answers": ["a"], "ctxs": [{"title": "t", "text": "x", "hasanswer": True, "score": "1.5"}]}


def write_lines(tmp_path, lines):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    "bad, needle",
    [
        ("{not json", "d.jsonl:2: not valid JSON"),
        (json.dumps({"answers": ["a"], "ctxs": GOOD["ctxs"]}), "d.jsonl:2: field 'question'"),
        (json.dumps({"question": "q", "ctxs": GOOD["ctxs"]}), "d.jsonl:2: field 'answers': missing or empty"),
        (json.dumps({"question": "q", "answers": [], "ctxs": GOOD["ctxs"]}), "d.jsonl:2: field 'answers'"),
        (json.dumps({"question": "q", "answers": ["a"], "ctxs": []}), "d.jsonl:2: field 'ctxs': empty"),
        (json.dumps({"question": "q", "answers": ["a"], "ctxs": [{"title": "t"}]}), "d.jsonl:2: field 'ctxs[0].text'"),
        (
            json.dumps({"question": "q", "answers": ["a"], "ctxs": [{"text": "x", "score": "high"}]}),
            "d.jsonl:2: field 'ctxs[0].score'",
        ),
    ],
)
def test_bad_records_name_file_line_field(tmp_path, bad, needle):
    path = write_lines(tmp_path, [json.dumps(GOOD), bad, json.dumps(GOOD)])
    with pytest.raises(RecordError) as err:
        read_records(path, n_candidates=5)
    assert needle in str(err.value)
    records, report = read_records(path, n_candidates=5, skip_bad=True)
    assert len(records) == 2 and sum(report.skipped.values()) == 1
    assert [r["line"] for r in records] == [1, 3]


def test_record_normalisation(tmp_path):
    fid = {"question": "q", "target": "t1", "ctxs": [{"text": str(i), "score": str(i)} for i in range(7)]}
    path = write_lines(tmp_path, [json.dumps(GOOD), json.dumps(fid)])
    records, report = read_records(path, n_candidates=5)
    assert records[0]["ctxs"][0]["has_answer"] is True and records[0]["ctxs"][0]["score"] == 1.5
    assert records[1]["answers"] == ["t1"] and len(records[1]["ctxs"]) == 5
    assert (report.truncated, report.padded) == (1, 1)


def test_candidates_are_ordered_by_score_before_truncation(tmp_path):
    """A shuffled file (HotpotQA paragraphs, merged runs) keeps its best-scored candidates, best
    first, ties in file order; file order only on request or when a candidate has no score."""
    scores = [2, 5, 1, 5, 3, 4]
    shuffled = {"question": "q", "answers": ["a"], "ctxs": [
        {"id": f"p{i}", "text": "x", "score": str(s)} for i, s in enumerate(scores)]}
    unscored = {"question": "q", "answers": ["a"], "ctxs": [{"text": "x", "score": 9}, {"text": "y"}, {"text": "z", "score": 10}]}
    path = write_lines(tmp_path, [json.dumps(shuffled), json.dumps(unscored)])
    records, report = read_records(path, n_candidates=4)
    # by score: 5 (p1), 5 (p3, the tie after p1), 4 (p5), 3 (p4) | 2 (p0), 1 (p2) cut
    assert [c["id"] for c in records[0]["ctxs"]] == ["p1", "p3", "p5", "p4"]
    assert [c["score"] for c in records[0]["ctxs"]] == [5.0, 5.0, 4.0, 3.0]
    assert [c["text"] for c in records[1]["ctxs"]] == ["x", "y", "z"]  # a score is missing: file order
    assert [c["id"] for c in records[1]["ctxs"]] == ["0", "1", "2"]
    assert report.reordered == 1 and "1 reordered by score" in report.summary()
    records, report = read_records(path, n_candidates=4, candidate_order="file")
    assert [c["id"] for c in records[0]["ctxs"]] == ["p0", "p1", "p2", "p3"] and report.reordered == 0
    with pytest.raises(ValueError, match="candidate_order must be one of"):
        read_records(path, n_candidates=4, candidate_order="rank")
    # errors name the candidate's position in the file, not in the sorted list
    bad = {"question": "q", "answers": ["a"], "ctxs": [{"text": "x", "score": 1}, {"title": "t", "score": 2}]}
    with pytest.raises(RecordError, match=r"d.jsonl:1: field 'ctxs\[1\].text'"):
        read_records(write_lines(tmp_path, [json.dumps(bad)]), n_candidates=4)


def test_answer_choice():
    record = {"id": "x", "answers": ["longer one", "short"], "line": 1}
    assert training_answer(record, "first", 0, 0) == "longer one"
    assert training_answer(record, "shortest", 0, 0) == "short"
    picks = {training_answer(record, "random", 0, epoch) for epoch in range(20)}
    assert picks == {"longer one", "short"}
    assert training_answer(record, "random", 0, 3) == training_answer(record, "random", 0, 3)


def test_schedule_partitions_each_epoch_across_ranks():
    n, bsz, world = 23, 2, 3
    schedules = [MicroBatchSchedule(n, bsz, world, rank, seed=7) for rank in range(world)]
    steps = schedules[0].steps_per_epoch
    assert steps == 23 // 6
    for epoch in range(2):
        seen = [i for s in schedules for step in range(epoch * steps, (epoch + 1) * steps) for i in s.indices(step)]
        assert len(seen) == len(set(seen)) == steps * bsz * world  # disjoint across ranks and steps
    assert schedules[0].indices(0) != schedules[0].indices(steps)  # a new permutation each epoch
    assert MicroBatchSchedule(n, bsz, world, 1, seed=7).indices(5) == schedules[1].indices(5)


# ---------------------------------------------------------------------- answer tokens after the prompt

CAPITAL = {"question": "what is the capital of France?", "answers": ["Paris"],
           "ctxs": [{"title": "France", "text": "Paris is the capital of France."}]}
CAPITAL_CORPUS = ["Question: what is the capital of France?\nAnswer: Paris", "Paris is the capital of France.",
                  "France: Paris", "Answer: Oslo"] * 4
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_level_bpe():
    """A GPT-2-style byte-level BPE (as SmolLM2, Llama-3 and Qwen2 tokenise; no prefix space)
    trained on a few lines, with ChatML's special tokens and chat template."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend.train_from_iterator(CAPITAL_CORPUS, trainers.BpeTrainer(
        vocab_size=1000, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=specials[0], eos_token=specials[0],
                                        additional_special_tokens=specials[1:])
    tokenizer.chat_template = CHATML
    return tokenizer


def llama2_sentencepiece():
    """Llama-2's tokenizer as transformers builds it (SentencePiece BPE, "▁" prepended), over
    merges learned on a few lines."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    backend.train_from_iterator(CAPITAL_CORPUS, trainers.BpeTrainer(
        vocab_size=1000, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    model = json.loads(backend.to_str())["model"]
    return LlamaTokenizer(vocab=model["vocab"], merges=[tuple(merge) for merge in model["merges"]])


def t5_sentencepiece():
    """T5's tokenizer as transformers builds it (SentencePiece unigram, "▁" before every word)."""
    words = {w for line in CAPITAL_CORPUS for w in line.split()}
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(f"▁{w}", -3.0) for w in sorted(words)] + [(c, -5.0) for c in sorted(set("".join(words)))]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def answer_labels(batch):
    """The label ids of the batch's first row (its answer tokens)."""
    labels = batch.labels[0]
    return labels[labels != -100].tolist()


def test_answer_labels_continue_the_prompt_on_byte_level_bpe():
    """A byte-level BPE writes the space in front of a word into the word's token: after the plain
    prompt "...\nAnswer:" the answer is " Paris" (one Ġ token, as prompt + " " + answer tokenises),
    not "Paris" tokenised alone (an unnatural continuation every objective would score). Greedy
    decoding that produces it still matches the gold answer."""
    tokenizer = byte_level_bpe()
    data = DataConfig(n_candidates=1, doc_max_tokens=16)
    fmt, _ = decoder_input_format(tokenizer, data)
    batch = Collator(data, tokenizer, None, 64, input_format=fmt)([CAPITAL], [0])
    prompt_text = data.prompt_template.format(question=CAPITAL["question"])
    prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    joint = tokenizer(prompt_text + " Paris", add_special_tokens=False)["input_ids"]
    assert joint[: len(prompt)] == prompt
    assert tokenizer.convert_ids_to_tokens(answer_labels(batch)) == ["ĠParis"]
    assert answer_labels(batch) == joint[len(prompt) :]
    assert batch.input_ids[0][batch.attention_mask[0].bool()].tolist() == joint
    prediction = clean_prediction(tokenizer.decode(answer_labels(batch) + [tokenizer.convert_tokens_to_ids("Ċ")]))
    assert prediction == "Paris" and substring_exact_match(prediction, CAPITAL["answers"]) == 1.0


@pytest.mark.parametrize("case", ["llama2-cepe", "t5-fid", "byte-level-chat", "byte-level-prompt-ends-in-space"])
def test_answer_labels_keep_the_tokens_that_were_already_right(case):
    """Where the answer tokenised alone already continued the prompt, the labels stay those tokens:
    SentencePiece gives "▁Paris" alone and after "Answer:" (CEPE's Llama-2), FiD's decoder has no
    prompt, and a chat template's assistant turn starts on a new line. A prompt ending in a space
    that a byte-level BPE would merge into the answer keeps its own tokens (generation starts from
    them), so the answer is tokenised alone after them and the row still reads prompt + answer."""
    data = DataConfig(n_candidates=1, doc_max_tokens=16)
    if case == "llama2-cepe":
        tokenizer, fmt, expected = llama2_sentencepiece(), None, ["▁Paris"]
    elif case == "t5-fid":
        tokenizer, expected = t5_sentencepiece(), ["▁Paris"]
        fmt = InputFormat("question: {question} title: {title} context: {text}", "", prompt_bos=False)
    elif case == "byte-level-chat":
        tokenizer, expected = byte_level_bpe(), ["Paris"]
        data = DataConfig(n_candidates=1, doc_max_tokens=16, chat_template=True)
        fmt, _ = decoder_input_format(tokenizer, data)
        assert fmt.prompt_template.endswith("<|im_start|>assistant\n")
    else:
        tokenizer, expected = byte_level_bpe(), ["Paris"]
        fmt = InputFormat(data.doc_template, "Question: {question}\nAnswer: ", prompt_bos=False)
    batch = Collator(data, tokenizer, None, 64, input_format=fmt)([CAPITAL], [0])
    labels = answer_labels(batch)
    assert tokenizer.convert_ids_to_tokens(labels) == expected
    assert labels == tokenizer("Paris", add_special_tokens=False)["input_ids"]
    if case == "byte-level-prompt-ends-in-space":
        row = batch.input_ids[0][batch.attention_mask[0].bool()].tolist()
        assert tokenizer.decode(row).endswith("\nAnswer: Paris")
