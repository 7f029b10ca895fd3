"""The e2e target: preprocessing inside the graph, so every runtime gets the same pixels.

``model.e2e.onnx`` (and ``model.e2e.int8.onnx``) take ``image``, uint8 RGB [1, height, width, 3]
for any height and width, and return the network's ``logits`` [1, classes]. Standard ONNX ops
reproduce :class:`coatnet_export.preprocess.Preprocessing`, which is Pillow's arithmetic:

1. greyscale models: Pillow's RGB -> L (ITU-R 601-2 luma, 16-bit fixed point, truncated);
2. the size that covers ``img_size / crop_pct`` keeping the aspect ratio, computed in doubles
   from the input's Shape exactly as Python computes it (``crop_mode`` squash: the constant
   ``floor(img_size / crop_pct)``, whatever the image's aspect);
3. Pillow's separable resample, pixel for pixel: one pass per axis, each stored in 8 bits,
   horizontal first unless the height shrinks by more than twice as many pixels as the width
   (Pillow 13's order, an ``If``). A pass computes Pillow's taps and 22-bit fixed-point
   weights in doubles from the input's Shape (its filter, window and rounding, operation for
   operation), then sums the taps in int32 one at a time (a ``Loop`` of Gather, Mul, Add) and
   rounds and clips as Pillow does. ``nearest`` gathers the pixels Pillow's affine transform
   picks (its coordinates accumulate in doubles: a CumSum);
4. the centre crop (floor offsets) by Slice; 1/255, mean and std; NHWC -> NCHW. The pixels
   stay uint8 until the crop, as Pillow keeps them.

The network's nodes and weights are kept as they are (external weights are copied to
``model.e2e.onnx.data``); its metadata is kept and gains an ``e2e`` entry in ``extra``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, version_converter
from onnx.external_data_helper import uses_external_data
from PIL import Image

from coatnet_export.errors import GateFailed, InputError
from coatnet_export.export.external_data import check_model
from coatnet_export.layout import E2E_FILES, MODEL_FILE, data_file
from coatnet_export.metadata import ExportMetadata, record_artefacts
from coatnet_export.output import lock
from coatnet_export.preprocess import Preprocessing, list_images, open_image
from coatnet_export.targets import (
    PackageOptions,
    PackageOutcome,
    export_metadata,
    int8_layout_notes,
)

INPUT_NAME = "image"
PREFIX = "e2e/"
"""Every node and tensor of the preprocessing subgraph is named with this prefix."""
MIN_OPSET = 15
"""Shape gained ``start`` and ``end`` in opset 15; older models are converted."""
PRECISION_BITS = 22
"""Pillow's fixed-point weights for 8-bit images: 32 - 8 - 2 bits."""
PILLOW_LUMA = (19595.0, 38470.0, 7471.0)
"""Pillow's RGB -> L weights (0.299, 0.587, 0.114) in 16-bit fixed point."""
MAX_PIXEL_ERROR = 1.0
"""The gate: largest difference from Pillow, in 0-255 levels, before normalisation. The graph
computes Pillow's pixels exactly (0 on every image measured); the level left is for a weight
that another platform's doubles round to the other side of a tie."""
CHECK_SIZES = ((97, 143), (211, 89), (23, 31), (64, 64))
"""(height, width) of the generated check images: landscape, portrait, smaller than the model
input (upscaled), square."""


class _Builder:
    """Nodes of a graph or subgraph; constants go to the outermost graph. Names are unique."""

    def __init__(self, root: _Builder | None = None) -> None:
        self.root = root or self
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.count = 0

    def _name(self, label: str) -> str:
        self.root.count += 1
        return f"{PREFIX}{label}_{self.root.count}"

    def const(self, values: object, dtype: type, label: str = "const") -> str:
        name = self._name(label)
        tensor = numpy_helper.from_array(np.asarray(values, dtype=dtype), name)
        self.root.initializers.append(tensor)
        return name

    def op(self, op_type: str, inputs: list[str], output: str | None = None, **attrs) -> str:
        name = self._name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [output or name], name=name, **attrs))
        return output or name

    def branch(self) -> _Builder:
        """A builder for a subgraph (the branch of an If)."""
        return _Builder(self.root)

    def graph(self, output: str, rank: int) -> onnx.GraphProto:
        """This builder's nodes as a subgraph with one uint8 output (pixels)."""
        value = helper.make_tensor_value_info(output, TensorProto.UINT8, [None] * rank)
        return helper.make_graph(self.nodes, self._name("branch"), [], [value])


