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

from dataclasses import asdict, dataclass, field

from coatnet_export.errors import InputError


@dataclass(frozen=True)
class CpuPreset:
    """The int8 types for one kind of CPU, and why."""

    name: str
    arch: str
    activation_type: str
    weight_type: str
    reduce_range: bool
    reason: str


PRESETS = {
    preset.name: preset
    for preset in (
        CpuPreset(
            "x86-vnni",
            "x86_64",
            "uint8",
            "int8",
            False,
            "x86 with AVX-512 VNNI or AVX-VNNI: vpdpbusd sums u8 x s8 products in 32 bits, "
            "no saturation; full 8-bit weights",
        ),
        CpuPreset(
            "x86-avx2",
            "x86_64",
            "uint8",
            "int8",
            True,
            "x86 without VNNI: vpmaddubsw adds pairs of u8 x s8 products in 16 bits and "
            "saturates; reduce_range (7-bit weights) keeps them in range, as onnxruntime advises",
        ),
        CpuPreset(
            "arm64-dotprod",
            "arm64",
            "int8",
            "int8",
            False,
            "arm64 with the dot product (SDOT): s8 x s8 products sum in 32 bits; s8 activations "
            "and weights as onnxruntime advises for ARM; full 8-bit weights",
        ),
        CpuPreset(
            "arm64",
            "arm64",
            "int8",
            "int8",
            False,
            "arm64 without the dot product: the NEON kernels widen 8-bit products before "
            "summing them (symmetric weights), no saturation; s8 activations and weights as "
            "onnxruntime advises for ARM",
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
)
TARGET_CHOICES = ("auto", *PRESETS)
GATES = ("auto", "top1", "cosine")
"""What ``--gate`` takes: int8 against fp32 by top-1 agreement or by cosine similarity."""
"""What ``--target-cpu`` accepts."""


# --- copied verbatim into scripts/infer.py (tests/test_quantize_presets.py checks it) ---
def read_cpu() -> dict:
    """This machine's CPU: {"arch": "x86_64" | "arm64" | ..., "model": name, "int8": [the int8
    dot-product features found: avx512_vnni, avx_vnni, avx2, asimddp]}."""
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
        if platform.system() == "Darwin" and arch == "arm64":
            flags.add("asimddp")  # every Apple silicon Mac has the dot product
    wanted = ("avx512_vnni", "avx_vnni", "avx2", "asimddp")
    return {"arch": arch, "model": model, "int8": [f for f in wanted if f in flags]}


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
    overrides = {k: v for k, v in wanted.items() if v is not None and v != getattr(preset, k)}
    choice = QuantChoice(
        preset.name,
        overrides.get("activation_type", preset.activation_type),
        overrides.get("weight_type", preset.weight_type),
        overrides.get("reduce_range", preset.reduce_range),
        preset.reason,
        detected,
        overrides,
    )
    if (choice.activation_type, choice.weight_type) == ("int8", "uint8"):
        raise InputError(
            "--activation-type int8 with --weight-type uint8 is not supported by onnxruntime "
            "(use uint8 activations, or int8 weights)"
        )
    return choice
