"""Unit tests of the main job's pieces: task, tokenizer, config, packing, policy log-probs, checkpoints, metrics."""
from __future__ import annotations

import copy
import errno
import json
import math
import random
import re
import shutil

import pytest
import torch

from k15sys.rewards import math_reward
from k15sys.tasks import CharTokenizer, direct_answer, make_problem, make_splits, solution
from k15sys.train.checkpoint import (CheckpointError, checkpoint_config, latest_checkpoint, load_checkpoint,
                                     save_checkpoint)
from k15sys.train.config import Config, ConfigError, ModelConfig, load_config
from k15sys.train.metrics import MetricsLog, read_metrics
from k15sys.train.model import build_model
from k15sys.train.packing import IGNORE_INDEX, pack
from k15sys.train.policy import PackedPolicy
from k15sys.tasks import sft_examples, warmup_problems


def _eval_chain(text: str) -> int:
    total, num, sign = 0, "", 1
    for ch in text + "+":
        if ch.isdigit():
            num += ch
        else:
            total += sign * int(num)
            num, sign = "", (1 if ch == "+" else -1)
    return total


def test_problems_are_correct_and_solutions_verify():
    rng = random.Random(0)
    tok = CharTokenizer()
    for _ in range(300):
        p = make_problem(rng, rng.randint(1, 6), 9)
        assert _eval_chain(p.prompt[:-1]) == int(p.answer) >= 0
        for vp in (0.0, 1.0):
            sol = solution(p, rng=rng, verify_prob=vp)
            assert math_reward(sol, p.answer) == 1.0
            assert tok.decode(tok.encode(p.prompt + sol)) == p.prompt + sol
        assert len(solution(p, rng=rng, verify_prob=1.0)) > len(solution(p))


def test_self_correcting_traces_expose_the_slip_and_still_verify():
    rng = random.Random(1)
    tok = CharTokenizer()
    slips = 0
    for _ in range(200):
        p = make_problem(rng, rng.randint(2, 5), 9)
        sol = solution(p, rng=rng, verify_prob=1.0, mistake_prob=0.5)
        assert math_reward(sol, p.answer) == 1.0 and tok.decode(tok.encode(sol)) == sol
        # a slip: the wrong value w, its honest check [w inv b = back], '?', then the step redone with its right
        # value r, whose check [r inv b = prev] gives the previous value that the slip's check missed
        for w, inv, b, back, r, r_inv, r_b, prev in re.findall(
                r"(\d+)[+\-\d]*\[\1([+-])(\d+)=(\d+)\]\?(\d+)[+\-\d]*\[\5([+-])(\d+)=(\d+)\]", sol):
            slips += 1
            assert _eval_chain(f"{w}{inv}{b}") == int(back) and _eval_chain(f"{r}{r_inv}{r_b}") == int(prev)
            assert (inv, b) == (r_inv, r_b) and w != r and back != prev
    assert slips > 50
    assert solution(p, rng=random.Random(0), verify_prob=0.7) == solution(p, rng=random.Random(0), verify_prob=0.7,
                                                                           mistake_prob=0.0)


def test_sft_does_not_train_on_the_slips_of_self_correcting_traces():
    """The wrong step of a self-correcting trace is context for the check and the redo, never a label."""
    splits = make_splits(seed=2, num_train=100, num_eval=5, min_ops=2, max_ops=5, max_operand=9)
    tok = CharTokenizer()
    seqs, plens, targets = sft_examples(splits.train, tok, rng=random.Random(3), verify_prob=1.0, n=200,
                                        mistake_prob=0.5)
    batch = pack(seqs, plens, targets=targets, row_tokens=128)
    labelled = batch.labels != IGNORE_INDEX
    slips = 0
    for i, (seq, n, keep) in enumerate(zip(seqs, plens, targets)):
        text = tok.decode(seq[n:])
        hidden = "".join(tok.tokens[t] if k else "_" for t, k in zip(seq[n:], keep[n:]))
        # every '?' closes the check of a slip; the slip (digits and ops before its '[') is the only hidden text
        for m in re.finditer(r"(?:^|=)([\d+\-]+)\[[^\]]*\]\?", text):
            slips += 1
            assert set(hidden[m.start(1):m.end(1)]) == {"_"}
        assert hidden.count("_") == sum(len(m.group(1)) for m in re.finditer(r"(?:^|=)([\d+\-]+)\[[^\]]*\]\?", text))
        # the packed labels of sample i are exactly its kept response tokens
        assert int(labelled[batch.seq_index == i].sum()) == sum(keep[n:])
    assert slips > 50
    assert all(all(k) for k in sft_examples(splits.train, tok, rng=random.Random(3), verify_prob=1.0, n=50)[2])
    with pytest.raises(ValueError, match="targets"):
        pack(seqs[:2], plens[:2], targets=targets[:1])


