"""Will it fit? A lower bound on the memory an export needs, checked before any allocation.

The bound counts what must exist at once while the reference runs: the weights, each attention
block's relative index (N x N int64, built even on the meta device) and baked bias
(heads x N x N float32), and the largest activations of one forward pass at the batch used.
Real use is higher; the point is to refuse sizes that cannot work (an --img-size that asks for
exabytes, a --batch of 100000) in a second instead of minutes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coatnet_export.errors import InputError
from models import DIM_HEAD, TimmSpec
from models.config import STAGE_STRIDES

if TYPE_CHECKING:
    from coatnet_export.sources.model_source import ModelSpec

FLOAT = 4
INDEX = 8


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes needed at least, by kind."""

    weights: int
    attention_tables: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.attention_tables + self.activations


def format_bytes(count: float) -> str:
    """``12.3 GiB``: binary units up to EiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if count < 1024:
            return f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} EiB"


def available_memory() -> int | None:
    """Memory this process may still use: MemAvailable, capped by a cgroup limit and by the
    address space left under ``ulimit -v`` (RLIMIT_AS), if any."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            return None
    limits = [h for h in (_cgroup_headroom(), _address_space_headroom()) if h]
    return min([available, *limits])


def _cgroup_headroom() -> int | None:
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(0, int(limit) - used)


def _address_space_headroom() -> int | None:
    """RLIMIT_AS less the address space this process already maps (VmSize), or None."""
    import resource

    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit == resource.RLIM_INFINITY:
        return None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return max(0, limit - int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    return limit


def _stages(spec: ModelSpec) -> list[tuple[Any, int, int, int, int]]:
    """(block type, blocks, input width, output width, stage) of each stage S1..S4 in forward
    order, with a tandem S3 as its MBConv run then its Transformer run."""
    arch = spec.architecture
    if isinstance(arch, TimmSpec):
        return [(kind, n, c_in, c_out, stage) for stage, kind, c_in, c_out, n in arch.stage_plan()]
    widths = list(arch.channels)
    if arch.tandem is not None:
        widths[3] = arch.tandem.channels[1]
    stages = []
    for stage in range(1, 5):
        if stage == 3 and arch.tandem is not None:
            (conv_blocks, t_blocks), (conv_width, t_width) = (
                arch.tandem.num_blocks,
                arch.tandem.channels,
            )
            stages.append(("C", conv_blocks, widths[2], conv_width, stage))
            stages.append(("T", t_blocks, conv_width, t_width, stage))
            continue
        stages.append(
            (
                arch.block_types[stage - 1],
                arch.num_blocks[stage],
                widths[stage - 1],
                widths[stage],
                stage,
            )
        )
    return stages


def estimate_memory(spec: ModelSpec, batch: int, held_images: int = 0) -> MemoryEstimate:
    """A lower bound on the memory of building ``spec``, running ``batch`` images through it,
    and holding ``held_images`` inputs besides (validation cases)."""
    height, width = spec.img_size
    heads = spec.architecture.num_heads
    tables = 0
    stem = (
        spec.architecture.channels[0] * (height // STAGE_STRIDES[0]) * (width // STAGE_STRIDES[0])
    )
    largest = batch * (spec.in_channels * height * width + 2 * stem) * FLOAT
    for block_type, blocks, width_in, width_out, stage in _stages(spec):
        h, w = height // STAGE_STRIDES[stage], width // STAGE_STRIDES[stage]
        tokens = h * w
        if block_type == "T":
            tables += blocks * (tokens * tokens * (INDEX + heads * FLOAT))
            scores = 2 * heads * tokens * tokens  # scores and their softmax
            hidden = 3 * DIM_HEAD * heads * tokens + 4 * width_in * tokens
            largest = max(largest, batch * (scores + hidden) * FLOAT)
        else:  # the expanded hidden map (4 x width), and its activation
            largest = max(largest, batch * 2 * 4 * max(width_in, width_out) * h * w * FLOAT)
    held = held_images * spec.in_channels * height * width * FLOAT
    return MemoryEstimate(_weight_bytes(spec), tables, largest + held)


def _weight_bytes(spec: ModelSpec) -> int:
    """The fp32 weights, bias tables at this resolution included, counted from the configuration."""
    from models import variant_cost

    cost = variant_cost(spec.architecture, spec.img_size, spec.num_classes, spec.in_channels)
    return cost.parameters * FLOAT


def check_memory(
    spec: ModelSpec,
    batch: int,
    held_images: int = 0,
    hint: str = "use a smaller --img-size or --batch",
) -> None:
    """Refuse, with the estimate, a model and batch that cannot fit in the available memory."""
    available = available_memory()
    estimate = estimate_memory(spec, batch, held_images)
    if available is None or estimate.total <= available:
        return
    raise InputError(
        f"{spec.architecture.name} at {spec.img_size[0]}x{spec.img_size[1]} with batch {batch} "
        f"needs at least {format_bytes(estimate.total)} of memory (weights "
        f"{format_bytes(estimate.weights)}, attention index and baked biases "
        f"{format_bytes(estimate.attention_tables)}, inputs and activations "
        f"{format_bytes(estimate.activations)}), but {format_bytes(available)} is available "
        f"({hint})"
    )
