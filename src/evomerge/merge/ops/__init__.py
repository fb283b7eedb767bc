"""Built-in merge operators; importing this package registers all of them (see `merge.registry`)."""

from evomerge.merge.ops import linear, model_stock, task_arithmetic

__all__ = ["linear", "model_stock", "task_arithmetic"]
