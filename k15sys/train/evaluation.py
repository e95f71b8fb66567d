"""Held-out evaluation: greedy pass@1 and sampled pass@k with the task's verifier (paper 2.3.5, 3.3).

``evaluate`` generates with the rollout engine (greedy for pass@1; ``num_samples`` draws at a
temperature for pass@k, unbiased estimator of Chen et al. 2021), scores with the task's reward (the math
verifier, or the fraction of code tests passed: a problem counts as solved at reward 1) and also reports the
mean response length in tokens, which long2short (2.4) trades against accuracy, pass@1 per difficulty label,
and the task's own figures of the greedy responses (:meth:`k15sys.tasks.base.Task.response_metrics`; the
arithmetic task's ``eval/direct_share``, the share of responses that give the boxed answer with no working,
shows whether RL moves a mixed-style warm-up model (2.3.1) toward reasoning first, with longer responses).
"""
from __future__ import annotations

from collections.abc import Sequence
from math import comb
from typing import Any

from k15sys.rollout import SamplingParams
from k15sys.tasks.base import Item, Task


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"k: need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def score(task: Task, problems: Sequence[Item], responses: Sequence[Sequence[int]], cut: Sequence[bool], *,
          truncated_reward: float = 0.0) -> list[float]:
    """The task's reward of each response (``responses[i]`` answers ``problems[i]``), one batch (paper 2.3.5); a
    response cut at the length limit (``cut[i]``) scores ``truncated_reward`` without being verified. The trainer's
    rewards, evaluation and long2short all score through here."""
    if not len(problems) == len(responses) == len(cut):
        raise ValueError(f"responses: {len(responses)} responses and {len(cut)} cut flags for {len(problems)} problems")
    out = [truncated_reward] * len(problems)
    scored = [i for i, c in enumerate(cut) if not c]
    for i, r in zip(scored, task.reward([problems[i] for i in scored], [responses[i] for i in scored])):
        out[i] = r
    return out


def score_completions(task: Task, problems: Sequence[Item], completions: Sequence[Any]) -> list[float]:
    """:func:`score` of engine completions (``token_ids``, ``finish_reason``)."""
    return score(task, problems, [c.token_ids for c in completions], [c.finish_reason == "length" for c in completions])


def evaluate(
    engine: Any,
    task: Task,
    problems: Sequence[Item],
    *,
    max_new_tokens: int,
    num_samples: int = 1,
    temperature: float = 1.0,
    batch_size: int = 256,
    seed: int = 0,
) -> dict[str, float]:
    """``{"eval/pass@1", "eval/response_len", "eval/pass@1/d<N>"..., "eval/<task figure>"..., "eval/pass@<k>"}`` on
    ``problems`` (solved = reward 1)."""
    if not problems:
        raise ValueError("problems: empty evaluation set")
    if num_samples < 1:
        raise ValueError(f"num_samples: must be >= 1, got {num_samples}")
    stop = task.tokenizer.stop_token_ids
    greedy = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=stop, seed=seed)
    correct, lengths, responses = [], [], []
    for i in range(0, len(problems), batch_size):
        chunk = problems[i : i + batch_size]
        comps = engine.generate([task.prompt_ids(p) for p in chunk], greedy)
        correct += [float(r >= 1.0) for r in score_completions(task, chunk, comps)]
        lengths += [len(c.token_ids) for c in comps]
        responses += [c.token_ids for c in comps]
    row: dict[str, float] = {
        "eval/pass@1": sum(correct) / len(correct),
        "eval/response_len": sum(lengths) / len(lengths),
        **{f"eval/{k}": v for k, v in task.response_metrics(responses).items()},
    }
    for d in sorted({p.difficulty for p in problems}):
        sel = [c for c, p in zip(correct, problems) if p.difficulty == d]
        row[f"eval/pass@1/d{d:g}"] = sum(sel) / len(sel)
    if num_samples > 1:
        sampled = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, stop_token_ids=stop, seed=seed + 1)
        prompts = [task.prompt_ids(p) for p in problems for _ in range(num_samples)]
        reps = [p for p in problems for _ in range(num_samples)]
        rewards: list[float] = []
        for i in range(0, len(prompts), batch_size):
            comps = engine.generate(prompts[i : i + batch_size], sampled)
            rewards += score_completions(task, reps[i : i + batch_size], comps)
        per = [[float(r >= 1.0) for r in rewards[j * num_samples : (j + 1) * num_samples]] for j in range(len(problems))]
        row[f"eval/pass@{num_samples}"] = sum(pass_at_k(num_samples, int(sum(r)), num_samples) for r in per) / len(per)
        row["eval/sampled_acc"] = sum(rewards) / len(rewards)
    return row
