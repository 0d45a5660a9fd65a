"""Defenses: training objectives selected by config (``class_path`` + ``init_args``)."""

from mat_lightning.defenses.base import Defense, DefenseOutput
from mat_lightning.defenses.clean import Clean

__all__ = ["Clean", "Defense", "DefenseOutput"]
