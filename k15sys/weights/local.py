"""Single-process weight sync: trainer tensors -> a rollout engine in the same process (paper 2.6.3).

A version is the complete set of the engine's weights: every tensor it generates with, none it does not know,
each of its shape, in a floating-point precision an engine converts to (fp32 / fp16 / bf16, e.g. fp32 master
weights into a bf16 engine). :func:`check_weights` says so before anything is copied, so a bad version changes
nothing. :func:`push_weights` hands a checked version to ``engine.update_weights``.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from k15sys.weights.layout import ModelLayout

_PRECISIONS = (torch.float32, torch.float16, torch.bfloat16)  # converted into one another on the way in


def module_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A module's weights by name: its parameters (tied ones once) and persistent buffers (not the ones
    recomputed from the config, such as rotary frequencies). FSDP2 parameters stay DTensors (shards)."""
    out = dict(module.named_parameters())
    buffers = dict(module.named_buffers())
    out.update({n: buffers[n] for n in module.state_dict(keep_vars=True) if n in buffers})
    return out


def engine_weights(engine: Any) -> tuple[dict[str, torch.Tensor], set[str]] | None:
    """The tensors an in-process engine generates with, in place, by HF name, and the names it may also take
    (its non-persistent buffers): an engine with an ``nn.Module`` ``model`` (``TorchEngine``, ``PagedEngine``).
    None for engines that keep their weights elsewhere (``VLLMEngine``, ``RemoteEngine``)."""
    model = getattr(engine, "model", None)
    if not isinstance(model, torch.nn.Module):
        return None
    own = module_weights(model)
    return own, {n for n, _ in model.named_buffers()} - own.keys()


def check_weights(named: Iterable[tuple[str, Any]], expected: Mapping[str, Any] | None = None, *,
                  optional: Iterable[str] = (), what: str = "weights") -> list[tuple[str, Any]]:
    """The pairs of ``named`` as a list, or a ValueError naming the first bad tensor.

    Args:
        named: (name, tensor) pairs; a tensor may be a DTensor (its full shape is checked).
        expected: the receiver's tensors by name (None: check dtypes only). Every one must be sent, with its
            shape; names outside ``expected`` and ``optional`` are unknown.
        optional: names the receiver also takes but does not need.
        what: how the error names the input.
    """
    pairs = list(named)
    maybe = set(optional)
    seen: set[str] = set()
    for name, t in pairs:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{what}: {name!r} is a {type(t).__name__}, not a tensor")
        if name in seen:
            raise ValueError(f"{what}: {name!r} is sent twice")
        seen.add(name)
        own = None if expected is None else expected.get(name)
        if expected is not None and own is None and name not in maybe:
            raise ValueError(f"{what}: unknown tensor {name!r} (the engine has no such weight)")
        if own is not None and tuple(own.shape) != tuple(t.shape):
            raise ValueError(f"{what}: {name!r} has shape {tuple(t.shape)}, the engine's is {tuple(own.shape)}")
        ok = t.dtype == own.dtype if own is not None else False
        if not ok and not (t.dtype in _PRECISIONS and (own is None or own.dtype in _PRECISIONS)):
            want = own.dtype if own is not None and own.dtype not in _PRECISIONS else "float32/float16/bfloat16"
            raise ValueError(f"{what}: {name!r} is {t.dtype}; the engine takes {want} (no silent cast)")
    if expected is not None:
        missing = sorted(expected.keys() - seen)
        if missing:
            more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ValueError(f"{what}: incomplete version, {missing[0]!r} is missing{more}; a version carries "
                             f"every weight of the engine")
    return pairs


def push_weights(engine: Any, weights: dict[str, torch.Tensor] | list[dict[str, torch.Tensor]], *,
                 layout: ModelLayout | None = None) -> int:
    """Hand a complete version of ``weights`` to ``engine.update_weights`` in HF names; returns the bytes.

    Checked first (:func:`check_weights`) against the engine's own tensors when it exposes them
    (:func:`engine_weights`), else against ``layout``'s tensor names (when given) and dtypes: a partial
    version, an unknown name, a wrong shape or an int/float64 tensor is a ValueError and the engine is
    not touched.

    Args:
        engine: any object with ``update_weights(named_tensors)`` (``TorchEngine``, ``VLLMEngine``).
        weights: full tensors in HF names (``layout`` None), or ``layout``'s shards (a list, one dict per
            rank; a single dict for a one-rank layout).
        layout: the layout of ``weights`` when they are shards.
    """
    if not callable(getattr(engine, "update_weights", None)):
        raise ValueError(f"engine: {type(engine).__name__} has no update_weights method")
    if layout is not None:
        shards = [weights] if isinstance(weights, dict) else weights
        if not isinstance(shards, list):
            raise ValueError(f"weights: expected a list of per-rank dicts for layout {layout!r}, "
                             f"got {type(weights).__name__}")
        full = layout.unshard([{k: v.detach() for k, v in s.items()} for s in shards])
    elif isinstance(weights, dict):
        full = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in weights.items()}
    else:
        raise ValueError(f"weights: expected a dict of HF-named tensors (or pass layout=), "
                         f"got {type(weights).__name__}")
    own = engine_weights(engine)
    if own is not None:
        pairs = check_weights(full.items(), own[0], optional=own[1])
    elif layout is not None:
        pairs = check_weights(full.items(), {n: torch.empty(s, device="meta") for n, s in layout.full_shapes.items()})
    else:
        pairs = check_weights(full.items())
    engine.update_weights(pairs)
    return sum(t.numel() * t.element_size() for _, t in pairs)
