"""Offline data loading: evomerge reads datasets already on this machine and never downloads one."""

from __future__ import annotations

import os


def datasets_offline() -> None:
    """Make `datasets` and the Hub client refuse downloads: the flags are read when `datasets` is first
    imported, and set on its config too in case it already was. Raises ImportError without `datasets`."""
    os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
    import datasets

    datasets.config.HF_DATASETS_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
