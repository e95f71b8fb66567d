"""Rollout engine on vLLM's offline ``LLM`` (optional extra ``[vllm]``; paper 2.6.2).

Same contract as :class:`k15sys.rollout.TorchEngine`: token ids in, ``Completion`` out, with the
log-probs of the sampled tokens under the sampling distribution (vLLM's ``processed_logprobs`` mode).
Weight updates go through vLLM's worker (``reload_weights`` with a weights iterator) and sleep mode frees
the GPU for a colocated trainer. Repeat detection runs on the returned tokens (vLLM cannot stop on it
mid-generation): a looping completion is cut where the loop was detected and marked ``"repeat"``.
As in :class:`~k15sys.rollout.TorchEngine`, only ``stop_token_ids`` stop a sequence (the model's EOS
does not, unless listed), and a seeded call gives every prompt its own seed derived from it, so equal
prompts of one call (the k samples of a group) are sampled independently.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from k15sys.algo.repeat import RepeatDetector
from k15sys.rollout.types import Completion, SamplingParams


class VLLMEngine:
    """A :class:`~k15sys.rollout.RolloutEngine` on vLLM's offline ``LLM`` (token ids in and out).

    Args:
        model: a model directory (HF format) or an already constructed ``vllm.LLM``.
        repeat_detector: factory of a detector per completion (None disables it).
        **llm_kwargs: passed to ``vllm.LLM`` (e.g. ``tensor_parallel_size``, ``enable_sleep_mode``).
    """

    def __init__(self, model: Any, *, repeat_detector: Callable[[], RepeatDetector] | None = RepeatDetector,
                 **llm_kwargs: Any) -> None:
        try:
            import vllm
        except ImportError as e:  # pragma: no cover - exercised only without vllm
            raise ImportError("VLLMEngine needs vLLM: pip install -e '.[vllm]'") from e
        self._vllm = vllm
        if isinstance(model, vllm.LLM):
            self.llm = model
        else:
            llm_kwargs.setdefault("logprobs_mode", "processed_logprobs")
            llm_kwargs.setdefault("skip_tokenizer_init", True)
            self.llm = vllm.LLM(model=str(model), **llm_kwargs)
        self.repeat_detector = repeat_detector
        self.weight_version = 0
        self._lock = threading.Lock()  # vLLM's LLM is not thread-safe: scheduler workers take turns

    def _vllm_params(self, p: SamplingParams, seed: int | None) -> Any:
        return self._vllm.SamplingParams(
            max_tokens=p.max_new_tokens, temperature=p.temperature, top_p=p.top_p,
            top_k=p.top_k if p.top_k > 0 else -1, stop_token_ids=list(p.stop_token_ids), ignore_eos=True,
            seed=seed, logprobs=0, detokenize=False,
        )

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """Sample up to ``params.max_new_tokens`` tokens after each prompt (paper 2.6.2 rollouts)."""
        from vllm.inputs import TokensPrompt

        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompts[{i}]: empty prompt")
        if not prompts:
            return []
        if params.seed is None:
            per_prompt = [self._vllm_params(params, None)] * len(prompts)
        else:
            seeds = np.random.SeedSequence(params.seed).generate_state(len(prompts))
            per_prompt = [self._vllm_params(params, int(s)) for s in seeds]
        with self._lock:
            outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], per_prompt,
                                     use_tqdm=False)
        result = []
        for o in outs:
            c = o.outputs[0]
            ids = list(c.token_ids)
            lps = [float(step[t].logprob) for t, step in zip(ids, c.logprobs or [])]
            reason = "stop" if c.finish_reason == "stop" else "length"
            if self.repeat_detector is not None:
                det = self.repeat_detector()
                if det.extend(ids):
                    ids, lps, reason = ids[: det.match.end], lps[: det.match.end], "repeat"
            result.append(Completion(ids, lps, reason))
        return result

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load new weights (HF names) through vLLM's worker (``reload_weights``)."""
        with self._lock:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(named_tensors)})
        self.weight_version += 1

    def sleep(self) -> None:
        """vLLM sleep mode level 1: weights offloaded to the CPU, KV cache freed (needs ``enable_sleep_mode``)."""
        with self._lock:
            self.llm.sleep(level=1)

    def wake(self) -> None:
        with self._lock:
            self.llm.wake_up()
