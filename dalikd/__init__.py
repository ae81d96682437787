"""dalikd: knowledge distillation whose augmentations (MixUp, CutMix, CutMixPick) run in DALI."""

__version__ = "0.1.0"
