"""k15sys: the reinforcement-learning system of Kimi k1.5 (arXiv 2501.12599) as a library.

Subpackages, each owning one part of the paper:

- ``k15sys.algo``     policy mirror descent loss, length penalty, samplers, long2short, repeat detection
                      (sections 2.3, 2.4, 2.6.2)
- ``k15sys.ops``      differentiable kernels: fused log-probs, varlen attention (Triton / torch)
- ``k15sys.rewards``  math and code rewards (2.3.5)
- ``k15sys.sandbox``  secure code execution (2.6.4)
- ``k15sys.rollout``  rollout engines, partial rollouts with a replay buffer (2.6.2)
- ``k15sys.weights``  layout resharding and the checkpoint engine (2.6.3)
- ``k15sys.train``    the trainer and the main job (2.6)

Subpackages are imported lazily so that ``import k15sys`` stays cheap.
"""
from __future__ import annotations

__version__ = "0.1.0"