def preprocessing_subgraph(
    pre: Preprocessing, output: str
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes from ``image`` (uint8 NHWC RGB) to ``output`` (normalised float32 NCHW)."""
    if pre.channels not in (1, 3):
        raise InputError(
            f"the model takes {pre.channels} channels: the e2e input is an RGB image, which "
            "fits models of 1 (greyscale) or 3 channels only"
        )
    b = _Builder()
    pixels = INPUT_NAME  # uint8 until the crop: the passes move a quarter of float's bytes
    if pre.channels == 1:
        luma = _luma(b, b.op("Cast", [INPUT_NAME], to=TensorProto.FLOAT))
        pixels = b.op("Cast", [luma], to=TensorProto.UINT8)
    size = _resized_size(b, pre)
    pixels = _resample(b, pixels, size, pre.interpolation)
    pixels = _centre_crop(b, pixels, size, pre.size)
    pixels = b.op("Cast", [pixels], to=TensorProto.FLOAT)
    pixels = b.op("Div", [pixels, b.const(255.0, np.float32, "255")])
    pixels = b.op("Sub", [pixels, b.const(pre.mean, np.float32, "mean")])
    pixels = b.op("Div", [pixels, b.const(pre.std, np.float32, "std")])
    b.op("Transpose", [pixels], output=output, perm=[0, 3, 1, 2])
    return b.nodes, b.initializers


def _luma(b: _Builder, rgb: str) -> str:
    """Pillow's L = (R*19595 + G*38470 + B*7471 + 0x8000) >> 16; exact in float32."""
    weighted = b.op("Mul", [rgb, b.const(PILLOW_LUMA, np.float32, "luma")])
    total = b.op("ReduceSum", [weighted, b.const([3], np.int64, "axis")], keepdims=1)
    total = b.op("Add", [total, b.const(32768.0, np.float32, "half")])
    return b.op("Floor", [b.op("Div", [total, b.const(65536.0, np.float32, "scale")])])


def _resized_size(b: _Builder, pre: Preprocessing) -> str:
    """int64 [2]: the resized (height, width): a constant for ``squash``, else the cover."""
    if pre.crop_mode == "squash":  # the size does not depend on the image's
        return b.const(pre.resized_size(1, 1), np.int64, "squash")
    return _cover_size(b, pre)


def _cover_size(b: _Builder, pre: Preprocessing) -> str:
    """int64 [2]: the size covering ``size / crop_pct`` keeping the aspect ratio, computed in
    doubles as Preprocessing does."""
    height, width = pre.size
    hw = b.op("Cast", [b.op("Shape", [INPUT_NAME], start=1, end=3)], to=TensorProto.DOUBLE)
    target = b.const([height / pre.crop_pct, width / pre.crop_pct], np.float64, "cover")
    scale = b.op("ReduceMax", [b.op("Div", [target, hw])], keepdims=1)
    scaled = b.op("Sub", [b.op("Mul", [hw, scale]), b.const(1e-6, np.float64, "eps")])
    covered = b.op("Max", [b.op("Ceil", [scaled]), b.const(pre.size, np.float64, "size")])
    return b.op("Cast", [covered], to=TensorProto.INT64)


def _axis_length(b: _Builder, sizes: str, index: int) -> str:
    start, end = b.const([index], np.int64, "start"), b.const([index + 1], np.int64, "end")
    return b.op("Slice", [sizes, start, end])


def _resample(b: _Builder, pixels: str, size: str, interpolation: str) -> str:
    """Pillow's resize of NHWC ``pixels`` to ``size`` (int64 [2]: height, width)."""
    if interpolation == "nearest":
        return _nearest(b, pixels, size)
    if interpolation not in PILLOW_FILTERS:
        raise InputError(
            f"the export resizes with {interpolation}, which the e2e graph does not reproduce "
            f"(e2e supports {', '.join([*PILLOW_FILTERS, 'nearest'])}: re-export with "
            "--interpolation bicubic)"
        )
    height, width = _axis_length(b, size, 0), _axis_length(b, size, 1)
    branches = []
    for order in (((1, height), (2, width)), ((2, width), (1, height))):
        branch = b.branch()
        output = pixels
        for axis, length in order:
            output = _resize_pass(branch, output, axis, length, interpolation)
        branches.append(branch.graph(output, 4))
    vertical_first = _vertical_first(b, size)
    return b.op("If", [vertical_first], then_branch=branches[0], else_branch=branches[1])


def _vertical_first(b: _Builder, size: str) -> str:
    """Pillow 13's pass order: vertical first if height shrinks by more than twice the width."""
    source = b.op("Shape", [INPUT_NAME], start=1, end=3)
    shrink = b.op("Sub", [source, size])
    shrink_h, shrink_w = _axis_length(b, shrink, 0), _axis_length(b, shrink, 1)
    twice_w = b.op("Mul", [shrink_w, b.const([2], np.int64, "two")])
    return b.op(
        "And",
        [
            b.op("Greater", [shrink_h, b.const([0], np.int64, "zero")]),
            b.op("Greater", [shrink_h, twice_w]),
        ],
    )


def _resize_pass(b: _Builder, pixels: str, axis: int, length: str, interpolation: str) -> str:
    """One of Pillow's separable passes along ``axis`` (1: height, 2: width) of NHWC
    ``pixels`` to ``length`` (int64 [1]). The width pass runs on the transposed image, so
    that every pass gathers whole rows."""
    if axis == 1:
        return _resize_rows(b, pixels, length, interpolation)
    swapped = b.op("Transpose", [pixels], perm=[0, 2, 1, 3])
    resized = _resize_rows(b, swapped, length, interpolation)
    return b.op("Transpose", [resized], perm=[0, 2, 1, 3])


def _resize_rows(b: _Builder, pixels: str, length: str, interpolation: str) -> str:
    """Pillow's pass along axis 1, exactly: its taps and 22-bit fixed-point weights computed
    in doubles as Pillow computes them, the weighted sum accumulated in int32 as Pillow does
    (one tap at a time), then Pillow's rounding and clipping to 8 bits."""
    taps, weights = _pillow_coefficients(b, pixels, length, interpolation)
    shape = b.op("Shape", [pixels])
    outer = b.op("Slice", [shape, b.const([0], np.int64), b.const([1], np.int64)])
    inner = b.op("Slice", [shape, b.const([2], np.int64), b.const([4], np.int64)])
    half = np.array([1 << (PRECISION_BITS - 1)], np.int32)
    start = b.op(
        "ConstantOfShape",
        [b.op("Concat", [outer, length, inner], axis=0)],
        value=numpy_helper.from_array(half),
    )
    trips = b.op("Squeeze", [b.op("Shape", [taps], start=1, end=2)])
    source = b.op("Cast", [pixels], to=TensorProto.INT32)
    weights = b.op("Cast", [weights], to=TensorProto.INT32)
    body = _tap_sum(b.branch(), source, taps, weights)
    total = b.op("Cast", [b.op("Loop", [trips, "", start], body=body)], to=TensorProto.DOUBLE)
    stored = b.op("Floor", [b.op("Div", [total, b.const(1 << PRECISION_BITS, np.float64)])])
    low, high = b.const(0.0, np.float64, "low"), b.const(255.0, np.float64, "high")
    return b.op("Cast", [b.op("Clip", [stored, low, high])], to=TensorProto.UINT8)


def _tap_sum(body: _Builder, pixels: str, taps: str, weights: str) -> onnx.GraphProto:
    """A Loop body adding tap i: ``sum += pixels[:, taps[:, i]] * weights[:, i]`` (one tap
    at a time: all taps at once would hold ksize copies of the image)."""
    index, cond, total = (body._name(label) for label in ("i", "cond", "sum"))
    rows = body.op("Gather", [pixels, body.op("Gather", [taps, index], axis=1)], axis=1)
    weight = body.op("Gather", [weights, index], axis=1)
    weight = body.op("Unsqueeze", [weight, body.const([1, 2], np.int64, "inner")])
    added = body.op("Add", [total, body.op("Mul", [rows, weight])])
    kept = body.op("Identity", [cond])
    rank4 = [None] * 4
    inputs = [
        helper.make_tensor_value_info(index, TensorProto.INT64, []),
        helper.make_tensor_value_info(cond, TensorProto.BOOL, []),
        helper.make_tensor_value_info(total, TensorProto.INT32, rank4),
    ]
    outputs = [
        helper.make_tensor_value_info(kept, TensorProto.BOOL, []),
        helper.make_tensor_value_info(added, TensorProto.INT32, rank4),
    ]
    return helper.make_graph(body.nodes, body._name("taps"), inputs, outputs)


def _pillow_coefficients(
    b: _Builder, pixels: str, length: str, interpolation: str
) -> tuple[str, str]:
    """Pillow's ``precompute_coeffs`` and ``normalize_coeffs_8bpc`` for one axis, in doubles:
    int64 taps [out, ksize] (clamped into the image) and their fixed-point weights (double
    [out, ksize], zero outside each output pixel's window)."""
    kernel, radius = PILLOW_FILTERS[interpolation]
    d = TensorProto.DOUBLE
    in_size = b.op("Cast", [b.op("Shape", [pixels], start=1, end=2)], to=d)
    out_size = b.op("Cast", [length], to=d)
    scale = b.op("Div", [in_size, out_size])
    filterscale = b.op("Max", [scale, b.const([1.0], np.float64, "one")])
    support = b.op("Mul", [filterscale, b.const([radius], np.float64, "radius")])
    ksize = b.op(
        "Add",
        [
            b.op("Mul", [b.op("Ceil", [support]), b.const([2.0], np.float64)]),
            b.const([1.0], np.float64),
        ],
    )
    zero, step, half = (b.const(v, np.float64) for v in (0.0, 1.0, 0.5))
    outputs = b.op("Range", [zero, b.op("Squeeze", [out_size]), step])
    center = b.op("Mul", [b.op("Add", [outputs, half]), scale])
    first = b.op(
        "Max", [b.op("Floor", [b.op("Add", [b.op("Sub", [center, support]), half])]), zero]
    )
    end = b.op(
        "Min", [b.op("Floor", [b.op("Add", [b.op("Add", [center, support]), half])]), in_size]
    )
    column = b.const([1], np.int64, "column")
    k = b.op(
        "Unsqueeze", [b.op("Range", [zero, b.op("Squeeze", [ksize]), step]), b.const([0], np.int64)]
    )
    x = b.op("Add", [b.op("Unsqueeze", [first, column]), k])
    inside = b.op("Less", [x, b.op("Unsqueeze", [end, column])])
    offset = b.op("Add", [b.op("Sub", [x, b.op("Unsqueeze", [center, column])]), half])
    argument = b.op("Mul", [offset, b.op("Div", [step, filterscale])])  # Pillow's ss
    weight = b.op("Where", [inside, kernel(b, argument), zero])
    weight = b.op("Div", [weight, b.op("ReduceSum", [weight, column], keepdims=1)])
    fixed = b.op("Mul", [weight, b.const(float(1 << PRECISION_BITS), np.float64)])
    rounded = b.op(
        "Where",
        [
            b.op("Less", [fixed, zero]),
            b.op("Ceil", [b.op("Sub", [fixed, half])]),
            b.op("Floor", [b.op("Add", [fixed, half])]),
        ],
    )
    last = b.op("Sub", [in_size, step])
    taps = b.op("Cast", [b.op("Min", [x, last])], to=TensorProto.INT64)
    return taps, rounded


def _bicubic(b: _Builder, x: str) -> str:
    """Pillow's bicubic filter (a = -0.5), operation for operation."""
    x = b.op("Abs", [x])
    one, two = b.const(1.0, np.float64), b.const(2.0, np.float64)
    near = b.op(
        "Mul",
        [b.op("Sub", [b.op("Mul", [b.const(1.5, np.float64), x]), b.const(2.5, np.float64)]), x],
    )
    near = b.op("Add", [b.op("Mul", [near, x]), one])
    far = b.op(
        "Add",
        [b.op("Mul", [b.op("Sub", [x, b.const(5.0, np.float64)]), x]), b.const(8.0, np.float64)],
    )
    far = b.op(
        "Mul",
        [b.op("Sub", [b.op("Mul", [far, x]), b.const(4.0, np.float64)]), b.const(-0.5, np.float64)],
    )
    zero = b.const(0.0, np.float64)
    return b.op(
        "Where", [b.op("Less", [x, one]), near, b.op("Where", [b.op("Less", [x, two]), far, zero])]
    )


def _triangle(b: _Builder, x: str) -> str:
    """Pillow's bilinear filter."""
    x = b.op("Abs", [x])
    one = b.const(1.0, np.float64)
    return b.op("Where", [b.op("Less", [x, one]), b.op("Sub", [one, x]), b.const(0.0, np.float64)])


PILLOW_FILTERS = {"bicubic": (_bicubic, 2.0), "bilinear": (_triangle, 1.0)}
"""Pillow's filters the graph reproduces, with their support (radius) at scale 1."""


def _nearest(b: _Builder, pixels: str, size: str) -> str:
    """The pixels Pillow's nearest resize reads: floor of s/2 + k*s, summed in doubles."""
    source = b.op("Shape", [INPUT_NAME], start=1, end=3)
    for axis, index in ((1, 0), (2, 1)):
        length_in = _axis_length(b, source, index)
        length_out = _axis_length(b, size, index)
        step = b.op(
            "Div",
            [
                b.op("Cast", [length_in], to=TensorProto.DOUBLE),
                b.op("Cast", [length_out], to=TensorProto.DOUBLE),
            ],
        )
        first = b.op("Mul", [step, b.const([0.5], np.float64, "half")])
        rest = b.op("Expand", [step, b.op("Sub", [length_out, b.const([1], np.int64, "one")])])
        coords = b.op("CumSum", [b.op("Concat", [first, rest], axis=0), b.const(0, np.int64)])
        index_in = b.op("Cast", [b.op("Floor", [coords])], to=TensorProto.INT64)
        last = b.op("Sub", [length_in, b.const([1], np.int64, "one")])
        pixels = b.op("Gather", [pixels, b.op("Min", [index_in, last])], axis=axis)
    return pixels


def _centre_crop(b: _Builder, pixels: str, size: str, crop: tuple[int, int]) -> str:
    target = b.const(crop, np.int64, "crop")
    starts = b.op("Div", [b.op("Sub", [size, target]), b.const([2, 2], np.int64, "two")])
    ends = b.op("Add", [starts, target])
    return b.op("Slice", [pixels, starts, ends, b.const([1, 2], np.int64, "axes")])


def image_input() -> onnx.ValueInfoProto:
    """``image``: uint8 [1, height, width, 3]."""
    return helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, [1, "height", "width", 3])


