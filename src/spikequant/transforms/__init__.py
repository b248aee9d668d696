"""Model transforms that leave a full-precision model's output unchanged: RMSNorm fusion, the R1–R4
rotations (QuaRot layout, SpinQuant names), online Hadamards, and Dimension Expansion."""

from spikequant.transforms.apply import (
    LayerwiseRotation,
    RotationConfig,
    expanded_config,
    install_kv_quantizers,
    original_sizes,
    restore_transforms,
    rotate_model,
    transform_state,
)
from spikequant.transforms.expand import ExpansionError, expand_hidden, expand_mlp, expansion_cost
from spikequant.transforms.norms import RMSNorm, fuse_norms, untie_embeddings, use_precise_norms
from spikequant.transforms.online import (
    AttentionTransform,
    attention_transforms,
    has_online_hadamard,
    install_online_hadamard,
    install_r3,
    install_r4,
    installed_attention_transforms,
)
from spikequant.transforms.rotation import (
    Rotation,
    RotationError,
    fuse_down_hadamard,
    fuse_input_hadamard,
    rotate_heads,
    rotate_residual,
)

__all__ = [
    "AttentionTransform", "ExpansionError", "LayerwiseRotation", "RMSNorm", "Rotation", "RotationConfig",
    "RotationError",
    "attention_transforms", "expand_hidden", "expand_mlp", "expanded_config", "expansion_cost",
    "fuse_down_hadamard", "fuse_input_hadamard", "fuse_norms", "has_online_hadamard",
    "install_online_hadamard", "install_kv_quantizers", "install_r3", "install_r4",
    "installed_attention_transforms", "original_sizes", "restore_transforms", "rotate_heads", "rotate_model",
    "rotate_residual", "transform_state", "untie_embeddings", "use_precise_norms",
]
