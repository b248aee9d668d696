"""Evaluation: perplexity, KL divergence and top-1 agreement against the unquantized model."""

from spikequant.eval.perplexity import EvalResult, evaluate, reference_logprobs

__all__ = ["EvalResult", "evaluate", "reference_logprobs"]
