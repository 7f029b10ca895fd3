"""The export folder: the name of every file the commands write in it, in one place.

model.onnx (+ model.onnx.data)            export: the fp32 network
model.int8.onnx (+ model.int8.onnx.data)  quantize: the int8 network
manifest.json                             export, updated by quantize and package
validation.json                           export / validate: parity with PyTorch
quantization.json                         quantize: agreement, latency, fallback
model.e2e.onnx, model.e2e.int8.onnx       package --target e2e: preprocessing inside
ort/, web/, triton/                       package's other targets
"""

from __future__ import annotations

from pathlib import Path

MODEL_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
MANIFEST_FILE = "manifest.json"
VALIDATION_FILE = "validation.json"
QUANTIZATION_FILE = "quantization.json"
E2E_FILE = "model.e2e.onnx"
E2E_INT8_FILE = "model.e2e.int8.onnx"
MODELS = {"fp32": MODEL_FILE, "int8": INT8_FILE}
"""The networks of an export, by the name --model options take."""
E2E_FILES = {MODEL_FILE: E2E_FILE, INT8_FILE: E2E_INT8_FILE}
"""The e2e model written for each network of an export."""


def data_name(model_name: str) -> str:
    """The external-data file kept beside a model: ``model.onnx.data``."""
    return f"{model_name}.data"


def data_file(model_path: Path) -> Path:
    """Where a model's external weights live: ``model.onnx.data`` beside ``model.onnx``."""
    return model_path.with_name(data_name(model_path.name))
