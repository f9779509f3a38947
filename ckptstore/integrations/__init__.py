"""Adapters for the training frameworks people already use.

Each submodule imports its framework on import, so ``import ckptstore`` never
does: ``ckptstore.integrations.lightning`` (a Lightning ``CheckpointIO``),
``ckptstore.integrations.transformers`` (a Hugging Face ``TrainerCallback``)
and ``ckptstore.integrations.dcp`` (storage for ``torch.distributed.checkpoint``).
"""
