"""mat-lightning: multimodal adversarial training (MAT) and robust image-text retrieval for CLIP-like encoders.

Pipeline (imports point one way): ``data -> models -> attacks -> defenses -> eval``, glued by ``module.py``
(``MatModule``), ``data/datamodule.py`` (``RetrievalDataModule``) and ``cli.py`` (the ``mat`` command).
"""

__version__ = "0.1.0"
