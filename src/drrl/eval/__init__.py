"""Evaluation: perplexity, and side-by-side CPU timing of variants (interleaved medians)."""

from drrl.eval.perplexity import EvalConfig, evaluate_lm
from drrl.eval.timing import interleaved_medians

__all__ = ["EvalConfig", "evaluate_lm", "interleaved_medians"]
