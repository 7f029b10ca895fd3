"""int8 quantization of an export: the API that the command line and the scripts use.

    QuantOptions -> run_quantize(options, progress) -> QuantOutcome (.report: QuantReport)

The modules, by concern:
    options.py    QuantOptions (asked), QuantPlan (resolved once: types, recipe, gate)
    source.py     the fp32 model checked, the calibration and held-out inputs
    fallback.py   quantizing once, and the loop that returns nodes to float until the gate passes
    outputs.py    the work folder, and model.int8.onnx / quantization.json / manifest.json
    report.py     what quantization.json records, the table the command prints
    pipeline.py   run_quantize: the steps above, in order
    calibrate.py, evaluate.py, graph.py, recipes.py, presets.py: the parts the steps use

Names are imported on first use, so that ``coatnet_export.quantize.presets`` (the command
line's choices) loads without onnxruntime.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_HOMES = {
    "QuantOptions": "options",
    "QuantPlan": "options",
    "check_options": "options",
    "run_quantize": "pipeline",
    "QuantOutcome": "report",
    "QuantReport": "report",
    "quantize_once": "fallback",
    "SessionPlan": "calibrate",
    "Inputs": "calibrate",
    "calibrate_ranges": "calibrate",
    "image_inputs": "calibrate",
    "agreement": "evaluate",
    "latency": "evaluate",
    "logits": "evaluate",
    "prepare": "graph",
    "RECIPES": "recipes",
    "Recipe": "recipes",
    "GATES": "presets",
    "PRESETS": "presets",
    "TARGET_CHOICES": "presets",
    "choose_types": "presets",
    "fastest_int8": "presets",
    "int8_warnings": "presets",
    "judge": "presets",
    "preset_for": "presets",
    "read_cpu": "presets",
    "saturates_on": "presets",
}
__all__ = [
    "GATES",
    "PRESETS",
    "RECIPES",
    "TARGET_CHOICES",
    "Inputs",
    "QuantOptions",
    "QuantOutcome",
    "QuantPlan",
    "QuantReport",
    "Recipe",
    "SessionPlan",
    "agreement",
    "calibrate_ranges",
    "check_options",
    "choose_types",
    "fastest_int8",
    "image_inputs",
    "int8_warnings",
    "judge",
    "latency",
    "logits",
    "prepare",
    "preset_for",
    "quantize_once",
    "read_cpu",
    "run_quantize",
    "saturates_on",
]


def __getattr__(name: str) -> object:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)


if TYPE_CHECKING:
    from coatnet_export.quantize.calibrate import (
        Inputs,
        SessionPlan,
        calibrate_ranges,
        image_inputs,
    )
    from coatnet_export.quantize.evaluate import agreement, latency, logits
    from coatnet_export.quantize.fallback import quantize_once
    from coatnet_export.quantize.graph import prepare
    from coatnet_export.quantize.options import QuantOptions, QuantPlan, check_options
    from coatnet_export.quantize.pipeline import run_quantize
    from coatnet_export.quantize.presets import (
        GATES,
        PRESETS,
        TARGET_CHOICES,
        choose_types,
        fastest_int8,
        int8_warnings,
        judge,
        preset_for,
        read_cpu,
        saturates_on,
    )
    from coatnet_export.quantize.recipes import RECIPES, Recipe
    from coatnet_export.quantize.report import QuantOutcome, QuantReport
