"""Evaluation: perplexity, zero-shot multiple choice (own scorer and lm-eval), generation speed."""
