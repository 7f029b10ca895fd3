"""coatnet-export: ONNX export, parity validation and int8 quantization of CoAtNet classifiers."""

__version__ = "0.1.0"
