"""Reusable fixtures of ``model.path`` runs: tiny Qwen2 / Llama directories with a locally trained tokenizer, and
JSONL files of shipped GSM8K / MBPP rows in the forms ``k15 train`` reads (docs/your_model.md).

Import the fixtures you use into a test module (``from hf_fixtures import tiny_qwen2, gsm8k_files``); they are
session-scoped, so every test of a session shares one tokenizer and one model directory per architecture.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent.parent / "data"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def gsm8k_rows(start: int, n: int) -> list[dict]:
    """GSM8K test rows as math problems: ``{"prompt": question, "answer": final answer}``."""
    return [{"prompt": r["question"], "answer": r["final_answer"]} for r in read_jsonl(DATA / "gsm8k_test.jsonl")[start : start + n]]


def gsm8k_traces(start: int, n: int) -> list[dict]:
    """GSM8K worked solutions as warm-up traces: ``{"prompt": question, "response": solution ending in #### N}``."""
    return [{"prompt": r["question"], "response": r["answer"]} for r in read_jsonl(DATA / "gsm8k_test.jsonl")[start : start + n]]


def mbpp_rows(start: int, n: int) -> list[dict]:
    """MBPP rows as they ship (``prompt``, assert ``tests``, extra keys such as ``solution`` are ignored by the loader),
    the first test appended to the prompt so that the function name is known."""
    rows = read_jsonl(DATA / "mbpp_test.jsonl")[start : start + n]
    return [{**r, "prompt": r["prompt"] + "\n" + r["tests"][0]} for r in rows]


@pytest.fixture(scope="session")
def scratch_tokenizer():
    """A 1,000-token byte-level BPE trained on GSM8K and MBPP text, with a ChatML chat template."""
    from k15sys.train.scratch_model import train_tokenizer

    texts = [r["question"] + "\n" + r["answer"] for r in read_jsonl(DATA / "gsm8k_test.jsonl")[:400]]
    texts += [r["prompt"] + "\n" + r["solution"] for r in read_jsonl(DATA / "mbpp_test.jsonl")[:200]]
    return train_tokenizer(texts, vocab_size=1000)


def _model_dir(tmp_path_factory, tokenizer, arch: str) -> Path:
    from k15sys.train.scratch_model import save_scratch_model

    return save_scratch_model(tmp_path_factory.mktemp(arch) / "model", tokenizer, arch=arch, hidden_size=32,
                              intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory, scratch_tokenizer) -> Path:
    """A tiny random Qwen2ForCausalLM (tied embeddings) + the scratch tokenizer, saved with save_pretrained."""
    return _model_dir(tmp_path_factory, scratch_tokenizer, "qwen2")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, scratch_tokenizer) -> Path:
    """A tiny random LlamaForCausalLM (untied embeddings) + the scratch tokenizer."""
    return _model_dir(tmp_path_factory, scratch_tokenizer, "llama")


@pytest.fixture(scope="session")
def gsm8k_files(tmp_path_factory) -> dict[str, Path]:
    """``train`` (16 problems), ``eval`` (4 others) and ``sft`` (16 worked solutions) JSONL files of GSM8K rows."""
    d = tmp_path_factory.mktemp("gsm8k")
    return {"train": write_jsonl(d / "train.jsonl", gsm8k_rows(0, 16)),
            "eval": write_jsonl(d / "eval.jsonl", gsm8k_rows(100, 4)),
            "sft": write_jsonl(d / "sft.jsonl", gsm8k_traces(0, 16))}


@pytest.fixture(scope="session")
def mbpp_files(tmp_path_factory) -> dict[str, Path]:
    """``train`` (8 problems) and ``eval`` (4 others) JSONL files of MBPP rows."""
    d = tmp_path_factory.mktemp("mbpp")
    return {"train": write_jsonl(d / "train.jsonl", mbpp_rows(0, 8)),
            "eval": write_jsonl(d / "eval.jsonl", mbpp_rows(50, 4))}
