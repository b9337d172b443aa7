"""Test-wide environment: CPU DeepSpeed, no hub access, small thread counts."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Training runs cache their Arrow data here, not in ~/.cache (grerank_dist/data/dataset.py).
if "GRERANK_DATA_DIR" not in os.environ:
    os.environ["GRERANK_DATA_DIR"] = tempfile.mkdtemp(prefix="grerank-test-data-")
    atexit.register(shutil.rmtree, os.environ["GRERANK_DATA_DIR"], True)

# A test that fails and then passes on a retry fails the run (tests/flake_guard.py).
pytest_plugins = ["flake_guard", "pytester"]
