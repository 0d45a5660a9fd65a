"""Attacks: image (PGD), text (BERT-Attack), multimodal (Sep-Attack, Co-Attack, SGA) and library adapters.

Every attack follows :class:`~mat_lightning.attacks.base.Attack`'s contract; ``__all__`` lists the concrete ones
(the tests run the contract over all of them).
"""

from mat_lightning.attacks.adapters import TextAttackCandidates, TextAttackWordSwap, TorchattacksAttack
from mat_lightning.attacks.base import Attack, AttackResult
from mat_lightning.attacks.bert_attack import BertAttack
from mat_lightning.attacks.candidates import ThesaurusCandidates
from mat_lightning.attacks.multimodal import SGA, CoAttack, SepAttack
from mat_lightning.attacks.pgd import PGD

__all__ = ["PGD", "SGA", "BertAttack", "CoAttack", "SepAttack", "TextAttackWordSwap", "TorchattacksAttack"]
__all__ += ["Attack", "AttackResult", "TextAttackCandidates", "ThesaurusCandidates"]
