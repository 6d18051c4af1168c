"""Evaluation and measurement: the one perplexity function, side-by-side timing (interleaved medians), the
machine stamp every report carries, and plots."""

from drrl.eval.machine import machine
from drrl.eval.perplexity import EvalConfig, evaluate_lm
from drrl.eval.timing import interleaved_medians

__all__ = ["EvalConfig", "evaluate_lm", "interleaved_medians", "machine"]
