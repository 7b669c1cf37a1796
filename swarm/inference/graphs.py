"""Decode steps replayed as CUDA graphs: a stage's layers cost one launch per token, not hundreds.

At batch 1 a decode step of a few layers is bound by kernel launches, not by the GPU: each layer
is ~15 small kernels, each launched from Python (~0.7 ms a layer of a 1024-wide model on an
H200, where the arithmetic takes microseconds). A CUDA graph records the step's kernels once and
replays them with one call. What it takes (StageModel.decode_fixed): fixed shapes (the whole
preallocated cache, masked by each row's length) and no host sync inside the step.

How a stage gets them: on a GPU the runtime keeps every session in one cache of fixed rows
(swarm/inference/slots.py), and a decode step runs over a power-of-two bucket of its first rows.
Sessions joining or leaving change only which rows advance (``active``), never the shapes, so
each bucket is recorded once, at its first decode step:

- that step runs ``decode_fixed`` for real on a side stream (CUDA's required warm-up, which here
  is the step itself), then records it into a graph (recording runs nothing, so the cache is
  changed once);
- every later step of the bucket is replayed: the input and the active rows are copied into the
  graph's static tensors, and one replay runs the layers, writes the new keys and values at each
  row's length and advances the active rows' lengths on the device.

(Before, a graph belonged to a batch cache per set of sessions, and every change of the set cost
a copy, an eager step and a new capture: docs/benchmarks.md, issue 16.)

Graphs are kept for the :data:`MAX_GRAPHS` most recently used caches, each tied to its cache
object (a weak reference: the views of a slot cache that grew are dropped, and their graphs with
them, never replayed over freed memory). Each graph has its own private memory pool: with one
pool shared by all of a runtime's graphs, the pool's use count fell to 0 when graphs were
dropped, and torch 2.13's allocator then failed the next capture ("use_count > 0 INTERNAL
ASSERT FAILED"; seen on the H200 in node processes). A capture that fails turns graphs off for
the runtime (logged once; its steps run ``decode_fixed`` eagerly) and the step's result stands.
``SWARM_CUDA_GRAPHS=0`` turns them off; CPU stages never use them.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

from swarm.model.kv_cache import KVCache
from swarm.model.stage import StageModel

log = logging.getLogger(__name__)

MAX_GRAPHS = 8


def no_cudnn_attention(device: torch.device) -> None:
    """On CUDA, turn cuDNN's attention kernel off for this process (flash and memory-efficient
    attention remain). cuDNN builds an execution plan for every new shape, and a cached pass's key
    length is new at every token: on the H200 a node's 3-layer eager decode step took ~50 ms (70%
    of its samples in py-spy inside scaled_dot_product_attention) until each length had been seen
    once. The flag is process-wide; torch's ``sdpa_kernel`` context manager sets the same global
    flags per call, racily between threads."""
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)


def graphs_enabled(device: torch.device) -> bool:
    """CUDA graphs for this device: CUDA only, unless SWARM_CUDA_GRAPHS=0."""
    return device.type == "cuda" and os.environ.get("SWARM_CUDA_GRAPHS", "1") != "0"


@dataclass
class _Graph:
    cache: weakref.ref  # the KVCache (a slot cache's bucket view) the graph writes into
    graph: torch.cuda.CUDAGraph | None = None
    static_in: torch.Tensor | None = None
    static_out: torch.Tensor | None = None
    static_active: torch.Tensor | None = None


class DecodeGraphs:
    """The CUDA graphs of one stage's decode steps, per batch cache. Not thread-safe: the
    runtime calls it under its step lock."""

    def __init__(self, stage: StageModel) -> None:
        self.stage = stage
        self.enabled = True
        self._graphs: OrderedDict[int, _Graph] = OrderedDict()  # id(cache) -> graph, LRU order
        self.captures = 0
        self.replays = 0

    def step(self, cache: KVCache, x: torch.Tensor, active: torch.Tensor) -> torch.Tensor | None:
        """The decode step of ``cache``'s rows (a bucket of a slot cache) with input ``x`` ((B, 1)
        ids or (B, 1, H)), rows ``active`` (B,) 0/1 advancing (StageModel.decode_fixed), through a
        graph: its result, valid until the next step; recorded at the cache's first step here.
        None when graphs are off: the caller runs ``decode_fixed`` eagerly. The caller has checked
        that every active row has room."""
        if not self.enabled:
            return None
        key = id(cache)
        entry = self._graphs.get(key)
        if entry is not None and entry.cache() is not cache:  # id reused by a new cache
            del self._graphs[key]
            entry = None
        if entry is None:
            entry = self._graphs[key] = _Graph(cache=weakref.ref(cache))
            self._trim()
        self._graphs.move_to_end(key)
        if entry.graph is not None and entry.static_in.shape == x.shape and entry.static_in.dtype == x.dtype:
            entry.static_in.copy_(x)
            entry.static_active.copy_(active)
            entry.graph.replay()
            self.replays += 1
            return entry.static_out
        return self._capture(entry, cache, x, active)

    def _capture(self, entry: _Graph, cache: KVCache, x: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Run the step for real (the warm-up CUDA asks for), then record it."""
        static_in, static_active = x.clone(), active.clone()
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            out = self.stage.decode_fixed(static_in, cache, static_active)
        torch.cuda.current_stream(x.device).wait_stream(side)
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # a private pool: see above
                static_out = self.stage.decode_fixed(static_in, cache, static_active)
        except Exception as exc:  # noqa: BLE001 -- a kernel that cannot be captured: eager from now on
            log.warning("CUDA graph capture of a decode step failed (%s); decoding without graphs", exc)
            self.enabled = False
            self._graphs.clear()
            return out
        entry.graph, entry.static_in, entry.static_out, entry.static_active = graph, static_in, static_out, static_active
        self.captures += 1
        return out

    def _trim(self) -> None:
        for key in [k for k, e in self._graphs.items() if e.cache() is None]:
            del self._graphs[key]
        while len(self._graphs) > MAX_GRAPHS:
            self._graphs.popitem(last=False)
