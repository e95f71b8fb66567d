"""The default rollout engine: any transformers causal LM, batched sampling with a KV cache (paper 2.6.2).

Works on the CPU (the main job and tests use it) and on a GPU. Prompts of a batch are left-padded;
position ids follow the attention mask, so padding changes nothing. Each sequence stops on its own
(a stop token, its token budget, or a repeat loop found by ``k15sys.algo.RepeatDetector``) and then
leaves the batch and the KV cache. Several threads may call :meth:`TorchEngine.generate` at once
(inference only reads the weights); ``update_weights`` must not overlap a generation.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable

import torch

from k15sys.algo.repeat import RepeatDetector
from k15sys.rollout.types import Completion, SamplingParams


def _filtered_logprobs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Log-probs of the sampling distribution: temperature, then top-k, then top-p (nucleus)."""
    z = logits.float()
    if params.temperature > 0:
        z = z / params.temperature
    if params.top_k > 0 and params.top_k < z.shape[-1]:
        kth = torch.topk(z, params.top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=True)
        probs = torch.softmax(sorted_z, dim=-1)
        drop = probs.cumsum(-1) - probs >= params.top_p  # keep the smallest prefix with mass >= top_p
        sorted_z = sorted_z.masked_fill(drop, float("-inf"))
        z = torch.full_like(z, float("-inf")).scatter(-1, order, sorted_z)
    return torch.log_softmax(z, dim=-1)


@torch.no_grad()
def copy_by_name(model: torch.nn.Module, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy ``named_tensors`` into ``model``'s parameters/buffers of those names, in place (each converted to the
    destination's device and dtype). Every name and shape is checked before anything is written: a bad update
    changes nothing (paper 2.6.3: an engine serves one complete weight version at a time)."""
    own = dict(model.named_parameters())
    own.update(dict(model.named_buffers()))
    staged = []
    for name, t in named_tensors:
        if name not in own:
            raise ValueError(f"update_weights: unknown tensor {name!r}")
        if own[name].shape != t.shape:
            raise ValueError(f"update_weights: {name} has shape {tuple(t.shape)}, expected {tuple(own[name].shape)}")
        staged.append((own[name], t))
    for dst, src in staged:
        dst.copy_(src.to(device=dst.device, dtype=dst.dtype))


class TorchEngine:
    """Rollout engine over a transformers causal LM (the default engine of paper 2.6.2's rollouts).

    Args:
        model: e.g. ``Qwen2ForCausalLM`` (any model whose forward takes input_ids, attention_mask,
            position_ids, use_cache and a KV cache: ``cache`` in recent transformers, ``past_key_values`` in older ones).
        device: where generation runs.
        pad_token_id: used for left padding (any id; padded positions are masked).
        repeat_detector: factory of a detector per sequence (None disables repeat stops).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        device: str | torch.device = "cpu",
        *,
        pad_token_id: int = 0,
        repeat_detector: Callable[[], RepeatDetector] | None = RepeatDetector,
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.pad_token_id = pad_token_id
        self.repeat_detector = repeat_detector
        self.weight_version = 0
        self._asleep = False
        self._vocab = model.get_output_embeddings().weight.shape[0]
        # the KV-cache argument and output field: `cache` in recent transformers (`past_key_values` deprecated)
        self._cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    # ------------------------------------------------------------------ generation
    def _check_prompts(self, prompts: list[list[int]]) -> None:
        if self._asleep:
            raise RuntimeError("generate: the engine is asleep; call wake() first")
        if not isinstance(prompts, (list, tuple)):
            raise ValueError(f"prompts: expected a list of token-id lists, got {type(prompts).__name__}")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompts[{i}]: empty prompt")
            bad = [t for t in p if not 0 <= t < self._vocab]
            if bad:
                raise ValueError(f"prompts[{i}]: token ids {bad[:5]} outside the vocabulary [0, {self._vocab})")

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """Sample up to ``params.max_new_tokens`` tokens after each prompt (paper 2.6.2 rollouts).

        Sequences leave the batch (and the KV cache) as soon as they stop, so the long tail of a batch
        decodes only the sequences still running.
        """
        self._check_prompts(prompts)
        if not prompts:
            return []
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(params.seed)
        B, L = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((B, L), self.pad_token_id, dtype=torch.long, device=self.device)
        mask = torch.zeros((B, L), dtype=torch.long, device=self.device)
        for i, p in enumerate(prompts):
            ids[i, L - len(p):] = torch.tensor(p, device=self.device)
            mask[i, L - len(p):] = 1
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        past, logits = getattr(out, self._cache_name), out.logits[:, -1]
        prunable = hasattr(past, "batch_select_indices")
        tokens: list[list[int]] = [[] for _ in range(B)]
        logps: list[list[float]] = [[] for _ in range(B)]
        reasons: list[str | None] = [None] * B
        detectors = [self.repeat_detector() if self.repeat_detector else None for _ in range(B)]
        stops = set(params.stop_token_ids)
        rows = list(range(B))  # batch row -> prompt index (rows of stopped sequences are dropped)
        next_pos = pos[:, -1]
        for step in range(params.max_new_tokens):
            if params.temperature == 0:
                nxt = logits.argmax(-1)
                lp = torch.log_softmax(logits.float(), -1)
            else:
                lp = _filtered_logprobs(logits, params)
                nxt = torch.multinomial(lp.exp(), 1, generator=gen).squeeze(-1)
            chosen = lp.gather(-1, nxt[:, None]).squeeze(-1).tolist()
            keep = []
            for r, (i, t) in enumerate(zip(rows, nxt.tolist())):
                if reasons[i] is not None:  # only when the cache cannot drop rows
                    continue
                tokens[i].append(t)
                logps[i].append(chosen[r])
                if t in stops:
                    reasons[i] = "stop"
                elif detectors[i] is not None and detectors[i].push(t):
                    reasons[i] = "repeat"
                else:
                    keep.append(r)
            if not keep or step == params.max_new_tokens - 1:
                break
            if prunable and len(keep) < len(rows):
                sel = torch.tensor(keep, device=self.device)
                past.batch_select_indices(sel)
                mask, next_pos, nxt = mask[sel], next_pos[sel], nxt[sel]
                rows = [rows[r] for r in keep]
            mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=mask.dtype, device=self.device)], dim=1)
            next_pos = next_pos + 1
            out = self.model(input_ids=nxt[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                             use_cache=True, **{self._cache_name: past})
            past, logits = getattr(out, self._cache_name), out.logits[:, -1]
        return [Completion(tokens[i], logps[i], reasons[i] or "length") for i in range(B)]

    # ------------------------------------------------------------------ weights and memory
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy new values into the model's parameters/buffers by name (all-or-nothing)."""
        copy_by_name(self.model, named_tensors)
        self.weight_version += 1

    def sleep(self) -> None:
        """Free accelerator memory for a colocated trainer: weights move to the CPU (no-op on a CPU engine)."""
        if self.device.type != "cpu":
            self.model.to("cpu")
            torch.cuda.empty_cache()
        self._asleep = True

    def wake(self) -> None:
        if self.device.type != "cpu":
            self.model.to(self.device)
        self._asleep = False
