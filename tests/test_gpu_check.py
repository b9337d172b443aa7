"""The GPU check (scripts/gpu_check.sh, grerank_dist/perf/gpu_check.py) run here at its tiny CPU
shapes, so that it cannot fail on a lent GPU for a reason a CPU shows; and its resume,
watchdog and layer-halving paths, which a healthy run never takes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from grerank_dist.perf import gpu_check

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", "GPU_CHECK_TINY": "1",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True, timeout=300,
                          env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / gpu_check.JSON_NAME).read_text()), (out / gpu_check.MARKDOWN_NAME).read_text(), proc


def test_every_section_ran_and_the_report_names_it(tiny_run):
    data, markdown, proc = tiny_run
    assert data["tiny"] and data["device_type"] == "cpu" and data["attempts"] == 1
    assert [s.name for s in gpu_check.SECTIONS] == list(data["sections"])
    for section in gpu_check.SECTIONS:
        entry = data["sections"][section.name]
        assert entry["status"] == "ok", (section.name, entry)
        assert entry["figures"] and entry["seconds"] >= 0
        assert f"## {section.title}: ok" in markdown
    assert "## Assumptions and shortcuts" in markdown and markdown in proc.stdout  # printed at the end too
    assert data["sections"]["device"]["figures"]["peak"]["flops"] > 0


def test_backends_match_eager_within_tolerance_and_the_rest_say_why_not(tiny_run):
    figures = tiny_run[0]["sections"]["backends"]["figures"]
    assert set(figures) == {"CEPE", "FiD", "decoder-only"}
    for family, result in figures.items():
        assert result["reference"]["passed"] and result["reference"]["against"] == "float64", family
        assert result["reference"]["grad_max_abs"] > 1e-2  # the mask matters: the check is not vacuous
        compared = {b: r for b, r in result["backends"].items() if "passed" in r}
        assert {"sdpa", "folded"} <= set(compared) and all(r["passed"] for r in compared.values()), family
        assert "no backward on CPU" in result["backends"]["flex"]["skipped"]
        assert result["backends"]["flash"]["skipped"]


@pytest.mark.parametrize("section", ["cepe_step", "decoder_only_step"])
def test_step_figures_are_sane(tiny_run, section):
    figures = tiny_run[0]["sections"][section]["figures"]
    assert list(figures["variants"]) == list(gpu_check.STEP_VARIANTS)
    for variant, r in figures["variants"].items():
        assert r["layers"] == figures["full_layers"] and r["out_of_memory_at"] == [], variant
        assert len(r["step_times_s"]) == figures["steps"] and min(r["step_times_s"]) > 0
        assert r["step_s"] > 0 and r["tokens_per_s"] > 0 and 0 < r["mfu_percent"] < 100
        assert r["model_tflop_per_step"] > 0 and r["predicted_memory_gib"] > 0
        assert r["peak_memory_gib"] is None  # CPU: not measured; on CUDA it must be > 0
    naive, on = figures["variants"]["naive"], figures["variants"]["checkpointing on"]
    assert naive["micro_steps"] == figures["shape"]["batch"] and on["micro_steps"] == 1
    assert naive["model_tflop_per_step"] == on["model_tflop_per_step"]  # same queries, same model FLOPs
    assert naive["attention_backend"] == "eager"  # the naive step's own choice


def test_generation_figures_are_sane(tiny_run):
    figures = tiny_run[0]["sections"]["generation"]["figures"]
    assert len(figures) == 2
    for r in figures.values():
        assert r["new_tokens_per_query"] > 0 and r["decode_tokens_per_s"] > 0 and r["encode_s"] > 0


def test_fit_layers_halves_until_it_fits():
    tried = []

    def attempt(layers: int) -> dict:
        tried.append(layers)
        if layers > 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"ran": layers}

    mode = gpu_check.Mode(tiny=True, device=torch.device("cpu"))
    result = gpu_check.fit_layers(32, attempt, mode)
    assert tried == [32, 16, 8, 4] and result["layers"] == result["ran"] == 4
    assert len(result["out_of_memory_at"]) == 3 and result["out_of_memory_at"][0].startswith("32 layers: CUDA out of memory")
    with pytest.raises(RuntimeError, match="even with 1 decoder layer"):
        gpu_check.fit_layers(2, lambda layers: attempt(99), mode)


def test_a_hung_section_is_recorded_and_a_restart_resumes_after_a_crash(tmp_path, monkeypatch):
    """The watchdog records a section past its limit and ends the process (faked here); a
    restart with the same run id marks a section left running as crashed and runs the rest."""
    ended = threading.Event()
    monkeypatch.setattr(gpu_check.os, "_exit", lambda code: ended.set())
    ran = []
    sections = (gpu_check.Section("device", "Hangs", lambda run: ended.wait(10), need_s=0, limit_s=0.2),
                gpu_check.Section("backends", "Runs", lambda run: ran.append(run.figures.update(CEPE={"skipped": "x"})), need_s=0, limit_s=5))
    monkeypatch.setattr(gpu_check, "SECTIONS", sections)
    args = ["--out", str(tmp_path), "--run-id", "r1", "--sections", "device"]
    assert gpu_check.main(args) == 0 and ended.is_set()
    data = json.loads((tmp_path / gpu_check.JSON_NAME).read_text())
    assert data["sections"]["device"]["status"] == "timed out"

    data["sections"]["device"]["status"] = "running"  # as a crash inside it would leave it
    (tmp_path / gpu_check.JSON_NAME).write_text(json.dumps(data))
    assert gpu_check.main(["--out", str(tmp_path), "--run-id", "r1"]) == 0
    data = json.loads((tmp_path / gpu_check.JSON_NAME).read_text())
    assert data["attempts"] == 2 and data["sections"]["device"]["status"] == "crashed"
    assert data["sections"]["backends"]["status"] == "ok" and ran
    assert gpu_check.main(["--out", str(tmp_path), "--run-id", "r2", "--sections", "backends"]) == 0
    assert list(json.loads((tmp_path / gpu_check.JSON_NAME).read_text())["sections"]) == ["backends"]  # a new run
