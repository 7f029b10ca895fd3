"""PyTorch reference CoAtNets: lucid's model and its eight variants, timm's CoAtNet family,
and weight initialisation.

The configuration, the variant registry and the cost arithmetic are plain Python and load at
once; the names that need torch (the model, initialisation, the flop counter) load it on first
use (PEP 562), so that ``from models import get_variant`` stays instant.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from models.config import DIM_HEAD, ConfigError, Numerics, Tandem
from models.cost import Cost, variant_cost
from models.timm_config import TIMM_VARIANTS, TimmSpec
from models.variants import (
    FAMILIES,
    VARIANTS,
    UnknownVariantError,
    VariantSpec,
    architecture_from_dict,
    build_variant,
    coatnet_0,
    coatnet_1,
    coatnet_2,
    coatnet_3,
    coatnet_4,
    coatnet_5,
    coatnet_6,
    coatnet_7,
    get_variant,
    variant_names,
)

if TYPE_CHECKING:
    from models.coatnet import CoAtNet, RelativeAttention
    from models.init import init_weights, materialize, refresh_derived_buffers
    from models.profile import count_macs, count_parameters
    from models.timm_coatnet import TimmCoAtNet

_NEEDS_TORCH = {
    "CoAtNet": "models.coatnet",
    "RelativeAttention": "models.coatnet",
    "init_weights": "models.init",
    "materialize": "models.init",
    "refresh_derived_buffers": "models.init",
    "count_macs": "models.profile",
    "count_parameters": "models.profile",
    "TimmCoAtNet": "models.timm_coatnet",
}


def __getattr__(name: str) -> object:
    module = _NEEDS_TORCH.get(name)
    if module is None:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "DIM_HEAD",
    "FAMILIES",
    "TIMM_VARIANTS",
    "VARIANTS",
    "CoAtNet",
    "ConfigError",
    "Cost",
    "Numerics",
    "RelativeAttention",
    "Tandem",
    "TimmCoAtNet",
    "TimmSpec",
    "UnknownVariantError",
    "VariantSpec",
    "architecture_from_dict",
    "build_variant",
    "coatnet_0",
    "coatnet_1",
    "coatnet_2",
    "coatnet_3",
    "coatnet_4",
    "coatnet_5",
    "coatnet_6",
    "coatnet_7",
    "count_macs",
    "count_parameters",
    "get_variant",
    "init_weights",
    "materialize",
    "refresh_derived_buffers",
    "variant_cost",
    "variant_names",
]
