"""Evaluation: batched log-likelihood scoring and the lm-evaluation-harness adapter."""