def preprocessing_model(pre: Preprocessing) -> onnx.ModelProto:
    """The preprocessing alone: ``image`` -> ``pixels`` [1, channels, height, width] float32."""
    nodes, constants = preprocessing_subgraph(pre, "pixels")
    pixels = helper.make_tensor_value_info(
        "pixels", TensorProto.FLOAT, [1, pre.channels, *pre.size]
    )
    graph = helper.make_graph(nodes, "preprocessing", [image_input()], [pixels], constants)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", MIN_OPSET)])


def attach_preprocessing(network: onnx.ModelProto, pre: Preprocessing) -> onnx.ModelProto:
    """``network`` (loaded without its weights) with the preprocessing in front of its input."""
    if _default_opset(network) < MIN_OPSET:
        network = version_converter.convert_version(network, MIN_OPSET)
    network.ir_version = max(network.ir_version, 8)
    graph = network.graph
    weights = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in weights]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise InputError("the model must have one input and one output to take an e2e input")
    if any(n.name.startswith(PREFIX) for n in graph.node):
        raise InputError("the model already has e2e preprocessing (package its source model)")
    nodes, constants = preprocessing_subgraph(pre, inputs[0].name)
    graph.input.remove(inputs[0])
    graph.input.insert(0, image_input())
    existing = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + existing)
    graph.initializer.extend(constants)
    for batch in graph.output[0].type.tensor_type.shape.dim[:1]:
        batch.dim_value = 1
    return network


