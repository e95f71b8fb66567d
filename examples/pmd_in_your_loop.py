"""k1.5 policy optimisation inside your own RL loop (the way verl / OpenRLHF / TRL users would plug it in).

Five k15sys pieces are used, around a plain transformers model and optimizer that stand in for yours:
- ``TorchEngine``: rollouts from a separate copy of the weights (swap in ``VLLMEngine`` on GPUs);
- ``math_reward``: the verifier reward (paper 2.3.5);
- ``fused_logprobs``: per-token log-probs from hidden states, never building [tokens, vocab] logits;
- ``pmd_loss``: the online mirror-descent surrogate with the mean-reward baseline (paper 2.3.2);
- ``push_weights``: hand the updated weights to the engine by name (paper 2.6, weight sync).

    python examples/pmd_in_your_loop.py --steps 5

Each step prints one JSON line; the last line sums up the run. The model is untrained, so this shows the
plumbing (on-policy log-probs, a moving policy, an engine in sync), not learning: `k15 train` is the run that learns.
"""
from __future__ import annotations

import argparse
import copy
import json

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from k15sys.algo import pmd_loss
from k15sys.ops import fused_logprobs
from k15sys.rewards import math_reward
from k15sys.rollout import SamplingParams, TorchEngine
from k15sys.tasks import CharTokenizer, make_splits
from k15sys.weights import push_weights


def sequence_logprobs(model: Qwen2ForCausalLM, prompts: list[list[int]], responses: list[list[int]],
                      pad_id: int, temperature: float) -> torch.Tensor:
    """log pi(response | prompt) per sample: a right-padded batch, labels only on response tokens."""
    seqs = [p + r for p, r in zip(prompts, responses)]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id)
    labels = torch.full((len(seqs), width), -100)
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, len(p) - 1 : len(s) - 1] = torch.tensor(s[len(p):])  # position t predicts token t + 1
    mask = torch.arange(width) < torch.tensor([len(s) for s in seqs])[:, None]
    hidden = model.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    logp = fused_logprobs(hidden.flatten(0, 1), model.lm_head.weight, labels.flatten(), temperature=temperature)
    return logp.view(len(seqs), width).sum(-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step")
    ap.add_argument("--k", type=int, default=4, help="samples per prompt (the group of the baseline)")
    ap.add_argument("--tau", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--temperature", type=float, default=1.0)
    args = ap.parse_args()
    if args.steps < 1 or args.prompts < 1 or args.k < 2:
        ap.error("--steps and --prompts must be >= 1 and --k >= 2 (the baseline needs a group)")

    torch.manual_seed(0)
    tok = CharTokenizer()
    problems = make_splits(seed=0, num_train=256, num_eval=8, min_ops=1, max_ops=2, max_operand=9).train
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128, tie_word_embeddings=True,
                                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))
    engine = TorchEngine(copy.deepcopy(model), pad_token_id=tok.pad_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    params = SamplingParams(48, temperature=args.temperature, stop_token_ids=(tok.eos_token_id,))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    rewards_seen, gaps = [], []
    for step in range(args.steps):
        batch = [problems[(step * args.prompts + i) % len(problems)] for i in range(args.prompts)]
        prompts = [tok.encode(p.prompt, bos=True) for p in batch for _ in range(args.k)]  # k samples in a row
        completions = engine.generate(prompts, params)
        responses = [c.token_ids for c in completions]
        rewards = torch.tensor([math_reward(tok.decode(r), p.answer) for r, p in
                                zip(responses, (p for p in batch for _ in range(args.k)))])
        with torch.no_grad():  # pi_i: the policy that sampled, scored once before the update
            ref = sequence_logprobs(model, prompts, responses, tok.pad_token_id, args.temperature)
        # on-policy check: the trainer's scores equal the engine's sampling log-probs
        gap = float((ref - torch.tensor([sum(c.logprobs) for c in completions])).abs().max())
        loss = pmd_loss(sequence_logprobs(model, prompts, responses, tok.pad_token_id, args.temperature), ref,
                        rewards, group_size=args.k, tau=args.tau)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        push_weights(engine, {n: p.detach() for n, p in model.named_parameters()})
        rewards_seen.append(float(rewards.mean()))
        gaps.append(gap)
        print(json.dumps({"step": step + 1, "reward": rewards_seen[-1], "loss": float(loss.detach()), "logp_gap": gap}), flush=True)
    moved = max(float((p.detach() - start[n]).abs().max()) for n, p in model.named_parameters())
    print(json.dumps({"steps": args.steps, "mean_reward": sum(rewards_seen) / len(rewards_seen),
                      "max_weight_change": moved, "max_logp_gap_to_engine": max(gaps), "engine_in_sync": all(
                          torch.equal(p, q) for p, q in zip(model.parameters(), engine.model.parameters()))}))


if __name__ == "__main__":
    main()
