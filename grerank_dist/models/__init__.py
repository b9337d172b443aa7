"""Generator models that sit behind :class:`grerank_dist.generator.ParallelContextGenerator`."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

RANDOM_PREFIX = "random:"


def load_generator(
    path: str, vocab_texts: Iterable[str] = (), seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[torch.nn.Module, Any]:
    """A frozen generator and its tokenizer from a local checkpoint directory.

    ``random:tiny`` (CEPE) and ``random:tiny-fid`` (FiD) build a random-init tiny generator whose
    word-level vocabulary covers ``vocab_texts`` (smoke runs and tests; every rank builds the
    same weights from ``seed``). A directory is dispatched on its ``config.json`` ``model_type``
    ("t5": FiD, plain T5 or the public FiD code's layout; else CEPE) and loaded in ``dtype``
    (inside :meth:`DeepSpeedStrategy.generator_loading`, partitioned as it loads).
    """
    from transformers import AutoTokenizer

    from grerank_dist.models.cepe import CepeConfig, CepeForCausalContextLM, tiny_cepe_config
    from grerank_dist.models.fid import load_fid, random_tiny_fid

    if path.startswith(RANDOM_PREFIX):
        size = path[len(RANDOM_PREFIX) :]
        if size == "tiny-fid":
            return random_tiny_fid(vocab_texts, seed=seed, dtype=dtype)
        if size != "tiny":
            raise ValueError(
                f"generator.path {path!r}: the random generators are 'random:tiny' (CEPE) and 'random:tiny-fid'"
            )
        from grerank_dist.tokenization import build_word_tokenizer

        tokenizer = build_word_tokenizer(vocab_texts, "decoder")
        torch.manual_seed(seed)
        model = CepeForCausalContextLM(tiny_cepe_config(vocab_size=len(tokenizer))).to(dtype)
    else:
        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{path}: not a generator checkpoint directory (no config.json)")
        try:
            raw = json.loads(config_file.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{config_file}: not valid JSON at line {exc.lineno}: {exc.msg}") from exc
        if raw.get("model_type") == "t5":
            return load_fid(path, dtype)
        # The public CEPE release says model_type "llama"; its cross-attention keys identify it.
        if raw.get("model_type") != CepeConfig.model_type and "num_cross_attn_layers" not in raw:
            raise ValueError(
                f"{config_file}: model_type {raw.get('model_type')!r} is not a supported generator "
                f"(supported: FiD/T5 checkpoints, model_type 't5'; CEPE checkpoints, model_type "
                f"{CepeConfig.model_type!r} or a config with 'num_cross_attn_layers')"
            )
        model = CepeForCausalContextLM.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    model.requires_grad_(False)
    model.eval()
    return model, tokenizer
