"""Drop-in adapters for the libraries people train with; each imports its library only when used.

- ``tracked_ckpt.frameworks.lightning``: PyTorch Lightning (``TrackedCheckpointIO``, ``resume_path``)
- ``tracked_ckpt.frameworks.hf``: Hugging Face ``Trainer`` (``TrackedCheckpoints``, ``resume_folder``)
- ``tracked_ckpt.frameworks.accelerate``: Accelerate (``save_state``, ``load_state``)

What they share (folders.py): record any checkpoint folder another library wrote, fetch one back verified.
"""

from __future__ import annotations

from .folders import fetch_folder, record_folder

__all__ = ["fetch_folder", "record_folder"]
