"""RMSNorm scale fusion (METHODS §B.1 step 1) and the norm module that replaces the fused ones.

RMSNorm(x) = g ⊙ x / rms(x). Folding g into the input columns of every linear that reads the norm's output
makes the norm weightless; a weightless RMSNorm commutes with any orthogonal rotation of x (rms is a
norm), which is what lets R1 pass through it. No embedding mean-centring: that is exact only for
LayerNorm, and every target here uses RMSNorm.
"""

from __future__ import annotations

import torch
from torch import nn

from spikequant.models.arch import decoder_layers, get_arch


class RMSNorm(nn.Module):
    """RMSNorm with the original module's weight and eps, dividing sum(x²) by ``dim``.

    ``dim`` is the width the statistic is normalised by. It equals the tensor width except after
    Dimension Expansion, where the residual stream carries zero (then rotated) extra channels and the
    original width keeps the mean of squares, hence the model, unchanged. The computation runs in float32
    or in the input's dtype when that is wider: HF norms round through float32, which would hide a
    float64 equivalence check under 1e-7 noise; for float32/16 inputs this is what HF computes.
    """

    def __init__(self, weight: torch.Tensor, eps: float, dim: int | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.variance_epsilon = float(eps)
        self.dim = int(dim) if dim is not None else weight.shape[-1]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        h = hidden_states.to(torch.promote_types(dtype, torch.float32))
        if self.dim == h.shape[-1]:
            variance = h.pow(2).mean(-1, keepdim=True)  # bit-identical to HF for the unexpanded case
        else:
            variance = h.pow(2).sum(-1, keepdim=True) / self.dim
        h = h * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * h.to(dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, dim={self.dim}"


def _eps(norm: nn.Module) -> float:
    for attr in ("variance_epsilon", "eps"):
        if hasattr(norm, attr):
            return float(getattr(norm, attr))
    raise ValueError(f"norm module {type(norm).__name__} has no variance_epsilon/eps attribute")


def residual_norm_paths(model: nn.Module) -> list[str]:
    """Full paths of the norms on the residual stream: every layer's two norms and the final norm."""
    arch = get_arch(model)
    paths = []
    for i in range(len(decoder_layers(model))):
        paths += [f"{arch.layer_path(i)}.{arch.input_norm}", f"{arch.layer_path(i)}.{arch.post_attn_norm}"]
    return paths + [arch.final_norm]


def all_norm_paths(model: nn.Module) -> list[str]:
    """Residual norms plus per-head q/k norms (Qwen3) where the architecture has them."""
    arch = get_arch(model)
    paths = residual_norm_paths(model)
    for i in range(len(decoder_layers(model))):
        paths += [f"{arch.layer_path(i)}.{p}" for p in (arch.q_norm, arch.k_norm) if p is not None]
    return paths


def replace_norm(model: nn.Module, path: str, weight: torch.Tensor | None = None, dim: int | None = None) -> RMSNorm:
    """Swap the norm at ``path`` for an :class:`RMSNorm` (same eps; given or current weight)."""
    old = model.get_submodule(path)
    w = old.weight if weight is None else weight
    new = RMSNorm(w.to(old.weight.device, old.weight.dtype), _eps(old), dim)
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)
    return new


def use_precise_norms(model: nn.Module) -> nn.Module:
    """Swap every norm (weights kept) for :class:`RMSNorm`, so a float64 model computes its norms in
    float64. Used to build the reference of float64 equivalence tests; a no-op numerically otherwise."""
    for path in all_norm_paths(model):
        if not isinstance(model.get_submodule(path), RMSNorm):
            replace_norm(model, path)
    return model


def untie_embeddings(model: nn.Module) -> bool:
    """Give lm_head its own copy of the embedding matrix (R1 and the final-norm fusion change them
    differently). Returns whether they were tied."""
    arch = get_arch(model)
    embed, head = model.get_submodule(arch.embed), model.get_submodule(arch.lm_head)
    tied = head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr()
    if tied:
        head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    text_config = getattr(model.config, "get_text_config", None)
    if text_config is not None:
        text_config().tie_word_embeddings = False
    return tied


@torch.no_grad()
def _scale_inputs(linear: nn.Linear, g: torch.Tensor) -> None:
    w = linear.weight
    linear.weight.data = (w.to(torch.float64) * g.to(w.device, torch.float64)).to(w.dtype)


def _fuse_group(model: nn.Module, norm_path: str, consumers: list[str]) -> None:
    norm = model.get_submodule(norm_path)
    g = norm.weight.detach()
    for c in consumers:
        _scale_inputs(model.get_submodule(c), g)  # type: ignore[arg-type]
    dim = norm.dim if isinstance(norm, RMSNorm) else None
    replace_norm(model, norm_path, torch.ones_like(g), dim)


@torch.no_grad()
def fuse_layer_norms(model: nn.Module, i: int) -> None:
    """Layer ``i``'s share of :func:`fuse_norms`: its two norms folded into q/k/v and gate/up (touches
    nothing outside the layer, so a streamed run can do it when the layer is loaded)."""
    arch = get_arch(model)
    base = arch.layer_path(i) + "."
    for norm, consumers in arch.norm_consumers:
        _fuse_group(model, base + norm, [base + p for p in consumers])


@torch.no_grad()
def fuse_final_norm(model: nn.Module) -> None:
    """The ends' share of :func:`fuse_norms`: untie the embeddings and fold the final norm into lm_head."""
    arch = get_arch(model)
    untie_embeddings(model)
    _fuse_group(model, arch.final_norm, [arch.lm_head])


@torch.no_grad()
def fuse_norms(model: nn.Module) -> None:
    """Untie embeddings, fold every residual RMSNorm's scale into the linears that read it and make
    the norm weightless (weight = ones, an :class:`RMSNorm`). Exact in exact arithmetic. Each group is
    independent of the others: :func:`fuse_final_norm` plus :func:`fuse_layer_norms` of every layer."""
    fuse_final_norm(model)
    for i in range(len(decoder_layers(model))):
        fuse_layer_norms(model, i)
