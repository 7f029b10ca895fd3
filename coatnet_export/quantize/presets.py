"""The CPU an int8 model is quantized for: presets, this machine's CPU, and the check that a
model's recorded target suits the CPU it runs on.

The preset decides the activation and weight types and ``reduce_range``, following
onnxruntime's guidance per CPU and the integer kernels it runs there (MLAS):

- x86 with VNNI (AVX-512 VNNI or AVX-VNNI): ``vpdpbusd`` sums u8 x s8 products in 32 bits.
- x86 without VNNI (AVX2, AVX-512 without VNNI): ``vpmaddubsw`` adds pairs of u8 x s8
  products in 16 bits with saturation; ``reduce_range`` (7-bit weights) keeps a pair in range.
- arm64: onnxruntime advises s8 activations and weights; with the dot product (``asimddp``,
  SDOT) four products sum in 32 bits, without it the NEON kernels widen before they sum
  (weights are symmetric, within +-127), so neither needs ``reduce_range``.

:func:`read_cpu` and :func:`int8_warnings` are copied verbatim into scripts/infer.py, which must
stay free of this package (tests/test_quantize_presets.py checks that the copies are equal).
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, field

from coatnet_export.errors import InputError


@dataclass(frozen=True)
class CpuPreset:
    """The int8 types for one class of CPU, why, and the fastest way to run int8 there."""

    name: str
    arch: str
    activation_type: str
    weight_type: str
    reduce_range: bool
    reason: str
    saturates: bool = False
    """Whether this class's u8 x s8 kernels add pairs of products in 16 bits with saturation
    (x86 without VNNI), so that full-range 8-bit weights can overflow there."""
    runtime: str = "onnxruntime"
    """The fastest int8 runtime measured on this class, at the gate."""
    recipes: tuple[tuple[str, str], ...] = (
        ("onnxruntime", "onnxruntime"),
        ("openvino", "openvino"),
    )
    """(runtime, recipe key of quantize/graph.RECIPES): the fastest recipe in each runtime."""
    measured: str = ""
    """Where :attr:`runtime` and :attr:`recipes` come from (docs/benchmarks.md)."""

    def recipe_for(self, runtime: str) -> str:
        """The recipe key that is fastest for this class in ``runtime``."""
        return dict(self.recipes)[runtime]


VNNI_REASON = "vpdpbusd sums u8 x s8 products in 32 bits, no saturation; full 8-bit weights"
ARM_TYPES = "s8 activations and weights as onnxruntime advises for ARM"
PRESETS = {
    preset.name: preset
    for preset in (
        CpuPreset(
            "x86-amx",
            "x86_64",
            "uint8",
            "int8",
            False,
            f"x86 with AMX-INT8 (and AVX-512 VNNI): tile products and {VNNI_REASON}",
            runtime="openvino",
            measured="Intel Xeon (AMX), 2 threads, coatnet_0: OpenVINO's layout 2.29-2.35x / "
            "2.93-3.04x onnxruntime fp32 at batch 1 / 8; onnxruntime's own recipe 1.66-1.74x",
        ),
        CpuPreset(
            "x86-vnni",
            "x86_64",
            "uint8",
            "int8",
            False,
            f"x86 with AVX-512 VNNI or AVX-VNNI: {VNNI_REASON}",
            runtime="openvino",
            measured="AMD EPYC Zen 4 (AVX-512 VNNI), 2 threads, coatnet_0, 2026-12-07: "
            "OpenVINO's layout 2.19x / 2.16x onnxruntime fp32 at batch 1 / 8, onnxruntime's "
            "recipe 1.94x / 1.78x (scripts/bench_runtimes.py; docs/cpu-classes.md)",
        ),
        CpuPreset(
            "x86-avx2",
            "x86_64",
            "uint8",
            "int8",
            True,
            "x86 without VNNI: vpmaddubsw adds pairs of u8 x s8 products in 16 bits and "
            "saturates; reduce_range (7-bit weights) keeps them in range, as onnxruntime advises",
            saturates=True,
            measured="AMD EPYC (AVX2 only), 2 threads, coatnet_0: onnxruntime int8 1.23x / "
            "1.33x onnxruntime fp32 at batch 1 / 8, OpenVINO int8 0.82x / 0.83x (and batch-"
            "dependent with two threads, see runtimes/openvino.py)",
        ),
        CpuPreset(
            "arm64-dotprod",
            "arm64",
            "int8",
            "int8",
            False,
            f"arm64 with the dot product (SDOT): s8 x s8 products sum in 32 bits; {ARM_TYPES}; "
            "full 8-bit weights",
            measured="onnxruntime: the runtime the project runs on arm64 (checked under "
            "emulation, not timed)",
        ),
        CpuPreset(
            "arm64",
            "arm64",
            "int8",
            "int8",
            False,
            "arm64 without the dot product: the NEON kernels widen 8-bit products before "
            f"summing them (symmetric weights), no saturation; {ARM_TYPES}",
            measured="onnxruntime: the runtime the project runs on arm64 (checked under "
            "emulation, not timed)",
        ),
    )
}
GENERIC = CpuPreset(
    "generic",
    "other",
    "uint8",
    "int8",
    True,
    "no known int8 dot-product instructions on this CPU: reduce_range for safety",
    measured="not measured",
)
TARGET_CHOICES = ("auto", *PRESETS)
GATES = ("auto", "top1", "cosine")
"""What ``--gate`` takes: int8 against fp32 by top-1 agreement or by cosine similarity."""
"""What ``--target-cpu`` accepts."""


# --- copied verbatim into scripts/infer.py (tests/test_quantize_presets.py checks it) ---
def read_cpu() -> dict:
    """This machine's CPU as its int8 kernels see it: {"arch": "x86_64" | "arm64" | ...,
    "model": name, "int8": [the int8 features found: amx_int8, avx512_vnni, avx_vnni, avx2,
    asimddp]}.

    The instruction sets come from numpy's runtime dispatch (cpuid on x86, the kernel's HWCAP
    on arm64), which is what onnxruntime's own detection reads too, so a CPU emulated by
    ``qemu -cpu MODEL`` is seen as the emulated one; /proc/cpuinfo (the host's, under qemu)
    adds only what numpy does not report, AVX-VNNI and AMX, where numpy confirms the
    instruction set they extend."""
    import platform

    arch = platform.machine().lower()
    arch = {"amd64": "x86_64", "x64": "x86_64", "aarch64": "arm64", "armv8l": "arm64"}.get(
        arch, arch
    )
    model, flags = platform.processor() or arch, set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    flags.update(value.split())
                elif key.strip() == "model name":
                    model = value.strip()
    except OSError:  # not Linux
        pass
    try:
        umath = importlib.import_module("numpy._core._multiarray_umath")
    except ImportError:  # numpy < 2
        umath = importlib.import_module("numpy.core._multiarray_umath")
    isa = umath.__cpu_features__
    found = {
        "amx_int8": isa.get("AVX512VNNI") and "amx_int8" in flags,
        "avx512_vnni": isa.get("AVX512VNNI"),
        "avx_vnni": isa.get("AVX2") and "avx_vnni" in flags,
        "avx2": isa.get("AVX2"),
        "asimddp": isa.get("ASIMDDP"),
    }
    return {"arch": arch, "model": model, "int8": [f for f, there in found.items() if there]}


def int8_warnings(quantization: dict, cpu: dict) -> list[str]:
    """Ways in which running a model quantized as ``quantization`` (its recorded metadata) on
    ``cpu`` (from read_cpu) costs accuracy; empty when the CPU suits the model."""
    weight_type = quantization.get("weight_type")
    reduce_range = quantization.get("reduce_range")
    target = quantization.get("target_cpu", "an unrecorded CPU")
    vnni = "avx512_vnni" in cpu["int8"] or "avx_vnni" in cpu["int8"]
    warnings = []
    if cpu["arch"] == "x86_64" and not vnni and weight_type == "int8" and reduce_range is False:
        warnings.append(
            f"this CPU ({cpu['model']}) has no VNNI: onnxruntime adds pairs of 8-bit products "
            f"in 16 bits here, which can saturate with the full-range int8 weights of this "
            f"model (quantized for {target}); re-quantize with --target-cpu x86-avx2 to deploy "
            "on it"
        )
    if reduce_range and (vnni or cpu["arch"] == "arm64"):
        warnings.append(
            f"this model keeps 7-bit weights (reduce_range, quantized for {target}), which "
            f"this CPU ({cpu['model']}) does not need: re-quantize with --target-cpu auto on "
            "it for full 8-bit weights"
        )
    return warnings


# --- end of the copy ---


def preset_for(cpu: dict) -> CpuPreset:
    """The preset that suits ``cpu`` (from :func:`read_cpu`)."""
    if cpu["arch"] == "x86_64":
        if "amx_int8" in cpu["int8"]:
            return PRESETS["x86-amx"]
        vnni = "avx512_vnni" in cpu["int8"] or "avx_vnni" in cpu["int8"]
        return PRESETS["x86-vnni" if vnni else "x86-avx2"]
    if cpu["arch"] == "arm64":
        return PRESETS["arm64-dotprod" if "asimddp" in cpu["int8"] else "arm64"]
    return GENERIC


@dataclass
class QuantChoice:
    """The types a model is quantized with, the CPU they were chosen for, and why."""

    target_cpu: str
    activation_type: str
    weight_type: str
    reduce_range: bool
    reason: str
    detected: str | None = None
    """For ``--target-cpu auto``: this machine's CPU and int8 features."""
    overrides: dict[str, object] = field(default_factory=dict)
    """Types set on the command line over the preset's."""
    fastest_runtime: str = "onnxruntime"
    """The fastest int8 runtime measured on the target's class (CpuPreset.runtime)."""
    recipes: dict[str, str] = field(default_factory=dict)
    """Runtime -> the recipe that is fastest for the target's class in it."""
    measured: str = ""
    """Where the fastest runtime and recipes come from."""

    @property
    def saturates(self) -> bool:
        """Whether the target's kernels can saturate on these types (x86 without VNNI with
        full-range 8-bit weights)."""
        return saturates_on(self.target_cpu, self)

    def describe(self) -> str:
        """One line: the target, the types and the reason."""
        auto = f"auto = {self.target_cpu} (this machine: {self.detected})" if self.detected else ""
        target = auto or self.target_cpu
        overridden = f"; overridden on the command line: {self.overrides}" if self.overrides else ""
        return (
            f"target CPU {target}: activations {self.activation_type}, weights "
            f"{self.weight_type}, reduce_range {self.reduce_range} ({self.reason}){overridden}"
        )

    def as_dict(self) -> dict:
        return asdict(self)


def choose_types(
    target: str,
    activation_type: str | None = None,
    weight_type: str | None = None,
    reduce_range: bool | None = None,
    cpu: dict | None = None,
) -> QuantChoice:
    """The types for ``--target-cpu`` ``target`` (a preset name or ``auto`` = ``cpu``, by
    default this machine's), with the command line's overrides applied and recorded."""
    detected = None
    if target == "auto":
        cpu = cpu or read_cpu()
        preset = preset_for(cpu)
        detected = f"{cpu['model']}, {' '.join(cpu['int8']) or 'no int8 dot-product features'}"
    elif target in PRESETS:
        preset = PRESETS[target]
    else:
        raise InputError(
            f"unknown --target-cpu {target!r} (choose one of {', '.join(TARGET_CHOICES)})"
        )
    wanted = {
        "activation_type": activation_type,
        "weight_type": weight_type,
        "reduce_range": reduce_range,
    }
    overrides: dict[str, object] = {
        k: v for k, v in wanted.items() if v is not None and v != getattr(preset, k)
    }
    choice = QuantChoice(
        preset.name,
        activation_type if activation_type is not None else preset.activation_type,
        weight_type if weight_type is not None else preset.weight_type,
        reduce_range if reduce_range is not None else preset.reduce_range,
        preset.reason,
        detected,
        overrides,
        preset.runtime,
        dict(preset.recipes),
        preset.measured,
    )
    if (choice.activation_type, choice.weight_type) == ("int8", "uint8"):
        raise InputError(
            "--activation-type int8 with --weight-type uint8 is not supported by onnxruntime "
            "(use uint8 activations, or int8 weights)"
        )
    return choice


def saturates_on(preset_name: str, choice: QuantChoice) -> bool:
    """Whether the int8 kernels of the class ``preset_name`` can saturate on ``choice``'s
    types (x86 without VNNI with full-range 8-bit weights)."""
    preset = PRESETS.get(preset_name, GENERIC)
    return preset.saturates and choice.weight_type == "int8" and not choice.reduce_range


@dataclass(frozen=True)
class Judgement:
    """How the gate measures an int8 model on this machine for the CPU it is quantized for."""

    exact: bool
    """True: the QDQ graph runs unfused in onnxruntime (each product dequantized and summed in
    float), which is the integer arithmetic without saturation that the target computes;
    False: this machine's own int8 kernels, in the runtime the model is for."""
    reason: str

    @property
    def label(self) -> str:
        return "exact integer arithmetic (QDQ unfused)" if self.exact else "this machine's kernels"


def judge(choice: QuantChoice, cpu: dict | None = None) -> Judgement:
    """How to measure ``choice``'s model on ``cpu`` (by default this machine's) so that the
    gate passes or fails as it would on the target: natively where this machine's kernels
    compute as the target's, else exactly (this machine saturates where the target does not)."""
    cpu = cpu or read_cpu()
    here = preset_for(cpu)
    here_saturates = saturates_on(here.name, choice)
    if here_saturates and not choice.saturates:
        return Judgement(
            True,
            f"this machine ({here.name}) adds pairs of u8 x s8 products in 16 bits with "
            f"saturation, {choice.target_cpu} does not: measured as {choice.target_cpu} "
            "computes, the QDQ graph unfused in onnxruntime",
        )
    if choice.saturates and not here_saturates:
        return Judgement(
            False,
            f"{choice.target_cpu} can saturate with these full-range weights, this machine "
            f"({here.name}) does not: measured on this machine's kernels, which is optimistic "
            "for the target",
        )
    return Judgement(
        False, f"this machine's int8 kernels ({here.name}) compute as {choice.target_cpu}'s"
    )


def fastest_int8(target_cpu: str | None = None) -> str:
    """One line: the fastest int8 runtime and recipe measured for ``target_cpu`` (a preset
    name; None: this machine's class), and where that comes from."""
    preset = PRESETS.get(target_cpu or "") or preset_for(read_cpu())
    recipe = preset.recipe_for(preset.runtime)
    return (
        f"the fastest int8 for {preset.name} is {preset.runtime} with recipe {recipe} "
        f"(quantize --target-cpu {preset.name} --runtime {preset.runtime}): {preset.measured}"
    )