def _default_opset(model: onnx.ModelProto) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def write_e2e(source: Path, target: Path, metadata: ExportMetadata) -> Path | None:
    """Write the e2e model of ``source`` to ``target``; returns its weights file, if any."""
    pre = metadata.preprocessing()
    model = attach_preprocessing(onnx.load(str(source), load_external_data=False), pre)
    external = [t for t in model.graph.initializer if uses_external_data(t)]
    weights = None
    if external:
        weights = data_file(target)
        shutil.copyfile(data_file(source), weights)
        for tensor in external:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = weights.name
    props = {p.key: p.value for p in model.metadata_props}
    extra = json.loads(props.get("extra", "{}"))
    extra["e2e"] = {
        "source": source.name,
        "input": f"{INPUT_NAME}: uint8 RGB [1, height, width, 3], any height and width",
        "preprocessing": f"in the graph: Pillow's resize (8-bit passes, {pre.crop_mode}), "
        "centre crop, normalise",
    }
    props.update(extra=json.dumps(extra), opset=json.dumps(_default_opset(model)))
    del model.metadata_props[:]
    helper.set_model_props(model, props)
    onnx.save(model, str(target))
    check_model(target)
    return weights


# --- measuring the agreement with Python (Pillow) preprocessing ---


def check_images() -> list[tuple[str, Image.Image]]:
    """Generated RGB photos-like images: smooth colour fields with edges and fine noise."""
    rng = np.random.default_rng(0)
    images = []
    for height, width in CHECK_SIZES:
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        field = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), np.int16)
        noise = rng.integers(-24, 25, (height, width, 3))
        pixels = np.clip(field + noise, 0, 255).astype(np.uint8)
        images.append((f"generated {height}x{width}", Image.fromarray(pixels)))
    return images


