"""The CUDA paths: every preset, the rotations and generation run on a CUDA device and compute what they
compute on the CPU (float64 tiny models, so that the two devices' summation orders stay far below the
checks). Skipped where no CUDA device is present (CI); ``SPIKEQUANT_TEST_DEVICES=cpu`` runs them against a
second CPU copy, which checks only that the comparison itself works.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from spikequant.hadamard import hadamard_matrix, hadamard_transform
from spikequant.models.tiny import TINY_ARCHS, tiny_model
from spikequant.pipeline import quantize
from spikequant.recipes import load_recipe
from spikequant.recipes.schema import PRESET_DIR
from spikequant.transforms import RotationConfig, rotate_model, use_precise_norms

DEVICES = [d for d in os.environ.get("SPIKEQUANT_TEST_DEVICES",
                                     "cuda" if torch.cuda.is_available() else "").split(",") if d]
pytestmark = pytest.mark.skipif(not DEVICES, reason="no CUDA device here")
PRESETS = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
SPIKE = "model.layers.1.mlp.down_proj"
CALIB = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(11))
IDS = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(12))


def _model(arch: str = "llama", spike: bool = False) -> torch.nn.Module:
    model = use_precise_norms(tiny_model(arch, seed=3, dtype=torch.float64))
    if spike:  # as tests/recipes/test_presets_run.py: a spike layer for the detection rule
        with torch.no_grad():
            model.get_submodule(SPIKE.replace("down_proj", "up_proj")).weight[7] *= 1e5
            model.get_submodule(SPIKE).weight[:, 7] /= 1e5
    return model


@torch.no_grad()
def _logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    dev = next(model.parameters()).device
    return model(ids.to(dev)).logits.cpu()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_on_device_matches_cpu(preset, device):
    recipe = load_recipe(preset)
    cpu = _model(spike=any(m.type in ("spike_exempt", "random_exempt") for m in recipe.modifiers))
    dev = copy.deepcopy(cpu).to(device)
    _, found_cpu = quantize(cpu, recipe, CALIB, progress=False)
    _, found_dev = quantize(dev, recipe, CALIB, progress=False)
    assert next(dev.parameters()).device.type == torch.device(device).type
    for key in ("spike_layers", "random_layers"):
        assert found_dev.get(key) == found_cpu.get(key), key
    a, b = _logits(cpu), _logits(dev)
    # Float64 on both: rounding of the quantizers could only flip on a tie; 1e-6 of the logits' range.
    assert float((a - b).abs().max()) <= 1e-6 * float(a.abs().max()), preset


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_rotations_on_device_are_exact(arch, device):
    ref = _model(arch).to(device)
    model = copy.deepcopy(ref)
    rotate_model(model, RotationConfig(seed=5))
    assert float((_logits(model) - _logits(ref)).abs().max()) <= 1e-9


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [64, 576, 1536, 172 * 4])
def test_hadamard_transform_on_device(n, device):
    x = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    h = hadamard_matrix(n).to(torch.float64)
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))
    y = hadamard_transform(x.to(device)).cpu()  # the device's path (a CUDA kernel where one is installed)
    assert torch.allclose(y, x @ h.T / n**0.5, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_generation_on_device_matches_cpu(device):
    cpu = _model("qwen2")
    dev = copy.deepcopy(cpu).to(device)
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a = cpu.generate(ids, max_new_tokens=8, do_sample=False)
        b = dev.generate(ids.to(device), max_new_tokens=8, do_sample=False).cpu()
    assert torch.equal(a, b)
