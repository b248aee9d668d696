import torch

from spikequant.models import get_arch
from spikequant.transforms import RMSNorm, fuse_norms, use_precise_norms
from spikequant.transforms.norms import residual_norm_paths

from .conftest import TOL, max_logit_diff, pair


def test_precise_norm_matches_hf_in_float32(arch):
    from spikequant.models.tiny import tiny_model

    model = tiny_model(arch)
    ref = tiny_model(arch)
    use_precise_norms(model)
    ids = torch.randint(0, 96, (1, 16))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)  # bit-identical where HF computes in float32


def test_fusion_is_exact_and_weightless(arch):
    model, ref = pair(arch)
    fuse_norms(model)
    assert max_logit_diff(model, ref) <= TOL
    for path in residual_norm_paths(model):
        norm = model.get_submodule(path)
        assert isinstance(norm, RMSNorm) and torch.all(norm.weight == 1)
    a = get_arch(model)
    q = model.get_submodule(f"{a.layers}.0.{a.q_proj}").weight
    assert not torch.allclose(q, ref.get_submodule(f"{a.layers}.0.{a.q_proj}").weight)


def test_tied_embeddings_are_untied_before_fusion():
    model, ref = pair("qwen2")
    a = get_arch(model)
    assert model.get_submodule(a.lm_head).weight is model.get_submodule(a.embed).weight
    fuse_norms(model)
    head, embed = model.get_submodule(a.lm_head).weight, model.get_submodule(a.embed).weight
    assert head.data_ptr() != embed.data_ptr() and not model.config.tie_word_embeddings
    # the embedding is untouched by the fusion, lm_head carries the final norm scale
    assert torch.equal(embed, ref.get_submodule(a.embed).weight)
    assert max_logit_diff(model, ref) <= TOL
