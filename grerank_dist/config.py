"""Training configuration: dataclasses loaded from YAML, overridable from the command line.

A config file mirrors :class:`TrainConfig` section by section. Unknown keys and impossible
values are errors at start, before any model is built, so a typo never silently falls back to
a default on a cluster. Overrides use dotted keys: ``relax.k=3 train.lr=1e-4``; values are
parsed as YAML scalars (``true``, ``1e-4``, ``[a, b]``, ``null``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file and the key."""


@dataclass
class GeneratorConfig:
    # A local checkpoint directory (CEPE, or a Llama/Qwen2/Qwen3/Mistral/Gemma causal LM), or
    # "random:tiny" (tiny CEPE) / "random:tiny-llama" (-qwen2, -mistral, ...) for random-init tests.
    path: str = "random:tiny"
    # Cross-attention backend of grerank_dist.method.attention ("auto" picks the fastest exact one);
    # for decoder-only generators, the backend of the prompt/answer pass over documents and prompt.
    attention_backend: str = "auto"
    # Decoder-only generators only (parallel-context alignment, after APE; README "The generators"):
    # the prompt/answer tokens score a document key q.k / (sqrt(d) * T) + log-mask + log S, with
    # T = doc_key_temperature (< 1 sharpens attention within the documents) and S =
    # doc_attention_scale (the documents' attention mass times S against prefix and prompt).
    # 1 and 1 leave the model as it is. doc_temperature_form: "group" (APE's: the documents
    # together get one logit T * logsumexp(their scores / T + log-mask) + log S, eager backend
    # only when T != 1) or "per_key" (the scores above as they are); the same at T = 1.
    doc_key_temperature: float = 1.0
    doc_attention_scale: float = 1.0
    doc_temperature_form: str = "group"
    gradient_checkpointing: bool = True
    # "auto": bf16 on GPU, fp32 on CPU.
    dtype: str = "auto"
    max_new_tokens: int = 25
    seed: int = 0  # initialisation seed of random:* generators


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["query", "key", "value", "dense"])


@dataclass
class RerankerConfig:
    # A local cross-encoder directory (AutoModelForSequenceClassification, num_labels=1), or
    # "random:tiny" for a random-init tiny cross-encoder whose vocabulary is built from the data.
    path: str = "random:tiny"
    max_length: int = 256
    lora: LoraConfig | None = None
    seed: int = 0
    # Recompute the reranker's layers in backward: B*n pairs per micro-step make its activations
    # the largest memory item beside the generator (see scripts/estimate_memory.py).
    gradient_checkpointing: bool = False
    # The trained reranker's dtype (its DeepSpeed engine's bf16 flag): fp32 by default, also next
    # to a bf16 generator, so scores, updates and the export keep full precision.
    dtype: str = "float32"
    # torch.compile backend for the reranker inside its engine: "" off (compilation takes minutes
    # and inductor needs a C++ compiler on CPU), "inductor" for long GPU runs, "eager" to check
    # that the model traces.
    compile: str = ""


@dataclass
class DataConfig:
    train_file: str = ""
    eval_file: str = ""
    n_candidates: int = 20
    doc_max_tokens: int = 256
    # Placeholders (checked at load, see TEMPLATE_FIELDS): doc_template {title} {text} {question},
    # prompt_template {question}, passage_template {title} {text}.
    doc_template: str = "Document (Title: {title}): {text}"
    prompt_template: str = "Question: {question}\nAnswer:"
    passage_template: str = "{title} {text}"
    # Decoder-only generators: text of the shared prefix after BOS (pre-filled once, before the
    # documents), and whether the model's chat template wraps instruction + documents + prompt.
    instruction: str = ""
    chat_template: bool = False
    # Which gold answer is the training target when a record has several.
    answer_choice: str = "first"  # first | shortest | random (seeded by epoch and record)
    answer_eos: bool = False  # append EOS to the training answer
    skip_bad_records: bool = False
    # score: candidates ordered by their `score` (descending, ties in file order) before the
    # first n_candidates are kept, when every candidate of the record has one; file: file order.
    candidate_order: str = "score"
    # Training reads train_file (JSON lines, a JSON list, Parquet, or a datasets.save_to_disk
    # directory) into Arrow once, with its token ids, under cache_dir ("": $GRERANK_DATA_DIR or
    # ~/.cache/grerank_dist/data), keyed by the file, the tokenizers and the templates; later runs
    # memory-map it (grerank_dist/data/dataset.py).
    cache_dir: str = ""
    # Processes that tokenise the file when the cache is built (0: every core this process may use;
    # at most one per 2,000 records).
    tokenize_workers: int = 0
    # DataLoader processes that pad each rank's coming batches during the step (0: in the loop).
    num_workers: int = 1


