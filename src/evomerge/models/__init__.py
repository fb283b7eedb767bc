"""Model I/O: lazy checkpoints, tensor roles, compatibility checks, atomic sharded writing, LoRA task vectors."""

from evomerge.models.checkpoint import Checkpoint
from evomerge.models.compat import CompatReport, RowAlignment, align_rows, check_compatible
from evomerge.models.lora import LoraTaskVectors, load_lora_task_vectors
from evomerge.models.roles import TensorRole, tensor_role, with_layer
from evomerge.models.writer import CheckpointWriter

__all__ = [
    "Checkpoint",
    "CheckpointWriter",
    "CompatReport",
    "LoraTaskVectors",
    "RowAlignment",
    "TensorRole",
    "align_rows",
    "check_compatible",
    "load_lora_task_vectors",
    "tensor_role",
    "with_layer",
]