def test_splits_are_disjoint_seeded_and_labelled():
    a = make_splits(seed=3, num_train=300, num_eval=50, min_ops=2, max_ops=4, max_operand=9)
    b = make_splits(seed=3, num_train=300, num_eval=50, min_ops=2, max_ops=4, max_operand=9)
    assert a == b
    assert not {p.prompt for p in a.train} & {p.prompt for p in a.eval}
    assert {p.difficulty for p in a.train} == {2, 3, 4}
    with pytest.raises(ValueError, match="max_ops"):
        make_splits(seed=0, num_train=1, num_eval=1, min_ops=3, max_ops=2, max_operand=9)


def test_warmup_set_keeps_the_problems_with_at_most_max_ops_operations():
    train = make_splits(seed=2, num_train=300, num_eval=10, min_ops=2, max_ops=5, max_operand=9).train
    assert warmup_problems(train, 0) == list(train)
    easy = warmup_problems(train, 3)
    assert easy and {p.difficulty for p in easy} == {2, 3}
    assert easy == [p for p in train if p.difficulty <= 3]  # same order: the SFT stream stays seeded
    with pytest.raises(ValueError, match="no training problem"):
        warmup_problems([p for p in train if p.difficulty == 5], 3)


def test_direct_answers_verify_and_mix_into_sft_data():
    splits = make_splits(seed=1, num_train=50, num_eval=5, min_ops=2, max_ops=3, max_operand=9)
    p = splits.train[0]
    assert direct_answer(p) == f"\\boxed{{{p.answer}}}" and math_reward(direct_answer(p), p.answer) == 1.0
    tok = CharTokenizer()
    seqs, plens, _ = sft_examples(splits.train, tok, rng=random.Random(0), verify_prob=0.5, n=400, direct_prob=0.6)
    direct = sum(tok.decode(s[n:]).startswith("\\boxed") for s, n in zip(seqs, plens))
    assert 200 <= direct <= 280  # ~60% of 400


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_device_without_cuda_is_a_clear_error():
    from k15sys.train.distributed import resolve_device

    assert resolve_device("auto").type == "cpu"
    with pytest.raises(ValueError, match="run.device"):
        resolve_device("cuda")


def test_tokenizer_rejects_unknown_characters():
    with pytest.raises(ValueError, match="'x'"):
        CharTokenizer().encode("1+x")


def test_tokenizer_boxed_is_one_token():
    tok = CharTokenizer()
    assert tok.encode("\\boxed{7}")[0] == tok.boxed_token_id not in tok.encode("0123456789+-=")


def test_config_yaml_default_overrides_and_errors(tmp_path):
    assert load_config("configs/default.yaml") == Config()
    long_cot = load_config("configs/long_cot_only.yaml")  # a partial file: the rest comes from the defaults
    assert (long_cot.task.direct_prob, long_cot.sft.steps) == (0.0, 525) and long_cot.rl == Config().rl
    cfg = load_config("configs/default.yaml", ["rl.lr=1e-4", "rl.sampler=prioritized"])
    assert cfg.rl.lr == 1e-4 and cfg.rl.sampler == "prioritized"
    for bad, key in [("rl.nope=1", "rl.nope"), ("rl.group_size=0", "rl.group_size"), ("rl.lr=fast", "rl.lr"),
                     ("model.num_kv_heads=3", "model.num_kv_heads"), ("rl.baseline=median", "rl.baseline"),
                     ("nosection.x=1", "nosection"), ("rl.minibatch_size=12", "rl.minibatch_size"),
                     ("run.device=tpu", "run.device"), ("task.mistake_prob=1.5", "task.mistake_prob"),
                     ("task.direct_prob=2", "task.direct_prob"), ("rl.optimizer=adam", "rl.optimizer"),
                     ("run.rollout_workers=-1", "run.rollout_workers"), ("rl.decay_iterations=-1", "rl.decay_iterations"),
                     ("rl.lr_min=1e-3", "rl.lr_min"), ("rl.skip_zero_advantage=maybe", "rl.skip_zero_advantage"),
                     ("run.rollout_threads=-1", "run.rollout_threads"), ("sft.max_ops=1", "sft.max_ops")]:
        with pytest.raises(ConfigError, match=f"^{key}"):
            load_config(None, [bad])
    f = tmp_path / "c.yaml"
    f.write_text("rl:\n  epochs: two\n")
    with pytest.raises(ConfigError, match="^rl.epochs"):
        load_config(f)


