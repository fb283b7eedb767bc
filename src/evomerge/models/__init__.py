"""Model I/O: lazy checkpoints, tensor roles, model identity, compatibility checks, atomic sharded writing,
LoRA task vectors."""

from evomerge.models.checkpoint import Checkpoint, refuse_remote_code
from evomerge.models.compat import CompatReport, RowAlignment, align_rows, check_compatible
from evomerge.models.identity import (
    LINEAGE_FILE,
    exported_model_id,
    hub_revision,
    merged_model_id,
    parent_evidence,
    parent_identity,
    resume_identity,
)
from evomerge.models.lora import LoraTaskVectors, load_lora_task_vectors
from evomerge.models.roles import TensorRole, tensor_role, with_layer
from evomerge.models.writer import CheckpointWriter

__all__ = [
    "LINEAGE_FILE",
    "Checkpoint",
    "CheckpointWriter",
    "CompatReport",
    "LoraTaskVectors",
    "RowAlignment",
    "TensorRole",
    "align_rows",
    "check_compatible",
    "exported_model_id",
    "hub_revision",
    "load_lora_task_vectors",
    "merged_model_id",
    "parent_evidence",
    "parent_identity",
    "refuse_remote_code",
    "resume_identity",
    "tensor_role",
    "with_layer",
]
