"""qtool: packed 2/3/4/8-bit checkpoints of Hugging Face causal LMs, fine-tuned per task."""

__version__ = "0.1.0"
