"""Evaluation of any checkpoint: loss and perplexity, lm-evaluation-harness, MAUVE."""
