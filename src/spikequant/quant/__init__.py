"""The fake-quantization engine: quantizer specs, quantize-dequantize math, observers, model hooks."""

from spikequant.quant.apply import (
    ModuleQuant,
    QuantizedModel,
    attach,
    matches,
    resolve_plan,
    scheme_of,
    set_weight_qparams,
    weight_qparams_of,
)
from spikequant.quant.fake import compute_qparams, fake_quantize, quantize_dequantize
from spikequant.quant.observers import ActivationQuantizer, QuantStatus
from spikequant.quant.spec import QuantSpec

__all__ = [
    "ActivationQuantizer", "ModuleQuant", "QuantSpec", "QuantStatus", "QuantizedModel", "attach", "compute_qparams",
    "fake_quantize", "matches", "quantize_dequantize", "resolve_plan", "scheme_of", "set_weight_qparams",
    "weight_qparams_of",
]
