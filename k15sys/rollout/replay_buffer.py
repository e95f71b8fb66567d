"""Trajectories and the persistent replay buffer of partial rollouts (paper 2.6.2).

A trajectory is generated in segments, one per iteration at most; each segment records the policy
version that produced it. Unfinished trajectories (and finished members of groups that still wait for
their siblings) live in the :class:`ReplayBuffer`, which saves atomically to disk (write to a temporary
file, fsync, rename), so a crash or a resume loses no trajectory.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Segment:
    policy_version: int
    start: int  # offset in the response
    end: int


@dataclass
class Trajectory:
    """One sample y_j of a prompt: its response so far, per-token log-probs and provenance."""

    group_id: int
    sample_index: int
    prompt_index: int
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    finish_reason: str | None = None  # None while unfinished

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def total_len(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "Trajectory":
        d = dict(d)
        d["segments"] = [Segment(**s) for s in d["segments"]]
        return Trajectory(**d)


@dataclass
class Group:
    """The k trajectories of one prompt; trainable only once all are finished (the baseline needs all)."""

    group_id: int
    prompt_index: int
    trajectories: list[Trajectory]


class ReplayBuffer:
    """Trajectories of groups not yet emitted, keyed by group id; optionally persisted at ``path``."""

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.groups: dict[int, list[Trajectory]] = {}
        self.next_group_id = 0

    def add_group(self, prompt_index: int, prompt_ids: list[int], group_size: int) -> int:
        gid = self.next_group_id
        self.next_group_id += 1
        self.groups[gid] = [Trajectory(gid, j, prompt_index, list(prompt_ids)) for j in range(group_size)]
        return gid

    def unfinished(self) -> list[Trajectory]:
        return [t for g in self.groups.values() for t in g if not t.finished]

    def pop_complete(self) -> list[Group]:
        done = [gid for gid, ts in self.groups.items() if all(t.finished for t in ts)]
        return [Group(gid, self.groups[gid][0].prompt_index, self.groups.pop(gid)) for gid in sorted(done)]

    def __len__(self) -> int:
        return sum(len(g) for g in self.groups.values())

    def state_dict(self) -> dict:
        return {"next_group_id": self.next_group_id,
                "groups": {str(k): [t.to_dict() for t in v] for k, v in self.groups.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.next_group_id = int(state["next_group_id"])
        self.groups = {int(k): [Trajectory.from_dict(t) for t in v] for k, v in state["groups"].items()}

    def save(self, path: str | os.PathLike | None = None) -> None:
        """Atomically write the buffer (and ``extra`` state) to ``path`` (default: the buffer's own path)."""
        target = Path(path) if path is not None else self.path
        if target is None:
            raise ValueError("path: the buffer has no path; pass one")
        atomic_write_json(target, self.state_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ReplayBuffer":
        buf = cls(path)
        buf.load_state_dict(json.loads(Path(path).read_text()))
        return buf


def atomic_write_json(target: Path, obj: dict) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
