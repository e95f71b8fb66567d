"""Secure code sandbox for verifiable code rewards (paper 2.6.4).

``Sandbox(limits, workers=N).run(program, language="python"|"cpp", stdin=..., expected=...)`` -> ``RunResult``;
``run_tests`` (one program, many inputs) and ``run_batch`` (many programs over the pool). Threat model,
design and measurements: docs/sandbox.md.
"""
from k15sys.sandbox.isolation import SandboxUnavailable, bwrap_path
from k15sys.sandbox.limits import Limits, Status
from k15sys.sandbox.runner import LANGUAGES, RunRequest, RunResult, Sandbox, TestCase, classify, outputs_match

__all__ = [
    "LANGUAGES", "Limits", "RunRequest", "RunResult", "Sandbox", "SandboxUnavailable", "Status", "TestCase",
    "bwrap_path", "classify", "outputs_match",
]
