"""Evaluation: perplexity (GPTQ recipe), generation."""
