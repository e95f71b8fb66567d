"""The k1.5 policy-optimisation core (paper section 2.3) and long2short (2.4).

- :func:`pmd_loss`, :func:`pmd_token_loss`, :func:`pmd_seq_grad` — online policy mirror descent (2.3.2)
- :func:`length_penalty`, :class:`LengthPenaltySchedule` — overthinking penalty (2.3.3)
- :class:`CurriculumSampler`, :class:`PrioritizedSampler` — sampling strategies (2.3.4)
- :class:`RepeatDetector`, :func:`find_repeat`, :func:`penalize_repeats` — repeat detection (2.6.2)
"""
from k15sys.algo.length_penalty import LengthPenaltySchedule, length_penalty
from k15sys.algo.pmd import group_baseline, pmd_loss, pmd_seq_grad, pmd_token_loss, sequence_logprobs
from k15sys.algo.repeat import RepeatDetector, RepeatMatch, find_repeat, penalize_repeats
from k15sys.algo.sampling import CurriculumSampler, PrioritizedSampler, PromptSampler

__all__ = [
    "CurriculumSampler",
    "LengthPenaltySchedule",
    "PrioritizedSampler",
    "PromptSampler",
    "RepeatDetector",
    "RepeatMatch",
    "find_repeat",
    "group_baseline",
    "length_penalty",
    "penalize_repeats",
    "pmd_loss",
    "pmd_seq_grad",
    "pmd_token_loss",
    "sequence_logprobs",
]
