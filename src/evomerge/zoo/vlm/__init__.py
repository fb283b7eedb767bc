"""The VLM zoo: a tiny Llava grown from the text zoo's base, image-grounded tasks (docs/ZOO.md)."""

from evomerge.zoo.vlm.build import VLM_PRESET, VlmZoo, build_vlm_zoo, default_vlm_zoo_dir

__all__ = ["VLM_PRESET", "VlmZoo", "build_vlm_zoo", "default_vlm_zoo_dir"]