@dataclass
class RelaxConfig:
    k: int = 5
    tau: float = 0.5
    kappa: float = 1.0
    noise: bool = True  # False: the paper's no-Gumbel ablation (Sec. 4.4)
    # True: the generator reads the hard sampled top-k (straight-through gradient of the relaxed mask)
    straight_through: bool = False


@dataclass
class ObjectiveConfig:
    """Settings of the LLM-supervised baselines (``train.objective``: emdr, pdist, loop, adist, dro).

    Temperatures: the reranker's distribution is softmax(scores / score_temperature). A
    cross-encoder's logits are already log-odds (G-Rerank reads them as they are, kappa = 1), so
    the default is 1, not Atlas's 0.01, which rescales dot products of normalised embeddings
    that lie ~0.1 apart. The target is softmax(target / target_temperature); a PDist/LOOP target
    is a mean per-token log-likelihood, where a supporting and a distracting document differ by
    tenths of a nat per token, so the default 0.1 turns such a gap into a logit gap of a few
    units (a peaked, but not one-hot, target). ADist's default target (``adist_target: atlas``)
    is Atlas's softmax over the pooled attention x value-norm scores, without T_g.
    """

    target_temperature: float = 0.1
    score_temperature: float = 1.0
    # target_to_scores: KL(target || reranker) as Atlas; scores_to_target: the reverse (mode-seeking).
    kl_direction: str = "target_to_scores"
    dro_samples: int = 4  # m subsets of relax.k candidates per query (DRO suggests 4-8)
    # atlas: softmax(pooled alpha * ||v||) (Izacard et al. 2022); log_mass: softmax(log(mass) / T_g).
    adist_target: str = "atlas"
    adist_value_norm: bool = True  # weigh attention probabilities by the value vectors' norms (Atlas)
    pdist_weight: float = 1.0  # grerank_pdist: the PDist term's weight beside G-Rerank's loss


@dataclass
class OptimConfig:
    objective: str = "grerank"
    micro_batch_size: int = 4  # queries per rank per micro-step
    gradient_accumulation_steps: int = 1
    max_steps: int = 100  # optimizer steps
    lr: float = 2e-5
    weight_decay: float = 0.01
    warmup_steps: int = 0
    schedule: str = "linear"  # linear | cosine | constant (after warmup)
    max_grad_norm: float = 1.0
    log_every: int = 1
    save_every: int = 0  # 0: only at the end
    keep_last: int = 2
    # End this invocation after this global step (a checkpoint is written there), e.g. to split
    # a run over time-limited jobs; `--resume auto` continues it. 0: run to max_steps.
    stop_at_step: int = 0


