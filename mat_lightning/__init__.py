"""mat-lightning: multimodal adversarial training (MAT) and robust image-text retrieval for CLIP-like encoders.

Pipeline (imports point one way): ``data -> models -> attacks -> defenses -> eval``, then ``synthetic`` (the
generated world, which builds its data with ``data`` and its CLIP and masked LM with ``models``), glued by
``module.py`` (``MatModule``), ``data/datamodule.py`` (``RetrievalDataModule``) and ``cli.py`` (the ``mat`` command,
which resolves ``synthetic`` names to paths before it builds anything).
"""

__version__ = "0.1.0"
