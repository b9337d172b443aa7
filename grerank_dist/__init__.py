"""grerank_dist: end-to-end reranker training with Gumbel relaxed top-k masks (G-Rerank).

Layout (each subpackage's docstring says more):

- ``config``, ``atomic``, ``interface``: what a run is (dataclass configs, YAML), how files are
  written (atomically), and how the parts talk (the generator protocol, ``InputFormat``,
  ``Batch``); the foundation every part may import.
- ``method/``: the paper's method and measures: relaxed top-k masks (``relax``), the log-mask
  attention (``attention``), the objectives (``objectives``), metrics, value checks.
- ``models/``: the generator families (CEPE, FiD, decoder-only), the reranker, tokenizers,
  model fetching.
- ``data/``: records (reading, validation), collation into batches, the Arrow dataset,
  converters of public datasets.
- ``training/``: the recipe (``train``), everything DeepSpeed (``strategy``), tracking, export.
- ``evaluation/``: the three evaluation settings, relevance mining, plots.
- ``perf/``: the step benchmark, the traffic counter, the cost model and the GPU check.
- ``demos/``: the embedded demos and their synthetic and natural-sentence records and reader.
- ``cli``: the ``grerank`` command, which dispatches to the modules above.

Dependency rule (checked by tests/test_layout.py): ``config``, ``atomic`` and
``interface`` import nothing of the package; ``method`` imports only those; ``data`` and
``models`` import the foundation and ``method``; ``training`` also ``data`` and ``models``;
``evaluation`` also ``training``; ``perf`` also ``evaluation``; ``demos`` anything, and nothing
imports ``demos`` (the ``grerank`` command names its modules as strings). ``cli`` may
import every part but ``demos``.

The flat module paths of earlier releases (``grerank_dist.relax``, ``grerank_dist.train``, ...)
still import, with a DeprecationWarning naming the new path.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType

__version__ = "0.1.0"

# Old flat module -> its place in the layout.
MOVED_MODULES = {
    "relax": "method.relax", "attention": "method.attention", "objectives": "method.objectives",
    "checks": "method.checks", "metrics": "method.metrics",
    "generator": "interface", "reranker": "models.reranker", "tokenization": "models.tokenization",
    "fetch": "models.fetch",
    "dataset": "data.dataset", "prepare": "data.prepare",
    "train": "training.train", "strategy": "training.strategy", "tracking": "training.tracking",
    "export": "training.export",
    "evaluate": "evaluation.evaluate", "mine": "evaluation.mine", "plots": "evaluation.plots",
    "bench": "perf.bench", "traffic": "perf.traffic", "cost_model": "perf.cost_model",
    "demo": "demos.demo", "demo_smollm2": "demos.demo_smollm2", "reader": "demos.reader",
    "reading": "demos.reading", "synthetic": "demos.synthetic",
}


class _MovedModuleLoader(importlib.abc.Loader):
    """Hands out the module at its new path, so an old import gets the very same module object
    (monkeypatching through either name reaches the code that runs)."""

    def __init__(self, old: str, new: str) -> None:
        self.old, self.new = old, new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warnings.warn(f"{self.old} moved to {self.new}; import it from there", DeprecationWarning, stacklevel=3)
        module = importlib.import_module(self.new)
        self._spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = self._spec  # the import system set the old name's spec; keep the real one

    def get_code(self, fullname: str) -> None:
        # `python -m grerank_dist.train`: the entry points are `grerank COMMAND`.
        raise ImportError(f"{self.old} moved to {self.new}: run `grerank --help` (or "
                          f"`python -m grerank_dist.cli --help`) for the commands")


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        package, _, name = fullname.rpartition(".")
        if package != __name__ or name not in MOVED_MODULES:
            return None
        new = f"{__name__}.{MOVED_MODULES[name]}"
        return importlib.util.spec_from_loader(fullname, _MovedModuleLoader(fullname, new))


if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())