@pytest.mark.parametrize("bad, message", [
    # issue 20 item 9: NaN/inf passed (rl.lr=inf wrote a NaN checkpoint, max_minutes=nan meant no limit)
    ("rl.lr=inf", "rl.lr: must be a finite number, got inf"), ("rl.lr=.inf", "rl.lr: must be a finite number"),
    ("rl.truncated_reward=nan", "rl.truncated_reward: must be a finite number, got nan"),
    ("rl.max_minutes=nan", "rl.max_minutes: must be a finite"), ("rl.repeat_penalty=-.inf", "rl.repeat_penalty: must be"),
    ("sft.lr=1e999", "sft.lr: must be a finite"), ("data.code_timeout_s=inf", "data.code_timeout_s: must be a finite"),
    ("run.threads=100000", r"run.threads: must be <= \d+, got 100000 \(\d+ CPUs here\)"),
    ("run.rollout_threads=100000", "run.rollout_threads: must be <="),
    ("run.rollout_workers=100000", "run.rollout_workers: must be <="),
    # issue 23 item 5: settings that ran the whole warm-up and then trained nothing
    ("rl.temperature=0", r"rl.temperature: must be > 0.0, got 0.0 \(rollouts must sample"),
    ("rl.group_size=1", r"rl.group_size: must be >= 2, got 1 \(a group of one sample .* zero advantage"),
    ("rl.lr=0", "rl.lr: must be > 0.0, got 0.0 .*trains nothing"), ("sft.lr=0", "sft.lr: must be > 0 with sft.steps"),
    ("long2short.dpo_beta=0", "long2short.dpo_beta: must be > 0"), ("rl.tau=0", "rl.tau: must be > 0"),
    ("rl.repeat_penalty=0.5", "rl.repeat_penalty: must be <= 0"), ("long2short.merge_alpha=1.5", "long2short.merge_alpha"),
    ("task.verify_prob=1.01", "task.verify_prob: must be <= 1.0"),
])
def test_config_refuses_non_finite_out_of_range_and_no_op_values(bad, message):
    with pytest.raises(ConfigError, match=f"^{message}"):
        load_config("configs/default.yaml", [bad])


def test_config_refuses_combinations_that_do_nothing():
    with pytest.raises(ConfigError, match=r"^eval.temperature: must be > 0 with eval.num_samples=4 .*pass@1"):
        load_config(None, ["eval.num_samples=4", "eval.temperature=0"])
    assert load_config(None, ["eval.temperature=0"]).eval.temperature == 0  # greedy pass@1 alone: fine
    assert load_config(None, ["sft.steps=0", "sft.lr=0"]).sft.lr == 0  # no warm-up: its learning rate is unused
    with pytest.raises(ConfigError, match=r"^rl.length_penalty_warmup: 50 >= rl.iterations=50.* never applies"):
        load_config(None, ["rl.length_penalty_weight=0.5", "rl.length_penalty_warmup=50", "rl.iterations=50"])


def test_trainer_checks_a_config_built_in_python(tmp_path):
    """dataclasses.replace skips load_config's checks; the Trainer refuses the config before building anything."""
    import dataclasses

    from k15sys.train.trainer import Trainer

    cfg = load_config(None, [f"run.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="^rl.temperature: must be > 0"):
        Trainer(dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, temperature=0.0)))
    with pytest.raises(ConfigError, match="^rl.lr: must be a finite number"):
        Trainer(dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, lr=float("inf"))))


@pytest.mark.parametrize("row_tokens", [0, 7, 12])
def test_packing_matches_separate_forward(row_tokens):
    lm = build_model(ModelConfig(hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2),
                     24, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    policy = PackedPolicy(lm)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 24, (n,), generator=g).tolist() for n in (6, 2, 9, 4)]
    plens = [3, 1, 5, 1]
    batch = pack(seqs, plens, row_tokens=row_tokens)
    assert batch.num_tokens == sum(map(len, seqs))
    assert int((batch.labels != IGNORE_INDEX).sum()) == sum(len(s) - p for s, p in zip(seqs, plens))
    out = policy(batch, return_entropy=True)
    for i, (s, p) in enumerate(zip(seqs, plens)):
        logits = lm(torch.tensor([s])).logits[0].detach().double().log_softmax(-1)
        ref = sum(float(logits[t, s[t + 1]]) for t in range(p - 1, len(s) - 1))
        assert out.seq_logp[i].item() == pytest.approx(ref, abs=1e-4)
        assert out.num_tokens[i].item() == len(s) - p
    out.seq_logp.sum().backward()
    assert lm.model.embed_tokens.weight.grad is not None


def test_pack_rejects_empty_response():
    with pytest.raises(ValueError, match="prompt_lens"):
        pack([[1, 2, 3]], [3])


def test_checkpoint_is_atomic_and_pruned(tmp_path):
    root = tmp_path / "ck"
    assert latest_checkpoint(root) is None
    for it in range(4):
        save_checkpoint(root, it, {"iteration": it, "w": torch.full((3,), float(it))}, keep=2)
    assert latest_checkpoint(root).name == "iter_000003"
    assert sorted(p.name for p in root.glob("iter_*")) == ["iter_000002", "iter_000003"]
    assert load_checkpoint(latest_checkpoint(root))["w"].tolist() == [3.0] * 3
    # a torn write (a temp dir left by a kill) is ignored
    (root / ".tmp_iter_000004_1").mkdir()
    assert latest_checkpoint(root).name == "iter_000003"


