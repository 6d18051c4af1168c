"""Evaluation: perplexity (later: accuracy, fidelity, FLOPs and timing)."""

from drrl.eval.perplexity import EvalConfig, evaluate_lm

__all__ = ["EvalConfig", "evaluate_lm"]
