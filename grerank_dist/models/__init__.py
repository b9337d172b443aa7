"""Generator models that sit behind :class:`grerank_dist.interface.ParallelContextGenerator`.

Each generator family is one module with a ``FAMILY`` (:class:`grerank_dist.interface.GeneratorFamily`):
which checkpoints it reads, how it loads them, which random tiny models it builds, and (on the
model it returns, ``model.input_format``) how a record becomes its inputs. A new family is one
module plus one entry in :data:`FAMILY_MODULES`.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from grerank_dist.interface import GeneratorFamily

if TYPE_CHECKING:
    from grerank_dist.config import GeneratorConfig

RANDOM_PREFIX = "random:"
# Tried in order: the first family that accepts a checkpoint's config.json loads it.
FAMILY_MODULES: tuple[str, ...] = ("grerank_dist.models.cepe", "grerank_dist.models.fid", "grerank_dist.models.decoder_only")


def generator_families() -> list[GeneratorFamily]:
    return [importlib.import_module(name).FAMILY for name in FAMILY_MODULES]


def _read_config(path: str) -> dict[str, Any]:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: not a generator checkpoint directory (no config.json)")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_file}: not valid JSON at line {exc.lineno}: {exc.msg}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{config_file}: must hold a JSON object, got {type(raw).__name__}")
    return raw


def generator_family(path: str) -> GeneratorFamily:
    """The family that builds ``path`` (a ``random:<size>`` name, or a checkpoint directory
    dispatched on its ``config.json``), found without loading any weights."""
    families = generator_families()
    if path.startswith(RANDOM_PREFIX):
        size = path[len(RANDOM_PREFIX) :]
        family = next((f for f in families if size in f.random_sizes), None)
        if family is None:
            sizes = ", ".join(f"'{RANDOM_PREFIX}{s}'" for f in families for s in f.random_sizes)
            raise ValueError(f"generator.path {path!r}: unknown random generator (choose from {sizes})")
        return family
    raw = _read_config(path)
    family = next((f for f in families if f.accepts(raw)), None)
    if family is None:
        raise ValueError(
            f"{Path(path) / 'config.json'}: model_type {raw.get('model_type')!r} is not a supported generator "
            f"(families: {', '.join(f.name for f in families)}; CEPE needs model_type 'cepe_llama' or "
            f"'num_cross_attn_layers', FiD model_type 't5', decoder-only LMs one of llama, qwen2, qwen3, mistral, gemma)"
        )
    return family


def load_generator(
    path: str,
    vocab_texts: Iterable[str] = (),
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    data: Any = None,
) -> tuple[torch.nn.Module, Any]:
    """A frozen generator and its tokenizer from a local checkpoint directory.

    ``random:<size>`` builds a random-init tiny model whose word-level vocabulary covers
    ``vocab_texts`` (smoke runs and tests; every rank builds the same weights from ``seed``):
    ``random:tiny`` is CEPE, ``random:tiny-fid`` FiD (T5), ``random:tiny-llama`` (``-qwen2``,
    ``-qwen3``, ``-mistral``, ``-gemma``) a decoder-only LM. A directory is dispatched on its ``config.json`` and loaded
    in ``dtype`` (inside :meth:`DeepSpeedStrategy.generator_loading`, partitioned as it loads).
    ``data`` (a :class:`grerank_dist.config.DataConfig`, default: its defaults) gives the templates.
    """
    if data is None:
        from grerank_dist.config import DataConfig

        data = DataConfig()
    family = generator_family(path)
    if path.startswith(RANDOM_PREFIX):
        model, tokenizer = family.build_random(path[len(RANDOM_PREFIX) :], list(vocab_texts), seed, dtype, data)
    else:
        model, tokenizer = family.load(path, dtype, data)
    model.requires_grad_(False)
    model.eval()
    return model, tokenizer


def configure_generator(model: torch.nn.Module, settings: GeneratorConfig) -> None:
    """Apply the generator section's attention settings to a loaded generator: the attention
    backend, and a decoder-only model's parallel-context alignment, which other families refuse
    rather than silently ignore (T or S != 1; the form alone is no change, as it acts through T)."""
    from grerank_dist.models.decoder_only import DecoderOnlyGenerator

    model.config.cross_attn_backend = settings.attention_backend
    alignment = (settings.doc_key_temperature, settings.doc_attention_scale)
    if isinstance(model, DecoderOnlyGenerator):
        model.set_context_alignment(*alignment, settings.doc_temperature_form)
    elif alignment != (1.0, 1.0):
        raise ValueError(
            f"generator.doc_key_temperature and generator.doc_attention_scale apply to decoder-only generators only; "
            f"{settings.path!r} is a {type(model).__name__} (leave both at 1)"
        )
