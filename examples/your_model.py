"""k1.5 RL on your own transformers model and JSONL problems, end to end on a laptop CPU (docs/your_model.md).

    python examples/your_model.py --model-dir /models/my-qwen --work runs/example   # your model
    python examples/your_model.py --work runs/example                               # a stand-in, built here

Steps, each printed as the command a user types:
1. the model: ``--model-dir`` (any causal-LM directory AutoModelForCausalLM / AutoTokenizer load), or a stand-in
   built here from nothing but shipped text: a BPE tokenizer trained with ``tokenizers`` and a small random Qwen2
   (nothing is downloaded; it learns nothing useful in a few iterations, the point is the plumbing);
2. the data: GSM8K rows converted to ``{"prompt", "answer"}`` (train / eval) and their worked solutions to
   ``{"prompt", "response"}`` SFT traces (``--code`` adds MBPP rows, scored in the code sandbox);
3. ``k15 train --set model.path=... --set data.train=... --set data.eval=... --set sft.data=...``;
4. ``k15 export RUN --out DIR``, then the exported directory is loaded with ``AutoModelForCausalLM`` /
   ``AutoTokenizer`` and answers a question with ``generate``.
The last printed line is one JSON object: the run's held-out pass@1 rows and the export's answer.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "data"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return str(path)


def stand_in_model(out: Path) -> str:
    """A small random Qwen2 + a BPE tokenizer trained on the shipped GSM8K / MBPP text (ChatML chat template)."""
    from k15sys.train.scratch_model import save_scratch_model, train_tokenizer

    texts = [r["question"] + "\n" + r["answer"] for r in read_jsonl(DATA / "gsm8k_test.jsonl")]
    texts += [r["prompt"] + "\n" + r["solution"] for r in read_jsonl(DATA / "mbpp_test.jsonl")]
    tok = train_tokenizer(texts, vocab_size=2000)
    return str(save_scratch_model(out, tok, arch="qwen2", hidden_size=64, intermediate_size=128, num_layers=2))


def make_data(work: Path, n_train: int, n_eval: int, code: bool) -> dict[str, str]:
    """JSONL files in k15's forms from the shipped GSM8K (and MBPP) rows; eval rows are disjoint from train rows."""
    gsm = read_jsonl(DATA / "gsm8k_test.jsonl")
    train = [{"prompt": r["question"], "answer": r["final_answer"]} for r in gsm[:n_train]]
    evals = [{"prompt": r["question"], "answer": r["final_answer"]} for r in gsm[-n_eval:]]
    traces = [{"prompt": r["question"], "response": r["answer"].replace("####", "The answer is")} for r in gsm[:n_train]]
    if code:  # MBPP rows as they ship (extra keys are ignored); the first test names the function to write
        mbpp = read_jsonl(DATA / "mbpp_test.jsonl")
        as_row = lambda r: {"prompt": r["prompt"] + "\n" + r["tests"][0], "tests": r["tests"], "language": "python"}  # noqa: E731
        train += [as_row(r) for r in mbpp[:n_train]]
        evals += [as_row(r) for r in mbpp[-n_eval:]]
    return {"train": write_jsonl(work / "train.jsonl", train), "eval": write_jsonl(work / "eval.jsonl", evals),
            "sft": write_jsonl(work / "sft.jsonl", traces)}


def k15(*args: str) -> None:
    """Run one ``k15`` command (printed first, as a user would type it)."""
    print("$ k15 " + " ".join(shlex.quote(a) for a in args), flush=True)
    subprocess.run([sys.executable, "-m", "k15sys.cli", *args], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", default=None, help="your causal-LM directory (default: build a stand-in)")
    ap.add_argument("--work", default="runs/your_model_example", help="directory for the data, the run and the export")
    ap.add_argument("--train-rows", type=int, default=64)
    ap.add_argument("--eval-rows", type=int, default=16)
    ap.add_argument("--sft-steps", type=int, default=20)
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--code", action="store_true", help="also MBPP rows, scored by running their tests in the sandbox")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = args.model_dir or stand_in_model(work / "stand_in_model")
    files = make_data(work, args.train_rows, args.eval_rows, args.code)
    run, exported = work / "run", work / "exported"
    settings = [f"model.path={model}", f"data.train={files['train']}", f"data.eval={files['eval']}",
                f"sft.data={files['sft']}", f"sft.steps={args.sft_steps}", "sft.batch_size=8", "sft.lr=1e-3",
                f"rl.iterations={args.iterations}", "rl.prompts_per_iteration=8", "rl.group_size=4",
                "rl.minibatch_size=16", f"rl.max_new_tokens={args.max_new_tokens}", "eval.every=2",
                "run.progress=false"]
    k15("train", "--output-dir", str(run), "--overwrite", *[a for s in settings for a in ("--set", s)])
    k15("export", str(run), "--out", str(exported))

    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm, tok = AutoModelForCausalLM.from_pretrained(exported), AutoTokenizer.from_pretrained(exported)
    question = read_jsonl(Path(files["eval"]))[0]["prompt"]
    prompt = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    out = lm.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval/pass@1" in r]
    print(json.dumps({"model": model, "run": str(run), "exported": str(exported),
                      "pass@1": {r["iteration"]: r["eval/pass@1"] for r in evals}, "export_answer": answer}))


if __name__ == "__main__":
    main()
