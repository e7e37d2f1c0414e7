"""The one training loop shared by PEQA, LoRA and QLoRA (methods only choose what trains)."""

from qtool.train.loop import TrainConfig, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