def test_checkpoint_config_is_read_without_the_weights(tmp_path):
    cfg = {"rl": {"lr": 3e-5}, "model": {"hidden_size": 32}}
    ck = save_checkpoint(tmp_path, 7, {"iteration": 7, "config": cfg, "model": {"w": torch.ones(2)}})
    assert json.loads((ck / "config.json").read_text()) == cfg == checkpoint_config(ck)
    (ck / "config.json").write_text(json.dumps({"rl": {"lr": 3e-3}, "model": {"hidden_size": 32}}, indent=1))
    with pytest.raises(CheckpointError, match="config.json fails its sha256"):  # same size, other bytes
        checkpoint_config(ck)
    (ck / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        checkpoint_config(ck)


def _ckpts(root, *iterations, keep=3):
    for it in iterations:
        save_checkpoint(root, it, {"iteration": it, "w": torch.full((64,), float(it)), "config": {"it": it}}, keep=keep)


def _flip_byte(path, offset=-100):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing_dir", "no_manifest"])
def test_resume_falls_back_to_the_newest_intact_checkpoint_and_says_so(tmp_path, damage):
    """Issue 20 item 7: a damaged newest checkpoint (flipped bytes, a truncated state.pt, `latest` naming a deleted
    directory, no manifest) is skipped with a message; the previous intact one is used."""
    _ckpts(tmp_path, 1, 2)
    newest = tmp_path / "iter_000002"
    if damage == "flip":
        _flip_byte(newest / "state.pt")
    elif damage == "truncate":
        (newest / "state.pt").write_bytes((newest / "state.pt").read_bytes()[:50])
    elif damage == "missing_dir":
        shutil.rmtree(newest)
    else:
        (newest / "manifest.json").unlink()
    said = []
    path = latest_checkpoint(tmp_path, log=said.append)
    assert path == tmp_path / "iter_000001" and load_checkpoint(path)["iteration"] == 1
    assert "iter_000002" in said[0] and "iter_000001" in said[-1]
    reason = {"flip": "sha256", "truncate": "truncated", "missing_dir": "missing", "no_manifest": "manifest.json"}[damage]
    assert reason in said[0]
    if damage != "missing_dir":
        with pytest.raises(CheckpointError, match=reason):
            load_checkpoint(newest)


def test_a_read_error_counts_as_damage(tmp_path, monkeypatch):
    """EIO while hashing (a bad sector) skips the checkpoint like a wrong byte, rather than ending the resume."""
    from k15sys.train import checkpoint

    _ckpts(tmp_path, 1, 2)
    sha256 = checkpoint._sha256

    def bad_sector(path):
        if path.parent.name == "iter_000002" and path.name == "state.pt":
            raise OSError(errno.EIO, "Input/output error")
        return sha256(path)

    monkeypatch.setattr(checkpoint, "_sha256", bad_sector)
    said = []
    assert latest_checkpoint(tmp_path, log=said.append).name == "iter_000001"
    assert "iter_000002: state.pt unreadable ([Errno 5] Input/output error)" in said[0]

def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    assert latest_checkpoint(tmp_path / "none") is None  # never checkpointed: a fresh start is right
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / ".tmp_iter_000000_7").mkdir()  # killed during the first save: nothing was completed
    assert latest_checkpoint(tmp_path / "ck") is None
    _ckpts(tmp_path / "ck", 1, 2)
    for name in ("iter_000001", "iter_000002"):
        _flip_byte(tmp_path / "ck" / name / "state.pt", offset=10)
    with pytest.raises(CheckpointError, match="no intact checkpoint.*iter_000002.*iter_000001"):
        latest_checkpoint(tmp_path / "ck")
    for name in ("iter_000001", "iter_000002"):
        shutil.rmtree(tmp_path / "ck" / name)
    with pytest.raises(CheckpointError, match="iter_000002: missing"):  # `latest` still names one
        latest_checkpoint(tmp_path / "ck")


def test_retention_keeps_the_checkpoint_just_written_and_sets_later_ones_aside(tmp_path):
    """A save below the highest checkpoint number (a run that went back past damaged checkpoints) used to delete
    the checkpoint it had just written; later checkpoints are now moved to abandoned/, older ones pruned."""
    _ckpts(tmp_path, 3, 4, 5, keep=2)
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_000004", "iter_000005"]
    _flip_byte(tmp_path / "iter_000005" / "state.pt")
    save_checkpoint(tmp_path, 1, {"iteration": 1, "w": torch.zeros(4)}, keep=2)
    assert latest_checkpoint(tmp_path).name == "iter_000001" and load_checkpoint(tmp_path / "iter_000001")["iteration"] == 1
    assert sorted(p.name for p in (tmp_path / "abandoned").iterdir()) == ["iter_000004", "iter_000005"]
    _ckpts(tmp_path, 2, 3, keep=2)
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_000002", "iter_000003"]
    _ckpts(tmp_path, 4, keep=2)  # an abandoned/iter_000004 already exists: the new one is a separate directory
    assert latest_checkpoint(tmp_path).name == "iter_000004" and load_checkpoint(tmp_path / "iter_000004")["w"][0] == 4


def test_checkpoint_of_the_same_iteration_is_replaced_without_a_gap(tmp_path):
    """Warm-up checkpoints reuse iteration 0: the old copy stays until the new one is in place, so a crash between the
    two renames still leaves an intact checkpoint (.old_iter_*), which a resume finds."""
    _ckpts(tmp_path, 0)
    save_checkpoint(tmp_path, 0, {"iteration": 0, "w": torch.ones(2)})
    assert load_checkpoint(latest_checkpoint(tmp_path))["w"].tolist() == [1.0, 1.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_000000", "latest"]
    (tmp_path / "iter_000000").rename(tmp_path / ".old_iter_000000")  # killed between the two renames
    said = []
    assert latest_checkpoint(tmp_path, log=said.append).name == ".old_iter_000000" and "missing" in said[0]
    save_checkpoint(tmp_path, 0, {"iteration": 0, "w": torch.zeros(2)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_000000", "latest"]


def test_a_settled_checkpoint_is_hashed_once_per_process_and_a_rewrite_again(tmp_path, monkeypatch):
    """`k15 train --resume` verifies a checkpoint for its config, its choice and its load: one hash of a file that
    has not changed since; a file changed after its hash (same size, other bytes) is hashed again and fails."""
    import os
    import time

    from k15sys.train import checkpoint

    _ckpts(tmp_path, 1)
    state = tmp_path / "iter_000001" / "state.pt"
    hashed, sha256 = [], checkpoint._sha256
    monkeypatch.setattr(checkpoint, "_sha256", lambda p: hashed.append(p.name) or sha256(p))
    load_checkpoint(latest_checkpoint(tmp_path))
    assert hashed.count("state.pt") == 2  # just written: not remembered
    hour_ago = time.time_ns() - 3600 * 10**9
    os.utime(state, ns=(hour_ago, hour_ago))
    now = time.time_ns
    monkeypatch.setattr(checkpoint.time, "time_ns", lambda: now() + 10 * 10**9)  # its ctime settles too
    hashed.clear()
    for _ in range(3):
        load_checkpoint(latest_checkpoint(tmp_path))
    assert hashed.count("state.pt") == 1
    with state.open("r+b") as f:  # damaged in place: same size, new mtime
        f.seek(-100, 2)
        byte = f.read(1)
        f.seek(-100, 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(tmp_path / "iter_000001")

def test_save_removes_crash_leftovers(tmp_path):
    """Issue 20 item 8: .tmp_iter_* directories left by a kill during a save are removed by the next save."""
    _ckpts(tmp_path, 1)
    (tmp_path / ".tmp_iter_000002_99").mkdir()
    (tmp_path / ".tmp_iter_000002_99" / "state.pt").write_bytes(b"torn")
    assert latest_checkpoint(tmp_path).name == "iter_000001"
    _ckpts(tmp_path, 2)
    assert not list(tmp_path.glob(".tmp_iter_*"))


def test_full_disk_is_a_clear_error_naming_the_directory_and_free_space(tmp_path, monkeypatch):
    """Issue 20 item 8: a file system too small for the tensors is refused before writing; a failing write (torch
    reports a full disk as "enforce fail at inline_container.cc") names the directory and its free space."""
    from k15sys.train import checkpoint

    _ckpts(tmp_path, 1)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(tmp_path))} has 0.00 GiB free.*need 0.00 GiB") as e:
        save_checkpoint(tmp_path, 2, {"w": torch.zeros(1000)})
    assert e.value.errno == errno.ENOSPC
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: usage._replace(free=3 * 2**30))

    def full(obj, f):
        f.write(b"x" * 10)
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(CheckpointError, match=rf"writing iter_000002 under {re.escape(str(tmp_path))} failed with 3.00 GiB free "
                                              r"there: \[enforce fail"):
        save_checkpoint(tmp_path, 2, {"w": torch.zeros(10)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_000001", "latest"]  # no torn directory left
    assert latest_checkpoint(tmp_path).name == "iter_000001"


def test_metrics_jsonl_truncate(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=True)
    for it in range(5):
        log.log({"iteration": it, "rl/reward": it / 10})
    log.truncate(2)
    assert [r["iteration"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0, 1, 2]
    assert any((tmp_path / "tensorboard").iterdir())
    with pytest.raises(ValueError, match="iteration"):
        log.log({"x": 1})
    log.close()


def test_zero_advantage_groups_are_skipped_and_carry_no_gradient():
    """rl.skip_zero_advantage: groups of equal rewards are dropped; on-policy their PMD gradient is zero,
    so the kept groups' gradient is the full batch's up to the 1/N of the mean."""
    from k15sys.algo import pmd_loss
    from k15sys.train.trainer import informative_groups

    k = 4
    rewards = torch.tensor([0., 0., 0., 0., 1., 0., 1., 0., 1., 1., 1., 1., -1., 1., 1., 1.])
    trajs = [f"t{i}" for i in range(16)]
    kept, kept_r = informative_groups(trajs, rewards, k)
    assert kept == trajs[4:8] + trajs[12:16]
    assert torch.equal(kept_r, torch.cat([rewards[4:8], rewards[12:16]]))
    logp = torch.randn(16, dtype=torch.float64, requires_grad=True)
    ref = logp.detach().clone()
    pmd_loss(logp, ref, rewards, group_size=k, tau=0.3).backward()
    full = logp.grad.clone()
    assert torch.all(full[0:4] == 0) and torch.all(full[8:12] == 0)
    logp.grad = None
    idx = torch.tensor([4, 5, 6, 7, 12, 13, 14, 15])
    pmd_loss(logp[idx], ref[idx], kept_r, group_size=k, tau=0.3).backward()
    torch.testing.assert_close(logp.grad[idx] * 8 / 16, full[idx])


def test_rollout_threads_zero_means_run_threads_also_outside_an_iteration(tmp_path):
    """run.rollout_threads=0 generates on run.threads: the SFT evaluation row runs outside rl_iteration, on a
    caller's thread count that differs from run.threads."""
    from k15sys.train.trainer import Trainer

    cfg = load_config(None, ["task.num_train=48", "task.num_eval=8", "rl.max_new_tokens=8", "run.threads=2",
                             "run.rollout_threads=0", "run.progress=false", "run.tensorboard=false",
                             "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2",
                             f"run.output_dir={tmp_path}"])
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        trainer = Trainer(cfg)
        seen: set[int] = set()
        generate = trainer.engine.generate

        def counting_generate(*args, **kwargs):
            seen.add(torch.get_num_threads())
            return generate(*args, **kwargs)

        trainer.engine.generate = counting_generate
        trainer._evaluate()
        assert seen == {2} and torch.get_num_threads() == 3
        trainer.close()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("tempered", [True, False])
def test_pmd_log_probs_are_taken_at_the_rollout_temperature(tmp_path, tempered):
    """rl.tempered_logprobs: the trainer scores rollouts under softmax(logits / rl.temperature), which equals the
    engine's own sampling log-probs (the samples are on-policy); false scores them under the untempered logits."""
    from k15sys.rollout import SamplingParams
    from k15sys.train.trainer import Trainer

    cfg = load_config(None, ["rl.prompts_per_iteration=4", "rl.group_size=4", "rl.minibatch_size=8",
                             "rl.max_new_tokens=8", "task.num_train=48", "task.num_eval=8", "run.threads=1",
                             "rl.temperature=0.5", f"rl.tempered_logprobs={str(tempered).lower()}",
                             "rl.skip_zero_advantage=false", "run.progress=false", "run.tensorboard=false",
                             "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2",
                             "run.device=cpu", f"run.output_dir={tmp_path}"])
    trainer = Trainer(cfg)
    tok = trainer.tokenizer
    prompts = [tok.encode(p.prompt, bos=True) for p in trainer.task.train[:6]]
    comps = trainer.engine.generate(prompts, SamplingParams(12, temperature=0.5, seed=3))
    batch = pack([p + c.token_ids for p, c in zip(prompts, comps)], [len(p) for p in prompts])
    with torch.no_grad():
        at_t = trainer.policy(batch, temperature=0.5).seq_logp
        untempered = trainer.policy(batch).seq_logp
    sampled = torch.tensor([sum(c.logprobs) for c in comps], dtype=at_t.dtype)
    torch.testing.assert_close(at_t, sampled, atol=1e-4, rtol=0)
    assert float((untempered - sampled).abs().max()) > 1e-2
    seen: list[float] = []
    forward = trainer.policy.forward

    def recording_forward(*args, **kwargs):
        seen.append(kwargs.get("temperature", 1.0))
        return forward(*args, **kwargs)

    trainer.policy.forward = recording_forward
    for _ in range(3):
        trainer.rl_iteration()
    assert seen and set(seen) == {0.5 if tempered else 1.0}
    trainer.close()


def test_rl_learning_rate_warmup_and_cosine_decay():
    from k15sys.train.trainer import rl_learning_rate

    constant = load_config(None, ["rl.lr=1e-5", "rl.decay_iterations=0"]).rl
    assert [rl_learning_rate(constant, i) for i in (0, 7, 500)] == [1e-5] * 3
    decay = load_config(None, ["rl.lr=1e-5", "rl.lr_min=2e-6", "rl.decay_iterations=100"]).rl
    lrs = [rl_learning_rate(decay, i) for i in range(0, 201, 25)]
    assert lrs[0] == pytest.approx(1e-5) and lrs[2] == pytest.approx(6e-6) and lrs[4:] == pytest.approx([2e-6] * 5)
    assert all(a > b for a, b in zip(lrs[:4], lrs[1:5]))  # falls monotonically until the end of the decay
    both = load_config(None, ["rl.lr=1e-5", "rl.lr_min=0", "rl.decay_iterations=10", "rl.warmup_iterations=4"]).rl
    assert rl_learning_rate(both, 0) == pytest.approx(0.25 * 1e-5 * 0.5 * (1 + math.cos(0.0)))
    assert rl_learning_rate(both, 10) == 0.0


def test_rl_iteration_trains_only_the_informative_groups(tmp_path):
    """With rl.skip_zero_advantage (the default) an iteration trains the groups whose rewards differ and logs
    how many; an iteration where every group agrees trains nothing and leaves the weights as they were."""
    from k15sys.train.trainer import Trainer

    cfg = load_config(None, ["rl.prompts_per_iteration=4", "rl.group_size=4", "rl.minibatch_size=8",
                             "rl.max_new_tokens=16", "task.num_train=48", "task.num_eval=8", "run.threads=1",
                             "run.progress=false", "run.tensorboard=false", "model.hidden_size=32",
                             "model.intermediate_size=64", "model.num_layers=2", f"run.output_dir={tmp_path}"])
    trainer = Trainer(cfg)
    real_rewards = trainer.rewards
    mixed = torch.tensor([1.0, 0.0, 0.0, 0.0])  # group 0 mixed, the others uniform

    def first_group_mixed(groups, it):
        correct, _, info = real_rewards(groups, it)
        rewards = torch.cat([mixed if g == 0 else torch.zeros(4) for g in range(len(groups))])
        return correct, rewards, info

    trainer.rl_iteration()  # partial rollouts: the first groups complete in the second iteration
    trainer.rewards = first_group_mixed
    row = trainer.rl_iteration()
    assert row["rl/groups"] >= 2 and row["rl/trained_groups"] == 1 and "rl/loss" in row
    def all_agree(groups, it):
        correct, _, info = real_rewards(groups, it)
        return correct, torch.zeros(4 * len(groups)), info

    trainer.rewards = all_agree
    before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    row = trainer.rl_iteration()
    assert row["rl/groups"] >= 1 and row["rl/trained_groups"] == 0 and "rl/loss" not in row
    assert all(torch.equal(before[k], v) for k, v in trainer.policy.state_dict().items())
    trainer.close()


def test_generation_and_training_use_their_own_thread_counts(tmp_path):
    """run.rollout_threads applies while the engine generates (rollouts, evaluation), run.threads while training;
    the caller's own thread count is left as it was (a library user's process setting is not changed)."""
    from k15sys.train.trainer import Trainer

    cfg = load_config(None, ["rl.prompts_per_iteration=4", "rl.group_size=4", "rl.minibatch_size=8",
                             "rl.max_new_tokens=8", "task.num_train=48", "task.num_eval=8", "run.threads=2",
                             "run.rollout_threads=1", "run.progress=false", "run.tensorboard=false", "sft.steps=2",
                             "rl.skip_zero_advantage=false", "model.hidden_size=32",
                             "model.intermediate_size=64", "model.num_layers=2", f"run.output_dir={tmp_path}"])
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        trainer = Trainer(cfg)
        assert torch.get_num_threads() == 3
        seen: dict[str, set[int]] = {"generate": set(), "train": set()}
        generate, forward = trainer.engine.generate, trainer.policy.forward

        def counting_generate(*args, **kwargs):
            seen["generate"].add(torch.get_num_threads())
            return generate(*args, **kwargs)

        def counting_forward(*args, **kwargs):
            seen["train"].add(torch.get_num_threads())
            return forward(*args, **kwargs)

        trainer.engine.generate, trainer.policy.forward = counting_generate, counting_forward
        trainer.sft()
        assert torch.get_num_threads() == 3
        trainer._evaluate()
        for _ in range(2):
            trainer.rl_iteration()
        assert seen == {"generate": {1}, "train": {2}} and torch.get_num_threads() == 3
        trainer.close()
    finally:
        torch.set_num_threads(before)


def _bf16_linear_and_masters(lr: float = 1e-5):
    from k15sys.train.optim import build_optimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)).to(torch.bfloat16)
    model[1].float()  # a float32 parameter: stepped directly, no copy
    return model, build_optimizer("adamw", model, lr=lr, master_weights=True)


def _grads(model, seed: int) -> None:
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    model[1](model[0](x).float()).square().mean().backward()


def test_master_weights_step_fp32_copies_as_fp32_adamw_would():
    """Each step equals fp32 AdamW on the fp32 copies fed the bf16 gradients upcast, and the bf16 parameters are its
    rounding; bf16 AdamW alone loses these small updates (weights above 0.02 do not move)."""
    from k15sys.train.optim import MasterWeights

    model, opt = _bf16_linear_and_masters()
    assert isinstance(opt, MasterWeights) and opt.masters[2] is model[1].weight
    ref = [torch.nn.Parameter(p.detach().float().clone()) for p in model.parameters()]
    ref_opt = torch.optim.AdamW(ref, lr=1e-5, betas=(0.9, 0.98), weight_decay=0.0)
    plain = copy.deepcopy(model)
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-5, betas=(0.9, 0.98), weight_decay=0.0)
    start = plain[0].weight.detach().clone()
    for step in range(40):
        opt.zero_grad()
        _grads(model, step)
        for r, p in zip(ref, model.parameters()):
            r.grad = p.grad.float()
        opt.step()
        ref_opt.step()
        plain_opt.zero_grad()
        _grads(plain, step)
        plain_opt.step()
    assert all(torch.equal(m, r) for m, r in zip(opt.masters, ref))
    assert all(torch.equal(p, r.to(p.dtype)) for p, r in zip(model.parameters(), ref))
    assert all(st["exp_avg"].dtype == torch.float32 for st in opt.state.values())
    big = start.abs() > 0.02  # weights whose bf16 spacing (>= 1.2e-4) exceeds 40 steps of 1e-5
    moved = lambda w: float((w != start)[big].float().mean())  # noqa: E731
    assert moved(model[0].weight) > 0.1  # the masters moved some of them ...
    assert moved(plain[0].weight) == 0.0  # ... bf16 AdamW alone rounded every update away


def test_master_weights_state_dict_resumes_exactly_and_refuses_a_plain_state():
    import torch.nn.functional as F  # noqa: F401

    model, opt = _bf16_linear_and_masters(lr=1e-3)
    for step in range(2):
        opt.zero_grad()
        _grads(model, step)
        opt.step()
    saved, weights = opt.state_dict(), copy.deepcopy(model.state_dict())
    assert all(t.dtype == torch.float32 for t in saved["master_weights"].values())
    model2, opt2 = _bf16_linear_and_masters(lr=0.5)
    model2.load_state_dict(weights)
    opt2.load_state_dict(saved)
    assert opt2.param_groups[0]["lr"] == 1e-3
    for m, mm in ((model, opt), (model2, opt2)):
        for step in range(2, 4):
            mm.zero_grad()
            _grads(m, step)
            mm.step()
    assert all(torch.equal(a, b) for a, b in zip(opt.masters, opt2.masters))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    plain = torch.optim.AdamW(model.parameters()).state_dict()
    with pytest.raises(ValueError, match="master_weights=none"):
        opt2.load_state_dict(plain)


def test_trainer_offload_moves_the_master_weights_too():
    from k15sys.train.hybrid import TrainerOffload

    model, opt = _bf16_linear_and_masters()
    _grads(model, 0)
    opt.step()
    off = TrainerOffload(model, opt, torch.device("cpu"))
    off.enabled = True  # the device path, with the CPU as the device
    module, rest = off.tensors()
    masters = [m for m in opt.masters if m.dtype == torch.float32 and all(m is not p for p in model.parameters())]
    assert len(masters) == 2 and all(any(m is t for t in rest) for m in masters)
    before = [t.clone() for t in module + rest]
    off.offload()  # the bf16 parameters are their masters' rounding: recomputed at onload, not copied
    assert all(p.stride() == (0,) * p.dim() for p in model[0].parameters())
    assert len(off.mirror._views) == len(module + rest) - 2  # model[0]'s weight and bias stayed out
    off.onload()
    assert all(torch.equal(t, b) and t.stride() == b.stride() for t, b in zip(module + rest, before))
    with torch.no_grad():
        model[0].weight.add_(1.0)  # no longer the master's rounding: copied like any other tensor
    before = [t.clone() for t in module + rest]
    off.offload()
    assert model[0].weight.stride() != (0, 0) and model[0].bias.stride() == (0,)
    off.onload()
    assert all(torch.equal(t, b) for t, b in zip(module + rest, before))


def test_bf16_model_trains_resumes_and_checkpoints_fp32_masters(tmp_path):
    """The toy run in bf16 with model.master_weights=fp32 (the default): the checkpoint holds bf16 weights and fp32
    masters, and a resumed run ends where the uninterrupted one does."""
    from k15sys.train.checkpoint import latest_checkpoint, load_checkpoint
    from k15sys.train.trainer import Trainer

    opts = ["sft.steps=2", "sft.batch_size=4", "rl.prompts_per_iteration=2", "rl.group_size=2", "rl.minibatch_size=4",
            "rl.max_new_tokens=8", "rl.skip_zero_advantage=false", "task.num_train=8", "task.num_eval=2",
            "eval.every=10", "run.checkpoint_every=1", "run.threads=1", "run.progress=false", "run.tensorboard=false",
            "model.hidden_size=16", "model.intermediate_size=32", "model.num_layers=1", "model.dtype=bfloat16"]
    tr = Trainer(load_config(None, [*opts, "rl.iterations=2", f"run.output_dir={tmp_path / 'a'}"]))
    start = [m.detach().clone() for m in tr.optimizer.masters]
    tr.sft()  # the warm-up's own optimizer moves the parameters: RL's masters follow them
    assert not all(torch.equal(m, s) for m, s in zip(tr.optimizer.masters, start))
    assert all(torch.equal(m, p.float()) for m, p in zip(tr.optimizer.masters, tr.optimizer.params))
    Trainer(load_config(None, [*opts, "rl.iterations=2", f"run.output_dir={tmp_path / 'a'}"])).run()
    Trainer(load_config(None, [*opts, "rl.iterations=1", f"run.output_dir={tmp_path / 'b'}"])).run()
    Trainer(load_config(None, [*opts, "rl.iterations=2", f"run.output_dir={tmp_path / 'b'}"])).run(resume=True)
    a, b = (load_checkpoint(latest_checkpoint(tmp_path / r / "checkpoints")) for r in "ab")
    assert a["iteration"] == b["iteration"] == 2
    assert all(t.dtype == torch.bfloat16 for t in a["model"].values() if t.is_floating_point())
    assert all(t.dtype == torch.float32 for t in a["optimizer"]["master_weights"].values())
    for name, t in a["optimizer"]["master_weights"].items():
        assert torch.equal(t, b["optimizer"]["master_weights"][name]), name
        assert torch.equal(t.to(torch.bfloat16), a["model"][name.removeprefix("lm.")]), name
