"""Evaluation: one evaluator interface; perplexity, KL divergence and top-1 agreement against the
unquantized model."""

from spikequant.eval.base import EvalContext, Evaluator, PerplexityEvaluator, run_evaluators
from spikequant.eval.perplexity import EvalResult, evaluate, reference_logprobs

__all__ = ["EvalContext", "EvalResult", "Evaluator", "PerplexityEvaluator", "evaluate", "reference_logprobs",
           "run_evaluators"]
