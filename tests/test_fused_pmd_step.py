"""The PMD step through fused_logprob_loss (rl.logprob_path=fused) gives the autograd path's gradients (paper 2.3.2).

Checked against a float64 reference (plain log_softmax on a float64 copy of the model) on the CPU: the fused
first step and the autograd step are equally close to it; then, at the trainer level, one iteration's update
is the same on both paths and the fused path is the one taken.
"""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from k15sys.algo import pmd_loss, pmd_seq_grad
from k15sys.train.config import load_config
from k15sys.train.packing import IGNORE_INDEX, pack
from k15sys.train.policy import PackedPolicy

TAU, TEMP = 0.3, 0.7


def _model() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)
    return Qwen2ForCausalLM(cfg).float()


def _batch():
    g = torch.Generator().manual_seed(5)
    lengths = torch.randint(6, 20, (8,), generator=g).tolist()
    seqs = [torch.randint(3, 96, (n,), generator=g).tolist() for n in lengths]
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.5])
    return pack(seqs, [3] * 8, row_tokens=48), rewards


def _reference_grads(lm: Qwen2ForCausalLM, batch, rewards) -> dict[str, torch.Tensor]:
    """Float64, plain torch: sequence log-probs from a full log_softmax, pmd_loss at pi_theta = pi_i."""
    ref_lm = copy.deepcopy(lm).double()
    hidden = ref_lm.model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                          use_cache=False).last_hidden_state.flatten(0, 1)
    logp = torch.log_softmax(hidden @ ref_lm.lm_head.weight.T / TEMP, dim=-1)
    valid = batch.labels != IGNORE_INDEX
    tok = torch.where(valid, logp.gather(1, batch.labels.clamp_min(0)[:, None]).squeeze(1), 0.0)
    seq = torch.zeros(batch.num_seqs, dtype=torch.float64).index_add(0, batch.seq_index.clamp_min(0), tok)
    pmd_loss(seq, seq.detach(), rewards.double(), group_size=4, tau=TAU).backward()
    return {n: p.grad for n, p in ref_lm.named_parameters()}


def test_fused_first_step_gradients_equal_the_autograd_path():
    batch, rewards = _batch()
    lm = _model()
    want = _reference_grads(lm, batch, rewards)

    auto = PackedPolicy(copy.deepcopy(lm))
    with torch.no_grad():
        ref = auto(batch, temperature=TEMP).seq_logp
    seq = auto(batch, temperature=TEMP).seq_logp
    pmd_loss(seq, ref, rewards, group_size=4, tau=TAU).backward()

    fused = PackedPolicy(copy.deepcopy(lm))
    coef = pmd_seq_grad(ref, ref, rewards, group_size=4, tau=TAU)  # delta = 0: the weights are still pi_i
    out = fused(batch, temperature=TEMP, seq_coef=coef, return_entropy=True)
    assert out.loss.requires_grad and not out.seq_logp.requires_grad
    torch.testing.assert_close(out.seq_logp, ref, rtol=0, atol=1e-5)
    out.loss.backward()

    scale = max(float(g.abs().max()) for g in want.values())
    for name, p in fused.lm.named_parameters():
        a = dict(auto.lm.named_parameters())[name].grad
        err_fused = float((p.grad.double() - want[name]).abs().max()) / scale
        err_auto = float((a.double() - want[name]).abs().max()) / scale
        assert err_fused < 1e-5 and err_auto < 1e-5, (name, err_fused, err_auto)
        torch.testing.assert_close(p.grad, a, rtol=1e-4, atol=1e-5 * scale)
    with pytest.raises(ValueError, match="seq_coef"):
        fused(batch, seq_coef=torch.zeros(3))


def _trainer(tmp_path, path: str, normalize: str):
    from k15sys.train.trainer import Trainer

    cfg = load_config(None, ["rl.prompts_per_iteration=4", "rl.group_size=4", "rl.minibatch_size=8", "rl.epochs=2",
                             "rl.max_new_tokens=8", "task.num_train=48", "task.num_eval=8", "run.threads=1",
                             "rl.optimizer=sgd", "rl.lr=0.1", f"rl.normalize={normalize}", f"rl.logprob_path={path}",
                             "rl.skip_zero_advantage=false", "run.progress=false", "run.tensorboard=false",
                             "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2",
                             f"run.output_dir={tmp_path / path}"])
    return Trainer(cfg)


@pytest.mark.parametrize("normalize", ["sum", "mean"])
def test_trainer_update_is_the_same_on_both_paths(tmp_path, normalize):
    """Two minibatches, two epochs: the first step goes through the fused op (counted), the other three through
    autograd; the resulting weights equal the all-autograd run's."""
    from k15sys.rollout import SamplingParams, Trajectory

    runs = {}
    for path in ("autograd", "fused"):
        trainer = _trainer(tmp_path, path, normalize)
        tok = trainer.tokenizer
        prompts = [tok.encode(p.prompt, bos=True) for p in trainer.task.train[:4] for _ in range(4)]
        comps = trainer.engine.generate(prompts, SamplingParams(8, temperature=1.0, seed=11))
        trajs = [Trajectory(group_id=i // 4, sample_index=i % 4, prompt_index=i // 4, prompt_ids=p,
                            response_ids=c.token_ids, finish_reason=c.finish_reason)
                 for i, (p, c) in enumerate(zip(prompts, comps))]
        rewards = torch.tensor([1.0, 0.0, 0.0, 0.0] * 4)
        calls = {"fused": 0}
        policy_forward = trainer.policy.forward

        def counting(batch, **kw):
            calls["fused"] += kw.get("seq_coef") is not None
            return policy_forward(batch, **kw)

        trainer.policy.forward = counting
        before = {n: p.detach().clone() for n, p in trainer.policy.lm.named_parameters()}
        stats = trainer.train_on(trajs, rewards)
        runs[path] = ({n: p.detach() - before[n] for n, p in trainer.policy.lm.named_parameters()}, stats, calls)
        trainer.close()
    (d_auto, s_auto, c_auto), (d_fused, s_fused, c_fused) = runs["autograd"], runs["fused"]
    assert c_auto["fused"] == 0 and c_fused["fused"] == 1
    assert max(float(d.abs().max()) for d in d_auto.values()) > 1e-4  # the step moved the weights
    for n in d_auto:
        torch.testing.assert_close(d_fused[n], d_auto[n], rtol=1e-3, atol=1e-6)
    assert s_fused["rl/loss"] == pytest.approx(s_auto["rl/loss"], rel=1e-4)
