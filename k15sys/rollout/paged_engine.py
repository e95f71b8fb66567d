"""A rollout engine with a paged KV cache and continuous batching (paper 2.6.2 at hardware speed).

``PagedEngine`` runs the decoder of a transformers Qwen2 / Qwen3 / Llama causal LM with its own forward,
calling the model's own submodules (norms, projections, MLPs), so it shares the model's weights and sees
every in-place update. Around them:

- a KV cache preallocated once as pages of ``page_size`` token slots (``[layers, 2, pages, page_size, Hkv,
  D]``); a sequence holds the pages of the tokens it has (taken a round ahead as it grows) and gives them back
  as soon as it finishes, so finished sequences make room for waiting ones (continuous batching, bounded by
  ``max_num_seqs`` and the pages left); when growing sequences run out of pages, the latest admitted ones are
  preempted and later prefilled again from their tokens so far (the draws do not change: they are keyed by
  seed and position);
- prefill of the waiting prompts packed together (``k15sys.ops.varlen_attention``), in passes of at most
  ``max_prefill_tokens`` until the sequence budget or the cache is full, then decode rounds of
  ``sync_every`` steps that stay on the device: tokens, positions and cache slots are advanced on the device,
  and the host looks at the tokens once per round (stop tokens, repeat loops, budgets) -- a sequence that
  stopped inside a round computes a few throw-away steps instead of forcing a sync per token;
- decode attention through ``paged_decode_attention`` (a Triton flash-decoding kernel on CUDA); on CUDA each
  decode step is a CUDA graph, captured once per batch-size bucket;
- the k samples of one prompt (identical prompts of a call) share its KV pages: the prompt is prefilled
  once, its full pages are shared (reference-counted) and only the partly filled last page is copied;
- sampling on the device, inside the step's CUDA graph: Gumbel-max over noise hashed from (request seed,
  position) (:mod:`k15sys.rollout.paged_sampling`), so a request's draws do not depend on its batch; the
  token goes straight into the next step's input and into the round's output buffers. Top-k / top-p run
  after the graph (torch ops, same noise). Each token comes with its log-prob under the sampling
  distribution, as :class:`~k15sys.rollout.TorchEngine` reports it.

Other architectures raise a ValueError that points to ``TorchEngine``. One :meth:`PagedEngine.generate`
runs at a time (calls from several threads queue on a lock).
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from k15sys.algo.repeat import RepeatDetector
from k15sys.ops import varlen_attention
from k15sys.rollout.paged_attention import default_splits, paged_decode_attention
from k15sys.rollout.paged_sampling import row_seed, sample_filtered, sample_tokens
from k15sys.rollout.torch_engine import TorchEngine, copy_by_name
from k15sys.rollout.types import Completion, SamplingParams
from k15sys.weights.pinned import HostMirror

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama")
_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


class _Decoder:
    """The transformers model's decoder, run token-packed ([T, hidden]) over a paged KV cache."""

    def __init__(self, model: torch.nn.Module) -> None:
        cfg = model.config
        kind = getattr(cfg, "model_type", type(model).__name__)
        base = getattr(model, "model", None)
        if kind not in SUPPORTED_MODEL_TYPES or base is None or not hasattr(base, "layers"):
            raise ValueError(f"model: PagedEngine runs {', '.join(SUPPORTED_MODEL_TYPES)} decoders, got {kind!r}; "
                             "use k15sys.rollout.TorchEngine for other architectures")
        if getattr(cfg, "use_sliding_window", False) or any(
                t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
            raise ValueError("model: sliding-window attention is not supported by PagedEngine; use TorchEngine")
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ValueError(f"model: hidden_act {cfg.hidden_act!r} is not supported by PagedEngine (silu only)")
        self.model = model
        self.base = base
        attn = base.layers[0].self_attn
        self.num_layers = len(base.layers)
        self.head_dim = attn.head_dim
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.scale = float(getattr(attn, "scaling", self.head_dim ** -0.5))
        self.vocab = model.get_output_embeddings().weight.shape[0]
        self.fused: list = []  # per layer: the fused q/k/v and gate/up (weight, bias, row sizes), see fuse_projections

    def rotary_table(self, length: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos / sin of positions 0..length-1 from the model's own rotary module ([length, D], model dtype)."""
        pos = torch.arange(length, device=device)[None]
        probe = torch.empty(1, dtype=dtype, device=device)
        cos, sin = self.base.rotary_emb(probe, pos)
        return cos[0].contiguous(), sin[0].contiguous()

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], kv: torch.Tensor,
                slots: torch.Tensor | None,
                attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor],
                fused: bool = False) -> torch.Tensor:
        """Hidden states after the final norm, ``[T, hidden]``, of tokens ``ids`` at positions ``pos``. Writes each
        token's K/V to ``slots`` of the cache ``kv`` ([layers, 2, pages * page_size, Hkv, D]); ``attend(q, k, v,
        layer)`` gives the attention output. ``fused``: norms and rotary embedding through the Triton kernels of
        ``k15sys.kernels.paged_fused`` (fewer kernels per step); otherwise the model's own modules. With
        ``fused`` and ``slots=None``, ``attend`` gets q / k before the rotary embedding and files k / v itself
        (``paged_decode_attention``'s ``new_kv`` / ``rotary``)."""
        if fused:
            return self._forward_fused(ids, pos, rope, kv, slots, attend)
        T = ids.shape[0]
        x = self.base.embed_tokens(ids)
        cos, sin = rope[0][pos][:, None, :], rope[1][pos][:, None, :]
        for i, layer in enumerate(self.base.layers):
            q, k, v = self._qkv(layer.self_attn, layer.input_layernorm(x))
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            kv[i, 0].index_copy_(0, slots, k)
            kv[i, 1].index_copy_(0, slots, v)
            x = x + layer.self_attn.o_proj(attend(q, k, v, i).reshape(T, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.base.norm(x)

    def _qkv(self, a: torch.nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        T = h.shape[0]
        q = a.q_proj(h).view(T, -1, self.head_dim)
        k = a.k_proj(h).view(T, -1, self.head_dim)
        v = a.v_proj(h).view(T, -1, self.head_dim)
        if hasattr(a, "q_norm"):  # Qwen3: per-head RMSNorm before the rotary embedding
            q, k = a.q_norm(q), a.k_norm(k)
        return q, k, v

    def fuse_projections(self) -> None:
        """Make each layer's q/k/v weights (and gate/up weights) row blocks of one tensor, so that one GEMM
        computes them. The model's parameters become views of the fused tensors: they keep sharing storage,
        and an in-place update of either reaches both. Call again after the model moved between devices."""
        self.fused = [(_fuse([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]),
                       _fuse([layer.mlp.gate_proj, layer.mlp.up_proj])) for layer in self.base.layers]

    def _forward_fused(self, ids, pos, rope, kv, slots, attend) -> torch.Tensor:
        from k15sys.kernels.paged_fused import _add_rmsnorm_kernel, _rope_store_kernel, _silu_mul_kernel

        T = ids.shape[0]
        x = self.base.embed_tokens(ids)
        h = torch.empty_like(x)
        block = 1 << (x.shape[1] - 1).bit_length()
        hq_pad = 1 << (max(self.num_heads, self.num_kv_heads) - 1).bit_length()
        half_pad = 1 << (self.head_dim // 2 - 1).bit_length()
        cos, sin = rope

        def norm(delta: torch.Tensor | None, module: torch.nn.Module) -> None:
            eps = float(getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6)))
            _add_rmsnorm_kernel[(T,)](x, x if delta is None else delta, module.weight, h, eps, x.shape[1], x.stride(0),
                                      x.stride(0) if delta is None else delta.stride(0), h.stride(0),
                                      HAS_DELTA=delta is not None, BLOCK=block, num_warps=4)

        delta = None
        for i, layer in enumerate(self.base.layers):
            a = layer.self_attn
            norm(delta, layer.input_layernorm)
            (w_qkv, b_qkv, sizes), (w_gu, b_gu, (inter, _)) = self.fused[i]
            q, k, v = (t.unflatten(-1, (-1, self.head_dim))
                       for t in torch.nn.functional.linear(h, w_qkv, b_qkv).split(sizes, dim=-1))
            if hasattr(a, "q_norm"):
                q, k = a.q_norm(q), a.k_norm(k)
            if slots is not None:
                kc, vc = kv[i, 0], kv[i, 1]
                _rope_store_kernel[(T,)](q, k, v, cos, sin, pos, slots, kc, vc, q.stride(0), q.stride(1),
                                         k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
                                         kc.stride(0), kc.stride(1), self.num_heads, self.num_kv_heads, H_PAD=hq_pad,
                                         HALF=self.head_dim // 2, HALF_PAD=half_pad, num_warps=4)
            delta = a.o_proj(attend(q, k, v, i).reshape(T, -1))
            norm(delta, layer.post_attention_layernorm)
            gu = torch.nn.functional.linear(h, w_gu, b_gu)
            act = gu.new_empty(T, inter)
            _silu_mul_kernel[(T, triton_cdiv(inter, 1024))](gu, act, inter, gu.stride(0), act.stride(0), BLOCK=1024,
                                                            num_warps=4)
            delta = layer.mlp.down_proj(act)
        norm(delta, self.base.norm)
        return h

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.get_output_embeddings()(hidden)


def _fuse(linears: list[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
    """One weight (and bias) tensor with the given linears' rows stacked; their parameters become views of it."""
    sizes = [lin.weight.shape[0] for lin in linears]
    with torch.no_grad():
        weight = torch.cat([lin.weight.detach() for lin in linears])
        has_bias = [lin.bias is not None for lin in linears]
        if any(has_bias) and not all(has_bias):  # a mixed layout: add zero biases to the fused GEMM only
            bias = torch.cat([lin.bias.detach() if lin.bias is not None else weight.new_zeros(n)
                              for lin, n in zip(linears, sizes)])
        else:
            bias = torch.cat([lin.bias.detach() for lin in linears]) if all(has_bias) else None
        start = 0
        for lin, n in zip(linears, sizes):
            lin.weight.data = weight[start: start + n]
            if lin.bias is not None and bias is not None:
                lin.bias.data = bias[start: start + n]
            start += n
    return weight, bias, sizes


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass
class _Seq:
    """One sequence of a call: its pages, what it generated, and why it stopped."""

    index: int  # position in the call's prompts
    prompt_len: int
    pages: list[int]
    budget: int
    seed: int  # the noise seed of its draws (paged_sampling.row_seed)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    reason: str | None = None
    detector: RepeatDetector | None = None

    @property
    def cached(self) -> int:
        """Tokens whose K/V are in the cache: the prompt and every generated token but the newest."""
        return self.prompt_len + len(self.tokens) - 1


class _PagePool:
    """Free list and reference counts of the cache pages (page 0 is a scratch page, never handed out)."""

    def __init__(self, num_pages: int) -> None:
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, 0, -1))
        self._refs = [0] * num_pages

    @property
    def free(self) -> int:
        return len(self._free)

    def take(self, n: int) -> list[int]:
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self._refs[p] = 1
        return pages

    def share(self, pages: list[int]) -> None:
        for p in pages:
            self._refs[p] += 1

    def give_back(self, pages: list[int]) -> None:
        for p in pages:
            self._refs[p] -= 1
            if self._refs[p] == 0:
                self._free.append(p)


class PagedEngine:
    """Rollout engine with a paged KV cache, continuous batching and CUDA-graph decoding (paper 2.6.2).

    Args:
        model: a transformers ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM`` or ``LlamaForCausalLM`` (moved to
            ``device`` and used in place: its parameters are the engine's weights).
        device: where generation runs.
        kv_cache_tokens: token slots of the KV cache; default: ``kv_cache_memory_fraction`` of the free GPU
            memory on CUDA, 65,536 on the CPU.
        kv_cache_memory_fraction: share of the free GPU memory given to the cache when ``kv_cache_tokens``
            is None.
        page_size: token slots per page.
        max_num_seqs: sequences decoded together at most (continuous batching fills up to it).
        max_prefill_tokens: prompt tokens packed into one prefill pass (a longer prompt goes alone).
        max_model_len: longest prompt + generation (default: the cache, capped by the model's positions).
        sync_every: decode steps between two looks of the host at the tokens (stop tokens, repeats, budgets).
        cuda_graphs: capture decode steps as CUDA graphs (CUDA only).
        attention_backend: decode attention backend of :func:`paged_decode_attention`.
        fused_kernels: norms, rotary embedding and cache writes through Triton kernels (default: on CUDA);
            otherwise the model's own modules (transformers' exact arithmetic).
        share_prefixes: identical prompts of a call are prefilled once and share their KV pages (k samples
            per prompt, paper 2.6.2); False treats every prompt on its own (a baseline for benchmarks).
        repeat_detector: factory of a per-sequence detector (None disables repeat stops).
        pad_token_id: accepted for drop-in compatibility with ``TorchEngine`` (nothing is padded here).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        device: str | torch.device = "cpu",
        *,
        kv_cache_tokens: int | None = None,
        kv_cache_memory_fraction: float = 0.5,
        page_size: int = 16,
        max_num_seqs: int = 256,
        max_prefill_tokens: int = 16384,
        max_model_len: int | None = None,
        sync_every: int = 32,
        cuda_graphs: bool = True,
        attention_backend: str = "auto",
        fused_kernels: bool | None = None,
        share_prefixes: bool = True,
        repeat_detector: Callable[[], RepeatDetector] | None = RepeatDetector,
        pad_token_id: int = 0,
    ) -> None:
        for name, value in (("page_size", page_size), ("max_num_seqs", max_num_seqs),
                            ("max_prefill_tokens", max_prefill_tokens), ("sync_every", sync_every)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be an int >= 1, got {value!r}")
        if not 0 < kv_cache_memory_fraction < 1:
            raise ValueError(f"kv_cache_memory_fraction: must be in (0, 1), got {kv_cache_memory_fraction!r}")
        if attention_backend not in ("auto", "triton", "torch"):
            raise ValueError(f"attention_backend: expected 'auto', 'triton' or 'torch', got {attention_backend!r}")
        self.device = torch.device(device)
        self.decoder = _Decoder(model)
        self.model = model.to(self.device).eval()
        self.dtype = next(model.parameters()).dtype
        self.page_size = page_size
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.sync_every = sync_every
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.attention_backend = attention_backend
        self.fused_kernels = self.device.type == "cuda" if fused_kernels is None else bool(fused_kernels)
        if self.decoder.head_dim % 2:
            self.fused_kernels = False  # the rotary kernel reads two head halves
        if self.fused_kernels:
            self.decoder.fuse_projections()
        self._sampler = "triton" if self.fused_kernels else "torch"  # sample_tokens' backend
        self.share_prefixes = share_prefixes
        self.repeat_detector = repeat_detector
        self.pad_token_id = pad_token_id
        self.weight_version = 0
        self.preemptions = 0  # sequences that gave their pages back mid-generation (re-prefilled later)
        self._asleep = False
        self._mirror: HostMirror | None = None  # sleep(level=1)'s pinned host copies of the weights
        self._discarded: list[tuple[torch.nn.Parameter, torch.Size]] = []  # sleep(level=2): shapes to reallocate
        self._discarded_at: int | None = None  # weight_version when sleep(level=2) discarded the weights
        self._lock = threading.Lock()
        d = self.decoder
        self._page_bytes = 2 * d.num_layers * page_size * d.num_kv_heads * d.head_dim * self.dtype.itemsize
        if kv_cache_tokens is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                kv_cache_tokens = int(free * kv_cache_memory_fraction) // self._page_bytes * page_size
            else:
                kv_cache_tokens = 65536
        if not isinstance(kv_cache_tokens, int) or kv_cache_tokens < 2 * page_size:
            raise ValueError(f"kv_cache_tokens: must be an int >= 2 * page_size ({2 * page_size}), got {kv_cache_tokens!r}")
        self.num_pages = kv_cache_tokens // page_size + 1  # + the scratch page
        capacity = (self.num_pages - 1) * page_size
        positions = getattr(model.config, "max_position_embeddings", None) or capacity
        self.max_model_len = max_model_len if max_model_len is not None else min(capacity, positions)
        if not isinstance(self.max_model_len, int) or not 2 <= self.max_model_len <= capacity:
            raise ValueError(f"max_model_len: must be an int in [2, {capacity}] (the cache's token slots), "
                             f"got {self.max_model_len!r}")
        self.max_pages_per_seq = -(-self.max_model_len // page_size)
        self._allocate()

    # ------------------------------------------------------------------ memory
    def _allocate(self) -> None:
        d = self.decoder
        self._kv = torch.zeros(d.num_layers, 2, self.num_pages * self.page_size, d.num_kv_heads, d.head_dim,
                               dtype=self.dtype, device=self.device)
        self._cos, self._sin = d.rotary_table(self.max_model_len, self.device, self.dtype)
        self.pool = _PagePool(self.num_pages)
        self._graphs: dict[tuple[int, int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._graph_pool = None
        # the step buffers: row r of a decode round is running sequence r; rows past the live ones stay zero
        # (greedy, page 0); a round writes its tokens / log-probs to column pos - start of _out_tok / _out_lp
        n, w, dev = self.max_num_seqs, self.max_pages_per_seq, self.device
        self._tokens = torch.zeros(n, dtype=torch.long, device=dev)
        self._pos = torch.zeros(n, dtype=torch.long, device=dev)
        self._start = torch.zeros(n, dtype=torch.long, device=dev)
        self._temps = torch.zeros(n, dtype=torch.float32, device=dev)
        self._seeds = torch.zeros(n, dtype=torch.long, device=dev)
        self._tables = torch.zeros(n, w, dtype=torch.int32, device=dev)
        self._out_tok = torch.zeros(n, self.sync_every, dtype=torch.long, device=dev)
        self._out_lp = torch.zeros(n, self.sync_every, dtype=torch.float32, device=dev)

    @property
    def free_pages(self) -> int:
        """Pages of the KV cache not held by any sequence (all but the scratch page when idle)."""
        return self.pool.free

    def sleep(self, level: int = 1) -> None:
        """Free the accelerator memory for a colocated trainer (paper 2.6.3). The KV cache and the CUDA graphs
        (which bake in its addresses) go at both levels; the weights, by ``level`` (as vLLM's sleep levels):

        - 1: copied to persistent pinned host buffers (:class:`~k15sys.weights.pinned.HostMirror`: allocated once,
          copies on a side stream, one synchronisation); :meth:`wake` brings them back bit for bit. On the CPU
          the weights already are in host memory and stay where they are.
        - 2: discarded, on any device. :meth:`wake` allocates them again, uninitialised, and :meth:`generate`
          refuses to run until a new weight version arrives (``update_weights`` or ``WeightSync``'s in-place
          copy; both advance ``weight_version``). The colocated trainer uses this level: it pushes a version
          right after every wake, so carrying the old weights out and back would move twice the model's bytes
          over PCIe for nothing. Discarding rather than keeping them on the device gives the trainer all of
          the engine's memory while it trains (allocating them again costs milliseconds).

        The freed blocks go back to the driver (``torch.cuda.empty_cache``): kept in torch's cache, the cache's
        one large block would be carved up by the trainer and the woken weights, and the next cache allocation
        could then not reuse it.
        """
        if level not in (1, 2):
            raise ValueError(f"level: expected 1 (weights to host memory) or 2 (weights discarded), got {level!r}")
        with self._lock:
            if self._asleep:
                return
            self._kv = self._cos = self._sin = None
            self._graphs, self._graph_pool = {}, None
            if level == 2 or self.device.type != "cpu":
                self.decoder.fused = []  # its tensors hold the device copies of q/k/v and gate/up
            if level == 2:
                self._discarded = [(p, p.shape) for p in self.model.parameters()]
                for p, _ in self._discarded:
                    p.data = p.data.new_empty(0)
                self._discarded_at = self.weight_version
            elif self.device.type != "cpu":
                if self._mirror is None:
                    self._mirror = HostMirror(self.device)
                self._mirror.offload(list(self.model.parameters()))
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self._asleep = True

    def wake(self) -> None:
        """Take the weights back after :meth:`sleep` (from host memory, or uninitialised after level 2) with their
        fused q/k/v and gate/up tensors. The KV cache (same size as before) is allocated by the next
        :meth:`generate`, so that a colocated trainer can push its weights and leave the device before the cache
        takes its share; CUDA graphs are captured again lazily, per batch-size bucket, on the first decode step
        that needs one."""
        with self._lock:
            if self._asleep:
                if self._discarded:
                    for p, shape in self._discarded:
                        p.data = torch.empty(shape, dtype=p.dtype, device=self.device)
                    self._discarded = []
                elif self._mirror is not None:
                    self._mirror.onload()
                if self.fused_kernels and not self.decoder.fused:  # new storage: fuse it again
                    self.decoder.fuse_projections()
            self._asleep = False

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy new values into the model's tensors by HF name, in place (all-or-nothing; the captured CUDA
        graphs keep reading the same storage)."""
        with self._lock:
            copy_by_name(self.model, named_tensors)
            self.weight_version += 1

    # ------------------------------------------------------------------ generation
    def _check(self, prompts: list[list[int]], params: SamplingParams) -> None:
        if self._asleep:
            raise RuntimeError("generate: the engine is asleep; call wake() first")
        if self._discarded_at == self.weight_version:
            raise RuntimeError("generate: sleep(level=2) discarded the weights; load a new version (update_weights) "
                               "after wake() first")
        if not isinstance(prompts, (list, tuple)):
            raise ValueError(f"prompts: expected a list of token-id lists, got {type(prompts).__name__}")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params: expected SamplingParams, got {type(params).__name__}")
        vocab = self.decoder.vocab
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompts[{i}]: empty prompt")
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompts[{i}]: token ids {bad[:5]} outside the vocabulary [0, {vocab})")
            if len(p) + params.max_new_tokens - 1 > self.max_model_len:
                raise ValueError(f"prompts[{i}]: {len(p)} prompt tokens + max_new_tokens={params.max_new_tokens} "
                                 f"do not fit the KV cache (max_model_len={self.max_model_len} tokens per sequence)")

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """Sample up to ``params.max_new_tokens`` tokens after each prompt (paper 2.6.2 rollouts).

        Identical prompts share their prefill and KV pages. Continuing a trajectory is generating from
        ``prompt + tokens so far``; under greedy decoding the result equals one-shot generation.
        """
        self._check(prompts, params)
        if not prompts:
            return []
        with self._lock:
            if self._asleep:
                raise RuntimeError("generate: the engine is asleep; call wake() first")
            if self._kv is None:  # the first call after wake(): the KV cache is allocated now
                self._allocate()
            return _Run(self, [[int(t) for t in p] for p in prompts], params).run()

    # ------------------------------------------------------------------ device steps
    def _prefill(self, ids: list[int], starts: list[int], slots: list[int]) -> torch.Tensor:
        """One packed prefill of whole prompts; K/V go to ``slots``; returns the logits of each prompt's last token."""
        dev = self.device
        lens = np.diff(starts + [len(ids)])
        pos = torch.from_numpy(np.concatenate([np.arange(n) for n in lens])).to(dev)
        cu = torch.tensor(starts + [len(ids)], dtype=torch.int32, device=dev)
        backend = "triton" if dev.type == "cuda" and self.dtype != torch.float32 else "torch"
        max_len = int(lens.max())

        def attend(q, k, v, layer):
            return varlen_attention(q, k, v, cu, max_len, softmax_scale=self.decoder.scale, backend=backend)

        ids_t = torch.tensor(ids, dtype=torch.long, device=dev)
        slot_t = torch.tensor(slots, dtype=torch.long, device=dev)
        hidden = self.decoder.forward(ids_t, pos, (self._cos, self._sin), self._kv, slot_t, attend, self.fused_kernels)
        return self.decoder.logits(hidden[cu[1:].long() - 1])

    def _decode_forward(self, n: int, splits: int) -> torch.Tensor:
        """Logits of one decode step of the first ``n`` rows of the step buffers (tokens, positions, tables)."""
        tokens, pos, tables = self._tokens[:n], self._pos[:n], self._tables[:n]
        page = self.page_size
        seq_lens = (pos + 1).to(torch.int32)
        slots = None  # fused: the attention kernel rotates and files the new K/V itself
        if not self.fused_kernels:
            slots = tables.gather(1, (pos // page)[:, None]).squeeze(1).long() * page + pos % page
        kv = self._kv
        pages = kv.view(kv.shape[0], 2, self.num_pages, page, kv.shape[-2], kv.shape[-1])
        rotary = (self._cos, self._sin)

        def attend(q, k, v, layer):
            return paged_decode_attention(q, pages[layer, 0], pages[layer, 1], tables, seq_lens,
                                          softmax_scale=self.decoder.scale, splits=splits,
                                          backend=self.attention_backend,
                                          new_kv=None if slots is not None else (k, v),
                                          rotary=None if slots is not None else rotary)

        hidden = self.decoder.forward(tokens, pos, (self._cos, self._sin), kv, slots, attend, self.fused_kernels)
        return self.decoder.logits(hidden)

    def _step(self, n: int, splits: int, sample: bool) -> torch.Tensor:
        """One decode step of ``n`` rows; with ``sample``, also the draw of each row's next token, which advances
        the step buffers (see ``sample_tokens``' ``advance``). Returns the logits."""
        logits = self._decode_forward(n, splits)
        if sample:
            sample_tokens(logits, self._temps[:n], self._seeds[:n], self._pos[:n], backend=self._sampler,
                          advance=(self._tokens, self._pos, self._start, self._out_tok, self._out_lp))
        return logits

    def _decode_step(self, n: int, context: int, sample: bool = True) -> torch.Tensor:
        """Logits ``[n, V]`` of one decode step whose rows hold at most ``context`` tokens (the splits of the
        attention follow it); on CUDA a replay of the graph of n's bucket."""
        bucket = n
        if self.cuda_graphs:
            bucket = next((b for b in _BUCKETS if b >= n), None)
            if bucket is None or bucket > self.max_num_seqs:
                bucket = self.max_num_seqs
        splits = default_splits(bucket, self.decoder.num_kv_heads, self.device, context)
        if not self.cuda_graphs:
            return self._step(n, splits, sample)
        key = (bucket, splits, sample)
        if key not in self._graphs:
            self._capture(key)
        graph, logits = self._graphs[key]
        graph.replay()
        return logits[:n]

    def _capture(self, key: tuple[int, int, bool]) -> None:
        """Capture one decode step of ``bucket`` rows. Rows past the live ones read and write the scratch page 0;
        the warm-up steps rewrite the live rows' current K/V with the values the step itself writes, and the
        step buffers are restored after them (a sampling step advances them)."""
        buffers = (self._tokens, self._pos, self._out_tok, self._out_lp)
        saved = [t.clone() for t in buffers]
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # compile / autotune outside the capture
                self._step(*key)
                for t, v in zip(buffers, saved):
                    t.copy_(v)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            logits = self._step(*key)
        self._graphs[key] = (graph, logits)


class _Run:
    """One generate call: admission, prefill, decode rounds and the bookkeeping of its sequences."""

    def __init__(self, engine: PagedEngine, prompts: list[list[int]], params: SamplingParams) -> None:
        self.e = engine
        self.prompts = prompts
        self.params = params
        self.stops = set(params.stop_token_ids)
        self.seed = params.seed if params.seed is not None else int(torch.randint(1 << 62, ()))
        self.filtered = params.temperature > 0 and (params.top_k > 0 or params.top_p < 1.0)  # sampled after the graph
        groups: dict[tuple[int, ...] | int, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(tuple(p) if engine.share_prefixes else i, []).append(i)
        self.waiting = list(groups.values())  # groups of identical prompts, in order of first appearance
        self.waiting.reverse()
        self.running: list[_Seq] = []
        self.preempted: list[_Seq] = []  # gave their pages back for others to grow; re-admitted first (LIFO)
        self.done: dict[int, Completion] = {}

    def run(self) -> list[Completion]:
        e = self.e
        try:
            while self.waiting or self.preempted or self.running:
                admitted = False
                while self._admit():  # prefill chunks until nothing more fits: decode rounds run full batches
                    admitted = True
                if self.running:
                    self._decode_round()
                elif not admitted:
                    raise RuntimeError("generate: the KV cache cannot hold the next prompt group even when empty; "
                                       "raise kv_cache_tokens or lower max_new_tokens")
        except BaseException:
            e.pool = _PagePool(e.num_pages)  # one call at a time: a failed call gives every page back
            raise
        if e.pool.free != e.num_pages - 1:
            raise RuntimeError(f"generate: {e.num_pages - 1 - e.pool.free} KV pages were not given back")
        return [self.done[i] for i in range(len(self.prompts))]

    # ------------------------------------------------------------------ admission and prefill
    def _pages(self, tokens: int) -> int:
        return -(-tokens // self.e.page_size)

    def _reserve(self, seqs: int) -> int:
        """Pages kept free for one more round of ``seqs`` running sequences (admission's watermark)."""
        return seqs * self._pages(self.e.sync_every)

    def _admit(self) -> bool:
        """Prefill what fits the sequence budget, the free pages and the prefill budget: first the preempted
        sequences (their tokens so far are prefilled again), then waiting groups. A sequence gets the pages of
        what it holds now; a round's growth of every running sequence is kept free (a sequence alone in an
        empty cache is admitted without it: it always fits). False if nothing was admitted."""
        e = self.e
        resumed, batch, tokens = [], [], 0
        free, seats, running = e.pool.free, e.max_num_seqs - len(self.running), len(self.running)

        def fits(need: int, seqs: int, length: int) -> bool:
            alone = running == 0
            return (need + (0 if alone else self._reserve(running + seqs)) <= free and seqs <= seats
                    and not (tokens and tokens + length > e.max_prefill_tokens))

        while self.preempted and fits(self._pages(self.preempted[-1].cached), 1, self.preempted[-1].cached):
            seq = self.preempted.pop()
            seq.pages = e.pool.take(self._pages(seq.cached))
            resumed.append(seq)
            tokens, free, seats, running = tokens + seq.cached, free - len(seq.pages), seats - 1, running + 1
        while self.waiting and not self.preempted:
            group = self.waiting[-1]
            n = len(self.prompts[group[0]])
            shared = n // e.page_size if len(group) > 1 else 0
            need = shared + (self._pages(n) - shared) * len(group)
            if not fits(need, len(group), n):
                if running == 0 and len(group) > 1:
                    # a group larger than the sequence budget or the cache: split it, sharing the prefill per part
                    cut = seats if len(group) > seats else len(group) // 2
                    self.waiting[-1:] = [group[cut:], group[:cut]]
                    continue
                break
            self.waiting.pop()
            batch.append(group)
            tokens, free, seats, running = tokens + n, free - need, seats - len(group), running + len(group)
        if batch or resumed:
            self._prefill(batch, resumed)
        return bool(batch or resumed)

    def _prefill(self, groups: list[list[int]], resumed: list[_Seq]) -> None:
        e = self.e
        ids, starts, slots, seqs, parents = [], [], [], [], []
        copies: list[tuple[int, int]] = []

        def pack(tokens: list[int], pages: list[int]) -> None:
            starts.append(len(ids))
            ids.extend(tokens)
            t = np.arange(len(tokens))
            slots.extend((np.asarray(pages)[t // e.page_size] * e.page_size + t % e.page_size).tolist())

        for g, group in enumerate(groups):
            prompt = self.prompts[group[0]]
            n = len(prompt)
            shared = n // e.page_size if len(group) > 1 else 0
            common = e.pool.take(shared)
            for j, idx in enumerate(group):
                if j > 0:
                    e.pool.share(common)
                pages = common + e.pool.take(self._pages(n) - shared)
                seq = _Seq(idx, n, pages, self.params.max_new_tokens, row_seed(self.seed, idx),
                           detector=e.repeat_detector() if e.repeat_detector else None)
                seqs.append(seq)
                parents.append(g)
                if j == 0:
                    first = pages
                elif n % e.page_size:  # the partly filled last prompt page is copied, the rest is shared
                    copies.append((first[shared], pages[shared]))
            pack(prompt, first)
        for seq in resumed:  # the K/V of everything but the newest token, which the next decode step feeds
            pack(self.prompts[seq.index] + seq.tokens[:-1], seq.pages)
        logits = e._prefill(ids, starts, slots)
        if copies:
            src = torch.tensor([c[0] for c in copies], device=e.device)
            dst = torch.tensor([c[1] for c in copies], device=e.device)
            kv = e._kv.view(e._kv.shape[0], 2, e.num_pages, e.page_size, *e._kv.shape[-2:])
            kv[:, :, dst] = kv[:, :, src]
        self.running.extend(resumed)
        if not seqs:
            return
        logits = logits[torch.tensor(parents, device=e.device)]
        seeds = torch.tensor([s.seed for s in seqs], device=e.device)
        pos = torch.tensor([s.prompt_len - 1 for s in seqs], device=e.device)
        if self.filtered:
            nxt, lp = sample_filtered(logits, self.params, seeds, pos)
        else:
            temps = torch.full((len(seqs),), float(self.params.temperature), device=e.device)
            nxt, lp = sample_tokens(logits, temps, seeds, pos, backend=e._sampler)
        for seq, t, l in zip(seqs, nxt.tolist(), lp.tolist()):
            self._push(seq, [t], [l])
        self.running.extend(s for s in seqs if s.reason is None)

    # ------------------------------------------------------------------ decoding
    def _grow(self, steps: int) -> None:
        """Give each running sequence the pages of its next ``steps`` tokens; when the cache runs short, the
        latest admitted sequences are preempted (their pages freed; re-admitted later from their tokens)."""
        e = self.e
        cap = e.max_pages_per_seq
        while True:
            want = [max(0, min(cap, self._pages(s.cached + steps)) - len(s.pages)) for s in self.running]
            if sum(want) <= e.pool.free or len(self.running) == 1:
                break
            victim = self.running.pop()
            e.pool.give_back(victim.pages)
            victim.pages = []
            self.preempted.append(victim)
            e.preemptions += 1
        for s, w in zip(self.running, want):
            s.pages += e.pool.take(w)

    def _decode_round(self) -> None:
        """Up to ``sync_every`` decode steps on the device, then one look at the tokens on the host."""
        e = self.e
        self._grow(min(e.sync_every, max(s.budget - len(s.tokens) for s in self.running)))
        run = self.running
        n = len(run)
        left = max(s.budget - len(s.tokens) for s in run)
        room = min(len(s.pages) * e.page_size - s.cached for s in run)  # slots held ahead of each sequence
        steps = max(1, min(e.sync_every, left, room))
        table = np.zeros((n, e.max_pages_per_seq), dtype=np.int32)
        for r, s in enumerate(run):
            table[r, : len(s.pages)] = s.pages
        for buf in (e._tables, e._pos, e._start, e._temps, e._seeds):
            buf.zero_()
        e._tables[:n].copy_(torch.from_numpy(table))
        pos = torch.tensor([s.cached for s in run])
        e._pos[:n].copy_(pos)
        e._start[:n].copy_(pos)
        e._tokens[:n].copy_(torch.tensor([s.tokens[-1] for s in run]))
        e._temps[:n].fill_(float(self.params.temperature))
        e._seeds[:n].copy_(torch.tensor([s.seed for s in run]))
        context = max(s.cached for s in run) + steps
        advance = (e._tokens, e._pos, e._start, e._out_tok, e._out_lp)
        for _ in range(steps):
            logits = e._decode_step(n, context, sample=not self.filtered)
            if self.filtered:
                sample_filtered(logits, self.params, e._seeds[:n], e._pos[:n], advance=advance)
        toks, lps = e._out_tok[:n, :steps].tolist(), e._out_lp[:n, :steps].tolist()
        for s, t, l in zip(run, toks, lps):
            self._push(s, t, l)
        self.running = [s for s in run if s.reason is None]

    def _push(self, seq: _Seq, tokens: list[int], logprobs: list[float]) -> None:
        """Append the tokens of one round until the sequence stops; a stopped sequence frees its pages."""
        keep = min(len(tokens), seq.budget - len(seq.tokens))
        reason = "length" if keep == seq.budget - len(seq.tokens) else None
        if self.stops or seq.detector is not None:  # token by token only when something can stop it early
            for i in range(keep):
                if tokens[i] in self.stops:
                    keep, reason = i + 1, "stop"
                    break
                if seq.detector is not None and seq.detector.push(tokens[i]):
                    keep, reason = i + 1, "repeat"
                    break
        seq.tokens += tokens[:keep]
        seq.logprobs += logprobs[:keep]
        if reason is not None:
            seq.reason = reason
            self.e.pool.give_back(seq.pages)
            self.done[seq.index] = Completion(seq.tokens, seq.logprobs, reason)


def make_rollout_engine(kind: str, model: torch.nn.Module, device: str | torch.device, *, pad_token_id: int = 0,
                        **paged_kwargs) -> TorchEngine | PagedEngine:
    """The rollout engine of ``run.engine``: ``"paged"`` (:class:`PagedEngine`), ``"torch"``
    (:class:`~k15sys.rollout.TorchEngine`), or ``"auto"``: PagedEngine on CUDA for the architectures it runs,
    TorchEngine otherwise (the CPU path of the main job stays the transformers engine).

    ``paged_kwargs`` go to :class:`PagedEngine` (by default it takes 30% of the free GPU memory for its KV
    cache, leaving the rest to a trainer on the same GPU).
    """
    if kind not in ("auto", "torch", "paged"):
        raise ValueError(f"kind: expected 'auto', 'torch' or 'paged', got {kind!r}")
    on_cuda = torch.device(device).type == "cuda"
    supported = getattr(model.config, "model_type", None) in SUPPORTED_MODEL_TYPES
    if kind == "torch" or (kind == "auto" and not (on_cuda and supported)):
        return TorchEngine(model, device=device, pad_token_id=pad_token_id)
    paged_kwargs.setdefault("kv_cache_memory_fraction", 0.3)
    return PagedEngine(model, device=device, pad_token_id=pad_token_id, **paged_kwargs)
