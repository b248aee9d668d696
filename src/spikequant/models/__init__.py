"""Models: loading, architecture mappings and tiny random configs."""

from spikequant.models.arch import (
    ARCHITECTURES,
    ArchSpec,
    ModelDims,
    decoder_layers,
    decoder_linears,
    get_arch,
    linear_role,
    model_dims,
)
from spikequant.models.loading import DEFAULT_MODEL, LoadedModel, cache_dir, load_model

__all__ = [
    "ARCHITECTURES", "ArchSpec", "DEFAULT_MODEL", "LoadedModel", "ModelDims", "cache_dir",
    "decoder_layers", "decoder_linears", "get_arch", "linear_role", "load_model", "model_dims",
]