def read_images(paths: Iterable[Path]) -> list[tuple[str, Image.Image]]:
    """Decoded images from files and folders; InputError when none can be read."""
    images = []
    for path in list_images(paths):
        try:
            images.append((str(path), open_image(path)))
        except (OSError, ValueError, Image.DecompressionBombError):
            continue
    if not images:
        raise InputError("no readable image among --check-images (give image files or folders)")
    return images


def rgb_pixels(image: Image.Image) -> np.ndarray:
    """What an e2e model takes for a decoded image: uint8 [1, height, width, 3] RGB."""
    return np.asarray(image.convert("RGB"), dtype=np.uint8)[None]


@dataclass
class PreprocessingAgreement:
    """How an e2e model agrees with Pillow preprocessing plus its source model."""

    model: str
    source: str
    images: int
    pixel_max: float
    """Largest preprocessing difference, in 0-255 levels."""
    pixel_mean: float
    logit_max_rel: float
    """Largest |e2e - source| logit, relative to the largest |logit|, over the images."""
    top1: float
    top1_prob_max_delta: float
    """Largest change of the source's top-1 class probability."""

    def as_row(self) -> dict[str, object]:
        return asdict(self)


def pixel_errors(pre: Preprocessing, images: list[tuple[str, Image.Image]]) -> list[np.ndarray]:
    """|graph - Pillow| per image, in 0-255 levels, for the preprocessing alone."""
    import onnxruntime as ort

    session = ort.InferenceSession(
        preprocessing_model(pre).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    levels = np.asarray(pre.std, np.float64)[:, None, None] * 255.0
    errors = []
    for _, image in images:
        graph = session.run(None, {INPUT_NAME: rgb_pixels(image)})[0][0]
        errors.append(np.abs(graph.astype(np.float64) - pre(image)) * levels)
    return errors


def measure(
    e2e: Path,
    source: Path,
    pre: Preprocessing,
    images: list[tuple[str, Image.Image]],
    threads: int | None = None,
) -> PreprocessingAgreement:
    """Run ``e2e`` on decoded pixels and ``source`` on Pillow preprocessing; compare."""
    from coatnet_export.runtimes.onnxruntime import make_session
    from coatnet_export.validate import Gates, compare

    e2e_session, source_session = make_session(e2e, threads), make_session(source, threads)
    source_input = source_session.get_inputs()[0].name
    errors = pixel_errors(pre, images)
    reference, actual = [], []
    for _, image in images:
        actual.append(e2e_session.run(None, {INPUT_NAME: rgb_pixels(image)})[0])
        reference.append(source_session.run(None, {source_input: pre(image)[None]})[0])
    ref, act = np.concatenate(reference), np.concatenate(actual)
    per_image = [compare("e2e", r, a, Gates()) for r, a in zip(reference, actual, strict=True)]
    top = ref.argmax(axis=1)
    rows = np.arange(len(top))
    delta = np.abs(_softmax(act)[rows, top] - _softmax(ref)[rows, top])
    return PreprocessingAgreement(
        e2e.name,
        source.name,
        len(images),
        float(max(e.max() for e in errors)),
        float(np.mean([e.mean() for e in errors])),
        max(r.max_rel for r in per_image),
        float((act.argmax(axis=1) == top).mean()),
        float(delta.max()),
    )


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


# --- the target ---


def build(request: PackageOptions) -> PackageOutcome:
    """Write model.e2e.onnx (and model.e2e.int8.onnx) into the export folder, checked."""
    export_dir = request.export_dir
    if request.output is not None:
        raise InputError(
            "--target e2e writes into the export folder; --output is for the web and triton targets"
        )
    metadata = export_metadata(export_dir)
    _check_batch(metadata)
    sources = [export_dir / name for name in E2E_FILES if (export_dir / name).is_file()]
    targets = [export_dir / E2E_FILES[s.name] for s in sources]
    existing = [t.name for t in targets if t.exists()]
    if existing and not request.force:
        raise InputError(
            f"{', '.join(existing)} already exist(s) in {export_dir}; pass --force to replace"
        )
    paths = request.options.get("check_images") or ()
    images = read_images(paths) if paths else check_images()
    pre = metadata.preprocessing()
    preprocessing_subgraph(pre, "pixels")  # bad settings fail before anything is written
    with lock(export_dir / E2E_FILES[MODEL_FILE], "DIR"):
        result = _write_checked(export_dir, sources, targets, metadata, images, request)
        record_artefacts(export_dir, _artefacts(result.files, export_dir))
    result.notes += int8_layout_notes(export_dir, "onnxruntime")  # e2e runs in onnxruntime only
    result.notes.append(
        f"measured on {len(images)} "
        + ("given image(s)" if paths else "generated image(s) (--check-images for your photos)")
        + "; run the e2e model with: python scripts/infer.py "
        + f"{export_dir / E2E_FILES[MODEL_FILE]} IMAGES"
    )
    return result


def _write_checked(
    export_dir: Path,
    sources: list[Path],
    targets: list[Path],
    metadata: ExportMetadata,
    images: list[tuple[str, Image.Image]],
    request: PackageOptions,
) -> PackageOutcome:
    """Stage each e2e model, measure it against its source, and rename them into place."""
    pre = metadata.preprocessing()
    result = PackageOutcome()
    stage = Path(tempfile.mkdtemp(prefix=".e2e.partial-", dir=export_dir))
    try:
        staged: list[Path] = []
        for source, target in zip(sources, targets, strict=True):
            staged_model = stage / target.name
            weights = write_e2e(source, staged_model, metadata)
            agreement = measure(staged_model, source, pre, images, request.options.get("threads"))
            _gate(agreement)
            result.table.append({**agreement.as_row(), "bytes": _bytes(staged_model, weights)})
            staged += [p for p in (weights, staged_model) if p is not None]
        result.files = _publish(staged, export_dir)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return result


def _check_batch(metadata: ExportMetadata) -> None:
    if metadata.batch not in ("dynamic", "1"):
        raise InputError(
            f"the export has a fixed batch of {metadata.batch}; an e2e model takes one image "
            "(re-export with --batch dynamic or --batch 1)"
        )


def _gate(agreement: PreprocessingAgreement) -> None:
    if agreement.pixel_max > MAX_PIXEL_ERROR + 1e-3:
        raise GateFailed(
            f"{agreement.model}: the in-graph preprocessing differs from Pillow by up to "
            f"{agreement.pixel_max:.2f} levels (gate {MAX_PIXEL_ERROR}); nothing was written"
        )


def _bytes(model: Path, weights: Path | None) -> int:
    return model.stat().st_size + (weights.stat().st_size if weights else 0)


def _publish(staged: list[Path], export_dir: Path) -> list[Path]:
    """Rename the staged files into ``export_dir`` (weights before their model)."""
    published = []
    for path in staged:
        final = export_dir / path.name
        path.replace(final)
        published.append(final)
    for model in (p for p in published if p.suffix == ".onnx"):
        stale = data_file(model)
        if stale.exists() and stale not in published:
            stale.unlink()
    return published


def _artefacts(files: list[Path], export_dir: Path) -> dict[str, tuple[str, str]]:
    purposes = {}
    for path in files:
        name = path.relative_to(export_dir).as_posix()
        if name.endswith(".data"):
            purposes[name] = ("e2e weights", f"the weights of {name.removesuffix('.data')}")
        else:
            precision = "int8" if ".int8." in name else "fp32"
            purposes[name] = (
                f"e2e {precision}",
                "uint8 RGB image [1, H, W, 3] in, logits out: preprocessing in the graph "
                "(mobile, C++, browser)",
            )
    return purposes
