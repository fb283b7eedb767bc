"""Distractors for a parents-pool search: an optional extension of a built zoo (see `build_pool_zoo`)."""

from evomerge.zoo.pool.build import DISTRACTORS, PoolZoo, build_pool_zoo, default_pool_dir

__all__ = ["DISTRACTORS", "PoolZoo", "build_pool_zoo", "default_pool_dir"]
