"""Held-out evaluation: greedy pass@1 and sampled pass@k with the math verifier (paper 2.3.5, 3.3).

``evaluate`` generates with the rollout engine (greedy for pass@1; ``num_samples`` draws at a
temperature for pass@k, unbiased estimator of Chen et al. 2021), scores with ``math_reward`` and also
reports the mean response length in tokens, which long2short (2.4) trades against accuracy, and the share
of greedy responses that give the boxed answer with no working (``eval/direct_share``), which shows whether
RL moves a mixed-style warm-up model (2.3.1) toward reasoning first, with longer responses.
"""
from __future__ import annotations

from collections.abc import Sequence
from math import comb
from typing import Any

from k15sys.rewards import math_reward
from k15sys.rollout import SamplingParams
from k15sys.tasks import CharTokenizer, Problem


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"k: need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def score(tokenizer: CharTokenizer, problems: Sequence[Problem], completions: Sequence[Any], *, truncated_reward: float = 0.0) -> list[float]:
    """Verifier reward of each completion (``completions[i]`` answers ``problems[i]``); a response cut
    at the length limit scores ``truncated_reward``."""
    if len(problems) != len(completions):
        raise ValueError(f"completions: {len(completions)} for {len(problems)} problems")
    out = []
    for p, c in zip(problems, completions):
        if c.finish_reason == "length":
            out.append(truncated_reward)
        else:
            out.append(math_reward(tokenizer.decode(c.token_ids), p.answer))
    return out


def evaluate(
    engine: Any,
    tokenizer: CharTokenizer,
    problems: Sequence[Problem],
    *,
    max_new_tokens: int,
    num_samples: int = 1,
    temperature: float = 1.0,
    batch_size: int = 256,
    seed: int = 0,
) -> dict[str, float]:
    """``{"eval/pass@1", "eval/response_len", "eval/direct_share", "eval/pass@1/d<N>"..., "eval/pass@<k>"}`` on
    ``problems``; ``eval/direct_share`` is the share of greedy responses whose first token opens the boxed answer."""
    if not problems:
        raise ValueError("problems: empty evaluation set")
    if num_samples < 1:
        raise ValueError(f"num_samples: must be >= 1, got {num_samples}")
    stop = (tokenizer.eos_token_id,)
    greedy = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=stop, seed=seed)
    correct, lengths, direct = [], [], []
    for i in range(0, len(problems), batch_size):
        chunk = problems[i : i + batch_size]
        comps = engine.generate([tokenizer.encode(p.prompt, bos=True) for p in chunk], greedy)
        correct += score(tokenizer, chunk, comps)
        lengths += [len(c.token_ids) for c in comps]
        direct += [bool(c.token_ids) and c.token_ids[0] == tokenizer.boxed_token_id for c in comps]
    row: dict[str, float] = {
        "eval/pass@1": sum(correct) / len(correct),
        "eval/response_len": sum(lengths) / len(lengths),
        "eval/direct_share": sum(direct) / len(direct),
    }
    for d in sorted({p.difficulty for p in problems}):
        sel = [c for c, p in zip(correct, problems) if p.difficulty == d]
        row[f"eval/pass@1/d{d}"] = sum(sel) / len(sel)
    if num_samples > 1:
        sampled = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, stop_token_ids=stop, seed=seed + 1)
        prompts = [tokenizer.encode(p.prompt, bos=True) for p in problems for _ in range(num_samples)]
        reps = [p for p in problems for _ in range(num_samples)]
        rewards: list[float] = []
        for i in range(0, len(prompts), batch_size):
            rewards += score(tokenizer, reps[i : i + batch_size], engine.generate(prompts[i : i + batch_size], sampled))
        per = [rewards[j * num_samples : (j + 1) * num_samples] for j in range(len(problems))]
        row[f"eval/pass@{num_samples}"] = sum(pass_at_k(num_samples, int(sum(r)), num_samples) for r in per) / len(per)
        row["eval/sampled_acc"] = sum(rewards) / len(rewards)
    return row
