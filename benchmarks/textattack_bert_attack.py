"""An image-guided BERT-Attack assembled from TextAttack's components, as the `make bench` baseline "TextAttack".
Not used by the package.

TextAttack (Morris et al., EMNLP 2020 demos) has no vision-language goal; the attack is built from its parts the way
its ``BERTAttackLi2020`` recipe is, with our models and budgets:

* transformation: ``WordSwapMaskedLM(method="bert-attack")`` on the given masked LM, 10 candidates per word,
  sequences cut at 77 sub-words (as ours; its default 512 exceeds small MLMs' position tables);
* constraints: ``RepeatModification``, ``StopwordModification`` (our stop-word list), ``MaxWordsPerturbed(1)``;
* search: ``GreedyWordSwapWIR("unk")``: words ranked by the goal score of their ``[UNK]`` variant, then greedy;
* goal: :class:`ImageCosineGoal`, minimise the cosine of the caption to its image (never "complete", so the search
  tries every word in order, keeping the first improvement it finds while the word budget allows).

Differences from :class:`~mat_lightning.attacks.BertAttack` (why the adversarial captions differ): word importance
is the image objective of the ``[UNK]`` variant (ours, as the references: KL of the text embeddings), TextAttack's
own word segmentation (punctuation split off) and its candidate rules (confidence threshold 5e-4 on probabilities,
its multi-sub-word handling), one caption at a time with its model-query cache.
"""

from __future__ import annotations

import logging
import warnings

import torch

from mat_lightning.attacks.adapters import load_textattack


def build_textattack_attack(encoder, mlm, tok, stop_words, top_k: int = 10, max_length: int = 77):
    """(attack, wrapper): a ``textattack.Attack``; set ``wrapper.image_emb`` (float[D]) before each caption."""
    ta = load_textattack()
    logging.getLogger(ta.shared.logger.name).setLevel(logging.ERROR)  # its "unknown goal function" notices
    from textattack.constraints.overlap import MaxWordsPerturbed
    from textattack.constraints.pre_transformation import RepeatModification, StopwordModification
    from textattack.goal_function_results import TextToTextGoalFunctionResult
    from textattack.goal_functions import GoalFunction
    from textattack.models.wrappers import ModelWrapper
    from textattack.search_methods import GreedyWordSwapWIR
    from textattack.transformations import WordSwapMaskedLM

    class CosineWrapper(ModelWrapper):
        """texts -> float[n] cosine of each text's CLIP embedding to the current image."""

        def __init__(self) -> None:
            self.model, self.image_emb = encoder, None

        @torch.no_grad()
        def __call__(self, texts: list[str]) -> torch.Tensor:
            return encoder.encode_text(list(texts)).float() @ self.image_emb

    class ImageCosineGoal(GoalFunction):
        def _is_goal_complete(self, model_output, attacked_text) -> bool:
            return False

        def _get_score(self, model_output, attacked_text) -> float:
            return -float(model_output)

        def _goal_function_result_type(self):
            return TextToTextGoalFunctionResult

        def _process_model_outputs(self, inputs, outputs):
            return outputs

    wrapper = CosineWrapper()
    transformation = WordSwapMaskedLM(
        method="bert-attack",
        masked_language_model=mlm,
        tokenizer=tok,
        max_length=max_length,
        max_candidates=top_k,
    )
    constraints = [
        RepeatModification(),
        StopwordModification(stopwords=set(stop_words)),
        MaxWordsPerturbed(max_num_words=1),
    ]
    with warnings.catch_warnings():  # its validators call the deprecated Logger.warn
        warnings.simplefilter("ignore", DeprecationWarning)
        goal = ImageCosineGoal(wrapper, model_batch_size=1024)
        attack = ta.Attack(goal, constraints, transformation, GreedyWordSwapWIR(wir_method="unk"))
    return attack, wrapper


def textattack_captions(attack, wrapper, captions: list[str], image_emb: torch.Tensor) -> list[str]:
    """Adversarial captions, one attack per caption (``image_emb[i]`` guides caption ``i``)."""
    out = []
    for i, caption in enumerate(captions):
        wrapper.image_emb = image_emb[i].float()
        attack.goal_function.clear_cache()
        out.append(attack.attack(caption, i).perturbed_result.attacked_text.text)
    return out
