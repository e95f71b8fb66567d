"""Secure code sandbox for verifiable code rewards (paper 2.6.4).

``Sandbox(limits, workers=N).run(program, language="python"|"cpp", stdin=...)`` -> ``RunResult``;
``run_batch`` for many at once. Threat model and measurements: docs/sandbox.md.
"""
from k15sys.sandbox.limits import Limits, Status
from k15sys.sandbox.runner import LANGUAGES, RunRequest, RunResult, Sandbox

__all__ = ["LANGUAGES", "Limits", "RunRequest", "RunResult", "Sandbox", "Status"]