@dataclass
class DeepSpeedConfig:
    # Paths are resolved against the config file's directory, then the working directory.
    generator_config: str = "ds_configs/generator_zero3.json"
    reranker_config: str = "ds_configs/reranker_zero1.json"
    generator_overrides: dict[str, Any] = field(default_factory=dict)
    reranker_overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    output_dir: str = "runs/grerank"
    seed: int = 0
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    reranker: RerankerConfig = field(default_factory=RerankerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    relax: RelaxConfig = field(default_factory=RelaxConfig)
    train: OptimConfig = field(default_factory=OptimConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    # Where the config came from (set by load_config); relative paths are resolved against it.
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SCHEDULES = ("linear", "cosine", "constant")
# The placeholders the collator fills in each data template (data.Collator, data.reranker_pairs).
TEMPLATE_FIELDS = {
    "doc_template": ("title", "text", "question"),  # the generator's documents (FiD puts the question there)
    "prompt_template": ("question",),
    "passage_template": ("title", "text"),  # the reranker's passage; the question is the pair's first text
}
ANSWER_CHOICES = ("first", "shortest", "random")
CANDIDATE_ORDERS = ("score", "file")
COMPILE_BACKENDS = ("inductor", "eager", "aot_eager", "cudagraphs")
# The vocabulary of train.objective and the objective section; grerank_dist.method.objectives
# implements each name (its registry OBJECTIVES has exactly these keys), so validating a config
# needs no model code.
OBJECTIVE_NAMES = ("grerank", "nogumbel", "emdr", "pdist", "grerank_pdist", "loop", "adist", "dro", "gold_labels",
                   "retriever_distillation")
KL_DIRECTIONS = ("target_to_scores", "scores_to_target")
ADIST_TARGETS = ("atlas", "log_mass")
DOC_TEMPERATURE_FORMS = ("group", "per_key")  # generator.doc_temperature_form (models/decoder_only.py)


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys with their dotted path."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(fields)}")
    kwargs = {}
    for name, value in values.items():
        key = f"{where}.{name}" if where else name
        sub = _dataclass_of(fields[name].type)
        if sub is not None and value is not None:
            kwargs[name] = _build(sub, value, key)
        else:
            kwargs[name] = _check_type(value, str(fields[name].type), key)
    return cls(**kwargs)


_SCALARS = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def _check_type(value: Any, annotation: str, key: str) -> Any:
    """Reject a value of the wrong kind (``k: three``, ``lr: [1]``) with its dotted key."""
    expected = _SCALARS.get(annotation)
    if annotation.startswith("list["):
        expected = (list,)
    elif annotation.startswith("dict["):
        expected = (dict,)
    if expected is None:
        return value
    if annotation == "float" and isinstance(value, str):
        try:  # YAML 1.1 reads "2e-3" (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    wrong_bool = isinstance(value, bool) and bool not in expected
    if wrong_bool or not isinstance(value, expected):
        raise ConfigError(f"{key}: expected {annotation}, got {value!r}")
    return float(value) if annotation == "float" else value


def _dataclass_of(annotation: Any) -> type | None:
    """The dataclass named by a field annotation ('LoraConfig | None' -> LoraConfig), if any."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    for part in str(text).replace(" ", "").split("|"):
        candidate = globals().get(part)
        if dataclasses.is_dataclass(candidate):
            return candidate
    return None


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
    node[parts[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings to a raw config mapping (values parsed as YAML)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from exc
        _set_dotted(tree, key.strip(), value)
    return tree


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config (or start from defaults when ``path`` is None), apply overrides, validate."""
    tree: dict[str, Any] = {}
    where = "<defaults>"
    if path is not None:
        where = str(path)
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from exc
        try:
            tree = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    apply_overrides(tree, overrides or [])
    try:
        config = _build(TrainConfig, tree, "")
    except TypeError as exc:  # pragma: no cover - _build checks keys first
        raise ConfigError(f"{where}: {exc}") from exc
    config.source = str(Path(path).resolve()) if path is not None else ""
    validate(config, where)
    _resolve_paths(config)
    return config


def _resolve_paths(config: TrainConfig) -> None:
    """Make the config's file references independent of the working directory."""
    for section, key in (
        (config.data, "train_file"),
        (config.data, "eval_file"),
        (config.generator, "path"),
        (config.reranker, "path"),
        (config.deepspeed, "generator_config"),
        (config.deepspeed, "reranker_config"),
    ):
        value = getattr(section, key)
        if value and ":" not in value.split("/")[0]:  # leave random:tiny and the like alone
            resolved = resolve_path(config, value)
            if resolved.exists():
                setattr(section, key, str(resolved))


def validate(config: TrainConfig, where: str = "config") -> None:
    """Reject impossible values with the offending dotted key."""

    def fail(key: str, message: str) -> None:
        raise ConfigError(f"{where}: {key}: {message}")

    r, d, t = config.relax, config.data, config.train
    if not isinstance(r.k, int) or r.k < 1:
        fail("relax.k", f"must be an integer >= 1, got {r.k!r}")
    if not isinstance(d.n_candidates, int) or d.n_candidates < 1:
        fail("data.n_candidates", f"must be an integer >= 1, got {d.n_candidates!r}")
    if r.k > d.n_candidates:
        fail("relax.k", f"k={r.k} exceeds data.n_candidates={d.n_candidates}")
    if not _is_number(r.tau) or r.tau <= 0:
        fail("relax.tau", f"must be > 0, got {r.tau!r}")
    if not _is_number(r.kappa) or r.kappa <= 0:
        fail("relax.kappa", f"must be > 0, got {r.kappa!r}")
    if r.straight_through and r.k == 1:
        # the one kept document's bias is a constant to the attention over documents (the
        # decoder-only log-mask is taken relative to its largest entry): no gradient would flow
        fail("relax.straight_through", "passes no gradient with relax.k=1 (one kept document); use k >= 2")
    if t.objective not in OBJECTIVE_NAMES:
        fail("train.objective", f"must be one of {sorted(OBJECTIVE_NAMES)}, got {t.objective!r}")
    o = config.objective
    for key, value in (("objective.target_temperature", o.target_temperature), ("objective.score_temperature", o.score_temperature)):
        if not _is_number(value) or value <= 0:
            fail(key, f"must be > 0, got {value!r}")
    if o.kl_direction not in KL_DIRECTIONS:
        fail("objective.kl_direction", f"must be one of {KL_DIRECTIONS}, got {o.kl_direction!r}")
    if not _is_number(o.pdist_weight) or o.pdist_weight < 0:
        fail("objective.pdist_weight", f"must be a number >= 0, got {o.pdist_weight!r}")
    if o.adist_target not in ADIST_TARGETS:
        fail("objective.adist_target", f"must be one of {ADIST_TARGETS}, got {o.adist_target!r}")
    if t.schedule not in SCHEDULES:
        fail("train.schedule", f"must be one of {SCHEDULES}, got {t.schedule!r}")
    if d.answer_choice not in ANSWER_CHOICES:
        fail("data.answer_choice", f"must be one of {ANSWER_CHOICES}, got {d.answer_choice!r}")
    if d.candidate_order not in CANDIDATE_ORDERS:
        fail("data.candidate_order", f"must be one of {CANDIDATE_ORDERS}, got {d.candidate_order!r}")
    for key, value, minimum in (
        ("train.micro_batch_size", t.micro_batch_size, 1),
        ("train.gradient_accumulation_steps", t.gradient_accumulation_steps, 1),
        ("train.max_steps", t.max_steps, 1),
        ("train.log_every", t.log_every, 1),
        ("train.save_every", t.save_every, 0),
        ("train.keep_last", t.keep_last, 1),
        ("train.stop_at_step", t.stop_at_step, 0),
        ("train.warmup_steps", t.warmup_steps, 0),
        ("data.doc_max_tokens", d.doc_max_tokens, 1),
        ("data.tokenize_workers", d.tokenize_workers, 0),
        ("data.num_workers", d.num_workers, 0),
        ("reranker.max_length", config.reranker.max_length, 8),
        ("generator.max_new_tokens", config.generator.max_new_tokens, 1),
        ("objective.dro_samples", config.objective.dro_samples, 1),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            fail(key, f"must be an integer >= {minimum}, got {value!r}")
    for key, value in (("generator.doc_key_temperature", config.generator.doc_key_temperature),
                       ("generator.doc_attention_scale", config.generator.doc_attention_scale)):
        if not _is_number(value) or not math.isfinite(value) or value <= 0:
            fail(key, f"must be a finite number > 0 (1 leaves the generator unchanged), got {value!r}")
    form = config.generator.doc_temperature_form
    if form not in DOC_TEMPERATURE_FORMS:
        fail("generator.doc_temperature_form", f"must be one of {DOC_TEMPERATURE_FORMS}, got {form!r}")
    problem = group_form_backend_problem(form, [config.generator.doc_key_temperature], config.generator.attention_backend)
    if problem:  # refused here, before any weights load
        fail("generator.attention_backend", problem)
    if not _is_number(t.lr) or t.lr <= 0:
        fail("train.lr", f"must be > 0, got {t.lr!r}")
    if not _is_number(t.max_grad_norm) or t.max_grad_norm < 0:
        fail("train.max_grad_norm", f"must be >= 0 (0 disables clipping), got {t.max_grad_norm!r}")
    for key, value in (("generator.dtype", config.generator.dtype), ("reranker.dtype", config.reranker.dtype)):
        if value not in ("auto", "float32", "bfloat16", "float16"):
            fail(key, f"must be auto, float32, bfloat16 or float16, got {value!r}")
    if config.reranker.compile and config.reranker.compile not in COMPILE_BACKENDS:
        fail("reranker.compile", f"must be empty (off) or one of {', '.join(COMPILE_BACKENDS)}, got {config.reranker.compile!r}")
    if not 0 <= config.seed < 2**20:
        fail("seed", f"must be in [0, 2**20) (it is packed into the per-rank noise seeds), got {config.seed}")
    for key, allowed in TEMPLATE_FIELDS.items():
        problem = _template_problem(getattr(d, key), allowed)
        if problem:
            fail(f"data.{key}", problem)


def _template_problem(template: str, allowed: tuple[str, ...]) -> str | None:
    """Why the collator could not fill ``template`` with the fields ``allowed``, or None.

    Checked at load time so that a bad placeholder is a config error, not a KeyError after the
    models are built.
    """
    names = ", ".join(f"{{{name}}}" for name in allowed)
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as exc:
        return f"malformed template {template!r} ({exc})"
    for field_name in fields:
        if field_name not in allowed:
            return f"unknown placeholder {{{field_name}}} in {template!r} (allowed: {names})"
    try:
        template.format(**{name: "x" for name in allowed})
    except (ValueError, KeyError, IndexError, AttributeError) as exc:  # e.g. a bad format spec
        return f"malformed template {template!r} ({exc})"
    return None


def group_form_backend_problem(form: str, temperatures: list[float], backend: str) -> str | None:
    """Why ``backend`` cannot run the decoder-only alignment at these temperatures, or None: the
    group form's offset depends on the query, which the fused backends' per-key bias cannot
    carry (models/decoder_only.py), so at T != 1 it needs eager (``auto`` is eager)."""
    if form == "group" and any(t != 1 for t in temperatures) and backend not in ("auto", "eager"):
        return (f"{backend!r} cannot carry the group form's per-query offset at generator.doc_key_temperature != 1: "
                "use auto or eager, or generator.doc_temperature_form=per_key")
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def resolve_path(config: TrainConfig, path: str) -> Path:
    """Resolve a relative path from the config: beside the config file, in its parent (the
    project root for ``configs/*.yaml``), else relative to the working directory."""
    candidate = Path(path)
    if candidate.is_absolute() or not config.source:
        return candidate
    config_dir = Path(config.source).parent
    for base in (config_dir, config_dir.parent):
        if (base / candidate).exists():
            return base / candidate
    return candidate


def load_json_with_overrides(path: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """Read a DeepSpeed JSON config and merge dotted-or-nested overrides into it."""
    try:
        tree = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read DeepSpeed config ({exc.strerror})") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON at line {exc.lineno}: {exc.msg}") from exc
    for key, value in _flatten(overrides).items():
        _set_dotted(tree, key, value)
    return tree


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat
