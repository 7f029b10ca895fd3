"""Build the PyTorch reference model for an export: from a checkpoint or from seeded weights."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from coatnet_export.errors import InputError
from coatnet_export.sources.architecture import (
    architecture_mismatches,
    dim,
    infer_architecture,
    recognise_timm,
)
from coatnet_export.sources.checkpoint import (
    Checkpoint,
    StateDict,
    fit_state_dict,
    trained_img_size,
)
from coatnet_export.sources.lucid import convert_lucid_state_dict
from coatnet_export.sources.timm_weights import fit_timm_state_dict, looks_like_timm
from models import (
    CoAtNet,
    ConfigError,
    Numerics,
    TimmCoAtNet,
    TimmSpec,
    VariantSpec,
    init_weights,
    materialize,
    refresh_derived_buffers,
)


@dataclass(frozen=True)
class ModelSpec:
    """What to build: an architecture at a resolution, with its input and output sizes."""

    architecture: VariantSpec | TimmSpec
    img_size: tuple[int, int] = (224, 224)
    in_channels: int = 3
    num_classes: int = 1000
    numerics: Numerics = field(default_factory=Numerics)


@dataclass
class ReferenceModel:
    """A ready, eval-mode reference model and where its weights came from."""

    model: CoAtNet | TimmCoAtNet
    spec: ModelSpec
    weights: str
    """Human-readable origin: the checkpoint path, or the seed."""
    warnings: list[str] = field(default_factory=list)


def build_meta(spec: ModelSpec) -> CoAtNet | TimmCoAtNet:
    """The architecture on the meta device (no memory), with configuration errors as InputError."""
    try:
        return spec.architecture.build(
            spec.img_size, spec.num_classes, spec.in_channels, spec.numerics, device="meta"
        )
    except ConfigError as exc:
        raise InputError(str(exc)) from None


def plan_model(
    architecture: VariantSpec | TimmSpec | None,
    checkpoint: Checkpoint | None,
    img_size: tuple[int, int] | None = None,
    in_channels: int | None = None,
    num_classes: int | None = None,
) -> tuple[ModelSpec, StateDict | None]:
    """Decide what to build, and bring the checkpoint's tensors into our layout.

    Without a checkpoint the named architecture is used as it is. With one, the architecture
    is read off its keys and shapes (and must agree with a named one, if given), the training
    resolution off its bias tables, and the input channels and classes off its first and last
    layers; explicit arguments win over what the checkpoint says. A lucid checkpoint switches
    the model to lucid's numerics and has its tables converted.
    """
    if checkpoint is None:
        if architecture is None:
            raise InputError("give --variant, or a --checkpoint to read the architecture from")
        default_size = getattr(architecture, "img_size", (224, 224))
        return ModelSpec(
            architecture, img_size or default_size, in_channels or 3, num_classes or 1000
        ), None
    if looks_like_timm(checkpoint.state_dict) or isinstance(architecture, TimmSpec):
        return plan_timm(architecture, checkpoint, img_size, in_channels, num_classes)
    state_dict = checkpoint.state_dict
    try:
        found = infer_architecture(state_dict)
    except (InputError, KeyError) as exc:
        if architecture is None:
            reason = str(exc) if isinstance(exc, InputError) else f"it has no key {exc}"
            raise InputError(
                f"cannot read a CoAtNet architecture from {checkpoint.path}: {reason} "
                "(pass --variant if it is one)"
            ) from None
        found = architecture  # the key-by-key check while loading names what is wrong
    if architecture is not None:
        mismatches = architecture_mismatches(architecture, found)
        if mismatches:
            raise InputError(
                f"{checkpoint.path} does not hold a {architecture.name}: " + "; ".join(mismatches)
            )
    trained = trained_img_size(state_dict)
    numerics = Numerics()
    if checkpoint.format == "lucid":
        state_dict = convert_lucid_state_dict(state_dict, trained or img_size or (224, 224))
        numerics = Numerics.lucid()
    has_stem, has_head = "s0.0.0.weight" in state_dict, "fc.weight" in state_dict
    spec = ModelSpec(
        architecture or found,
        img_size or trained or (224, 224),
        in_channels or (dim(state_dict, "s0.0.0.weight", 1) if has_stem else 3),
        num_classes or (dim(state_dict, "fc.weight", 0) if has_head else 1000),
        numerics,
    )
    return spec, state_dict


def plan_timm(
    architecture: VariantSpec | TimmSpec | None,
    checkpoint: Checkpoint,
    img_size: tuple[int, int] | None,
    in_channels: int | None,
    num_classes: int | None,
) -> tuple[ModelSpec, StateDict]:
    """A timm checkpoint: the named timm architecture (its keys are checked while loading), or
    the one its keys and shapes match; its training resolution unless ``img_size`` is given."""
    state_dict = checkpoint.state_dict
    if isinstance(architecture, VariantSpec):
        raise InputError(
            f"{checkpoint.path} holds a timm CoAtNet (timm's key names), not lucid's "
            f"{architecture.name} (leave --variant out, or name a timm architecture)"
        )
    if not looks_like_timm(state_dict):
        raise InputError(
            f"{checkpoint.path} does not have timm's key names (stem.conv1.weight, "
            f"stages.N.blocks.M.*): it is not a {architecture.name if architecture else 'timm'} "
            "checkpoint"
        )
    found = architecture or recognise_timm(state_dict)
    classes = dim(state_dict, "head.fc.weight", 0) if "head.fc.weight" in state_dict else 1000
    spec = ModelSpec(
        found,
        img_size or found.img_size,
        in_channels or dim(state_dict, "stem.conv1.weight", 1),
        num_classes or classes,
    )
    return spec, state_dict


def load_reference(
    spec: ModelSpec, state_dict: StateDict | None, origin: str, seed: int
) -> ReferenceModel:
    """Build ``spec`` with the checkpoint's tensors, or seeded random weights without them.

    The model is built on the meta device and the checkpoint's tensors are assigned in place,
    so only one copy of the weights is ever in memory. ``state_dict`` is consumed (emptied):
    the model owns its tensors, so the export's rewrites (which copy some weights) can free
    the originals while callers up the stack still hold the dictionary.
    """
    model = build_meta(spec)
    if state_dict is None:
        init_weights(materialize(model), seed)
        return ReferenceModel(model.eval(), spec, f"seeded random weights (seed {seed})")
    if isinstance(model, TimmCoAtNet):
        fitted, warnings = fit_timm_state_dict(state_dict, model)
    else:
        fitted, warnings = fit_state_dict(state_dict, model)
    model.load_state_dict(fitted, strict=False, assign=True)
    fitted.clear()
    state_dict.clear()
    _zero_leftover_meta_buffers(model)
    refresh_derived_buffers(model)
    return ReferenceModel(model.eval(), spec, origin, warnings)


def _zero_leftover_meta_buffers(model: CoAtNet | TimmCoAtNet) -> None:
    """Bookkeeping buffers a checkpoint may omit (``num_batches_tracked``) get zeros."""
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer is not None and buffer.is_meta:
                module.register_buffer(
                    name,
                    torch.zeros(buffer.shape, dtype=buffer.dtype),
                    persistent=name in module.state_dict(),
                )


def weights_sha256(model: CoAtNet | TimmCoAtNet) -> str:
    """SHA-256 over the state dict's names and tensor bytes, in key order."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()
