"""The tiny model family where merging is a real problem: a base, specialists and synthetic tasks."""

from evomerge.zoo.builder import PRESETS, ModelShape, Zoo, ZooPreset, build_zoo, default_zoo_dir
from evomerge.zoo.tokenizer import build_char_tokenizer
from evomerge.zoo.train import TrainConfig

__all__ = ["PRESETS", "ModelShape", "TrainConfig", "Zoo", "ZooPreset", "build_char_tokenizer", "build_zoo", "default_zoo_dir"]
