"""Model I/O: lazy checkpoints, tensor roles, model identity, compatibility checks, atomic sharded writing,
LoRA task vectors.

Names are imported on first use (`evomerge.lazy`): validating a config must not import torch or optuna.
"""

from typing import TYPE_CHECKING

from evomerge.lazy import lazy_exports

if TYPE_CHECKING:
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

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "Checkpoint": "checkpoint",
        "refuse_remote_code": "checkpoint",
        "CompatReport": "compat",
        "RowAlignment": "compat",
        "align_rows": "compat",
        "check_compatible": "compat",
        "LINEAGE_FILE": "identity",
        "exported_model_id": "identity",
        "hub_revision": "identity",
        "merged_model_id": "identity",
        "parent_evidence": "identity",
        "parent_identity": "identity",
        "resume_identity": "identity",
        "LoraTaskVectors": "lora",
        "load_lora_task_vectors": "lora",
        "TensorRole": "roles",
        "tensor_role": "roles",
        "with_layer": "roles",
        "CheckpointWriter": "writer",
    },
)

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
