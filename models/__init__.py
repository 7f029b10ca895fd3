"""PyTorch reference CoAtNet: the model, its eight named variants and weight initialisation."""

from models.coatnet import DIM_HEAD, CoAtNet, ConfigError, Numerics, RelativeAttention, Tandem
from models.init import init_weights, materialize, refresh_derived_buffers
from models.profile import count_macs, count_parameters
from models.variants import (
    VARIANTS,
    UnknownVariantError,
    VariantSpec,
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

__all__ = [
    "DIM_HEAD",
    "VARIANTS",
    "CoAtNet",
    "ConfigError",
    "Numerics",
    "RelativeAttention",
    "Tandem",
    "UnknownVariantError",
    "VariantSpec",
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
    "variant_names",
]
