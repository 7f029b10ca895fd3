"""Quantization recipes: which operations become int8, and which int8 results stay float.

Plain data (no onnx or onnxruntime at import), so the command line can offer ``--recipe``
without loading them; :mod:`coatnet_export.quantize.graph` applies a recipe to a graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx

ARITHMETIC = ("Conv", "MatMul", "Gemm")


@dataclass(frozen=True)
class Recipe:
    """Which operations static quantization turns into int8, and which int8 results stay float."""

    key: str
    """The short name ``quantize --recipe`` takes."""
    name: str
    op_types: tuple[str, ...] | None
    """Op types to quantize; None is onnxruntime's default (every op it can quantize). "Mul"
    means the squeeze-excitation gates only."""
    float_first_last: bool = False
    """Keep the first convolution (stem) and the last linear layer (head) in float."""
    split_attention: bool = False
    """Rewrite fused ONNX ``Attention`` as its MatMul / Softmax products before quantizing
    (they stay float): OpenVINO runs those faster (:func:`attention_as_matmuls`)."""
    float_outputs: tuple[str, ...] = ()
    """Op types whose int8 arithmetic hands its result on in float, with no QuantizeLinear /
    DequantizeLinear pair after it: the kernel dequantizes its own accumulators (onnxruntime's
    MatMulIntegerToFloat; OpenVINO's convolutions and fully connected layers, which fuse the
    dequantisation, the GELU and the next quantisation). The ranges are unchanged."""
    runtime: str = "onnxruntime"
    """The runtime whose kernels this layout is for (recorded as the model's ``laid_out_for``)."""

    def exclusions(self, proto: onnx.ModelProto) -> list[str]:
        """Nodes of ``proto`` of a quantized op type that this recipe keeps float."""
        from coatnet_export.quantize.graph import activation_matmuls, non_gate_muls

        excluded = activation_matmuls(proto)  # attention's q.k^T and weights.v stay float
        if self.op_types is not None and "Mul" in self.op_types:
            excluded += non_gate_muls(proto)
        arithmetic = [n.name for n in proto.graph.node if n.op_type in ARITHMETIC]
        if self.float_first_last and arithmetic:
            excluded += list(dict.fromkeys([arithmetic[0], arithmetic[-1]]))
        return excluded

    def extra_options(self) -> dict[str, object]:
        """The recipe's part of ``quantize_static``'s ``extra_options``."""
        if not self.float_outputs:
            return {}
        return {"OpTypesToExcludeOutputQuantization": list(self.float_outputs)}


POOLS_AND_GATES = (*ARITHMETIC, "MaxPool", "GlobalAveragePool", "Mul")
DEFAULT_RECIPE = Recipe(
    "onnxruntime",
    "arithmetic+pools+gates, float stem+head, float MatMul/Gemm outputs",
    POOLS_AND_GATES,
    float_first_last=True,
    float_outputs=("MatMul", "Gemm"),
)
"""For onnxruntime. Convolutions, linear layers, the pools and the squeeze-excitation gates in
int8, so the MBConv blocks stay int8 between convolutions except around GELU; the stem
convolution and the head, LayerNormalization, Softmax, GELU, attention and the bias and
residual Adds stay float. The Transformer blocks' linear layers (MatMul, or Gemm where they
have a bias) hand on float results (MatMulIntegerToFloat, QGemm with a float output): what
reads them (attention, the bias and residual Adds, GELU) is float anyway, so a QuantizeLinear
-> DequantizeLinear pair after each only cost time (coatnet_0 on an Intel Xeon with AMX, float
MatMul outputs: 1.54x -> 1.66x at batch 1, 1.59x -> 1.71x at batch 8, same digits agreement;
timm's coatnet_0_rw_224 on an AMD EPYC Zen 4, float Gemm outputs too: 3.4 % / 3.7 % faster
at batch 1 / 8). A Gemm's requantized output also met an onnxruntime 1.32 fault with int8
activations: its x86 QDQ rewrite made a QuantizeLinear whose zero point disagrees with its
output type when the Gemm fed a Reshape before attention (timm's biased q/k/v projections),
and the model did not load (scripts/bench_quantize.py --recipes compares the alternatives)."""
OPENVINO_RECIPE = Recipe(
    "openvino",
    "arithmetic+pools+gates, float stem+head, float Conv/MatMul/Gemm outputs, split attention",
    POOLS_AND_GATES,
    float_first_last=True,
    split_attention=True,
    float_outputs=ARITHMETIC,
    runtime="openvino",
)
"""For OpenVINO: the same int8 operations, but no int8 result is requantized before its
activation, and attention as its products. OpenVINO then fuses convolution -> GELU ->
quantization into one int8 kernel with an int8 output; onnxruntime cannot (its Conv would run
in float: no faster than fp32 with this graph)."""
RUNTIME_RECIPES = {"onnxruntime": DEFAULT_RECIPE, "openvino": OPENVINO_RECIPE}
"""The recipe whose graph each runtime runs fastest (``quantize --runtime``)."""
RECIPES = {
    recipe.key: recipe
    for recipe in (
        DEFAULT_RECIPE,
        OPENVINO_RECIPE,
        Recipe(
            "requantized",
            "arithmetic+pools+gates, float stem+head",
            POOLS_AND_GATES,
            float_first_last=True,
        ),
        Recipe("int8-stem-head", "arithmetic+pools+gates", POOLS_AND_GATES),
        Recipe("arithmetic", "arithmetic (Conv, MatMul, Gemm)", ARITHMETIC),
        Recipe("onnxruntime-ops", "onnxruntime's default op set", None),
    )
}
"""Every recipe by ``--recipe`` key (scripts/bench_quantize.py --recipes compares them);
``requantized`` was the onnxruntime default before int8 MatMuls handed on float."""
