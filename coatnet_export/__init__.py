"""coatnet-export: ONNX export, validation and edge deployment of CoAtNet image classifiers."""

import importlib.util
import sys
from importlib.machinery import PathFinder
from pathlib import Path

__version__ = "0.1.0"


def _bind_reference_models() -> None:
    """Bind the name ``models`` to our reference package now, lazily (torch loads on first use).

    onnxruntime.quantization imports onnxruntime.transformers, which appends its own folder,
    holding a ``models`` namespace, to ``sys.path``; in an editable install that would shadow
    ours for any later ``import models`` (also in spawned processes, which inherit that path).
    ``models`` is looked up beside this package only. This is importlib's lazy-import recipe.
    """
    if "models" in sys.modules:
        return
    spec = PathFinder.find_spec("models", [str(Path(__file__).resolve().parents[1])])
    if spec is None or spec.loader is None:
        return
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules["models"] = module
    spec.loader.exec_module(module)


_bind_reference_models()
