"""Defenses: training objectives selected by config (``class_path`` + ``init_args``), one class per module.

| name       | perturbs                 | loss                                    | trains |
|------------|--------------------------|-----------------------------------------|--------|
| clean      | nothing                  | CLIP contrastive                        | both   |
| image_at   | image                    | CLIP contrastive                        | both   |
| tecoa      | image                    | CE over caption classes                 | vision |
| fare       | image                    | L2 to the frozen start's embedding      | vision |
| text_at    | text                     | CLIP contrastive                        | both   |
| mmcoa      | image, text independently| λ_t CLIP(x, t') + λ_i CLIP(x', t)       | both   |
| mat        | text then image          | CLIP contrastive                        | both   |
| mat_1n     | text then image, 1:N     | multi-positive CLIP contrastive         | both   |
"""

from mat_lightning.defenses.base import Defense, DefenseOutput
from mat_lightning.defenses.clean import Clean
from mat_lightning.defenses.fare import FARE
from mat_lightning.defenses.image_at import ImageAT
from mat_lightning.defenses.mat import MAT, MAT1N
from mat_lightning.defenses.mmcoa import MMCoA
from mat_lightning.defenses.tecoa import TeCoA
from mat_lightning.defenses.text_at import TextAT

__all__ = ["FARE", "MAT", "MAT1N", "Clean", "Defense", "DefenseOutput", "ImageAT", "MMCoA", "TeCoA", "TextAT"]
