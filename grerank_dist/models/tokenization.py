"""Small word-level tokenizers for random-init models (tests, the synthetic demo).

Real checkpoints bring their own tokenizer; these exist so that tiny models can be built and
saved with a tokenizer that `AutoTokenizer.from_pretrained` reloads, with no hub access.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

_PRE_TOKENIZER = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
_NORMALIZER = normalizers.Lowercase()


def split_words(text: str) -> list[str]:
    """Split text exactly as the word-level tokenizers do (lower-cased words and punctuation)."""
    return [piece for piece, _ in _PRE_TOKENIZER.pre_tokenize_str(_NORMALIZER.normalize_str(text))]


def build_word_tokenizer(
    texts: Iterable[str], style: Literal["decoder", "cross-encoder", "seq2seq"]
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over every word of ``texts``.

    ``decoder``: Llama-like special tokens (<unk>, <s>, </s>, <pad>), BOS added by the caller's
    prompt template, not by the tokenizer (the generator code decides where BOS goes).
    ``seq2seq``: T5-like (<pad> = 0, </s> = 1, <unk> = 2) with no BOS: the decoder of an
    encoder-decoder starts from its ``decoder_start_token_id`` (T5: the pad token) instead.
    ``cross-encoder``: BERT-like ([PAD], [UNK], [CLS], [SEP], [MASK]) with the pair template
    ``[CLS] A [SEP] B [SEP]`` and token type ids, as cross-encoders expect.
    """
    if style == "decoder":
        specials = ["<unk>", "<s>", "</s>", "<pad>"]
        unk = "<unk>"
    elif style == "seq2seq":
        specials = ["<pad>", "</s>", "<unk>"]
        unk = "<unk>"
    elif style == "cross-encoder":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        unk = "[UNK]"
    else:
        raise ValueError(f"style must be 'decoder', 'cross-encoder' or 'seq2seq', got {style!r}")
    words = sorted({w for text in texts for w in split_words(text)} - set(specials))
    vocab = {token: i for i, token in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    backend.normalizer = _NORMALIZER
    backend.pre_tokenizer = _PRE_TOKENIZER
    if style == "decoder":
        return PreTrainedTokenizerFast(
            tokenizer_object=backend,
            unk_token="<unk>",
            bos_token="<s>",
            eos_token="</s>",
            pad_token="<pad>",
            padding_side="left",
        )
    if style == "seq2seq":
        return PreTrainedTokenizerFast(
            tokenizer_object=backend, unk_token="<unk>", eos_token="</s>", pad_token="<pad>", padding_side="right"
        )
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )
