"""What `k15 train` shows: the RL bar's total follows rl.max_minutes, messages leave the bar line alone,
and the first seconds say what is loading (issue 23 item 4)."""
from __future__ import annotations

import io
import json
import sys

from tqdm import tqdm

from k15sys import cli
from k15sys.train.progress import expected_iterations, note


def test_total_follows_the_time_limit_when_it_stops_first():
    # 15 minutes, 1.1 s per iteration so far: the run stops near iteration 819, not at 1000
    assert expected_iterations(10, 11.0, 1000, 15) == 10 + 809  # ceil(889 s / 1.1 s): the crossing one counts
    assert expected_iterations(10, 11.0, 300, 15) == 300  # the iteration count stops first
    assert expected_iterations(10, 11.0, 1000, 0) == 1000  # no time limit
    assert expected_iterations(0, 0.0, 1000, 15) == 1000  # no pace yet
    assert expected_iterations(900, 901.0, 1000, 15) == 900  # past the limit: this is the last one
    # resumed run: the pace is over every iteration done, the limit over all RL seconds
    assert expected_iterations(400, 450.0, 1000, 15) == 400 + 400


def test_a_note_is_printed_on_its_own_line_above_the_bar(capsys):
    bar = tqdm(range(3), desc="rl", file=sys.stderr)
    bar.update(1)
    note("k15: SIGINT: stopping after this iteration")
    bar.close()
    err = capsys.readouterr().err
    before, _, _ = err.partition("k15: SIGINT")
    assert before.endswith("\r")  # the bar line was cleared first, the note is not glued to it
    assert "k15: SIGINT: stopping after this iteration\n" in err


def test_train_says_what_is_loading_first(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"iteration": 0}) + "\n")  # a previous run: refused
    code = cli.main(["train", "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "config error" in err
    assert err.index("k15: loading torch, the data and the built-in model") < err.index("config error")
    code = cli.main(["train", "--output-dir", str(tmp_path), "--set", "run.progress=false"])
    assert code == 2 and "k15: loading" not in capsys.readouterr().err


def test_the_rl_bar_of_a_time_limited_run_ends_at_its_real_stop(tmp_path, capsys):
    from k15sys.train import Trainer, load_config

    cfg = load_config(None, ["model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2",
                             "task.num_train=50", "task.num_eval=8", "sft.steps=2", "rl.max_new_tokens=16",
                             "rl.prompts_per_iteration=2", "rl.iterations=1000", "rl.max_minutes=0.01",
                             "eval.every=1000", "run.tensorboard=false", f"run.output_dir={tmp_path}"])
    Trainer(cfg).run()
    last = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if line.startswith("rl:")][-1]
    done, total = last.split("|")[2].split()[0].split("/")
    assert done == total and int(total) < 1000, last  # not "n/1000" with an ETA for 1000 iterations
