"""Paged KV cache: per-layer page tensors, the allocator that hands pages to requests, and the cache's sizing.

The pages hold the model's dtype, or FP8 (e4m3, `nanoflow_fx.ops.kv_quant`) with each layer's K and V scales beside
them: one byte an element, so the same memory holds twice the tokens of a 16-bit cache.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import struct
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch

from nanoflow_fx.errors import KVCacheExhaustedError
from nanoflow_fx.ops import kv_quant
from nanoflow_fx.ops.backend import AttentionBackend, AttentionConfig, Planner
from nanoflow_fx.ops.reference import read_pages

__all__ = ["HostPages", "PageAllocator", "PagedKVCache", "default_pages", "page_bytes", "pages_from_memory",
           "profile_pages", "profile_requests"]

log = logging.getLogger(__name__)


class PageAllocator:
    """Pages 0..num_pages-1 with a reference count each, and the prefix cache over them.

    Allocation is all-or-nothing. Without prefix caching a page has one holder and `free` returns it to the free
    list. With prefix caching (the engine's choice: it registers pages), a full page whose K/V are computed and
    whose tokens are known is `register`ed under a chained hash (`page_hash`: its parent page's hash, its tokens
    and the allocator's `key`, so equal hashes mean equal contexts); `match` finds a token sequence's longest
    chain of registered pages, and `acquire` shares them (reference counted: shared pages are full, so nobody
    writes them). A registered page whose last holder frees it stays cached on an LRU
    list and still counts as free: `allocate` takes never-cached pages first, then evicts the least recently
    freed cached page (a request's pages are freed tail first, so a chain is evicted from its end). The table is
    a pure function of the calls made, so ranks that make the same calls (tensor parallelism) keep equal tables.
    """

    def __init__(self, num_pages: int, key: bytes = b"") -> None:
        self.num_pages, self.key = num_pages, key
        self._free = list(range(num_pages - 1, -1, -1))  # never-cached pages; pop() hands out low ids first
        self._refs = [0] * num_pages
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached pages no request holds, least recent first
        self._page_of: dict[bytes, int] = {}  # registered hash -> page
        self._hash_of: dict[int, bytes] = {}  # page -> its registered hash
        self.on_evict: Callable[[int, bytes], None] | None = None  # told (page, hash) before a cached page is reused

    @property
    def num_free(self) -> int:
        """Pages `allocate` can hand out: never-cached ones plus unreferenced cached ones."""
        return len(self._free) + len(self._lru)

    @property
    def num_cached(self) -> int:
        """Registered pages (held or on the LRU list)."""
        return len(self._hash_of)

    def refs(self, page: int) -> int:
        return self._refs[page]

    def allocate(self, count: int) -> list[int]:
        free = self._free
        if count > len(free) + len(self._lru):
            raise KVCacheExhaustedError(
                f"the KV cache needs {count} pages but only {self.num_free} of {self.num_pages} are free "
                f"({count - self.num_free} more than it has); raise NanoFlowConfig.num_pages (or "
                "kv_cache_memory_fraction), or use fewer or shorter requests"
            )
        if count <= len(free):
            pages = [free.pop() for _ in range(count)]
        else:
            pages = [free.pop() for _ in range(len(free))]
            while len(pages) < count:
                page, _ = self._lru.popitem(last=False)  # evict the least recently freed cached page
                page_hash = self._hash_of.pop(page)
                del self._page_of[page_hash]
                if self.on_evict is not None:
                    self.on_evict(page, page_hash)
                pages.append(page)
        refs = self._refs
        for page in pages:
            refs[page] = 1
        return pages

    def free(self, pages: Sequence[int]) -> None:
        """Drop one reference to each page; unreferenced ones become free (registered ones stay cached)."""
        refs, free = self._refs, self._free
        for page in reversed(pages):  # tail first: a chain's last page is evicted before its parents
            refs[page] -= 1
            if refs[page] == 0:
                if page in self._hash_of:
                    self._lru[page] = None
                else:
                    free.append(page)
            elif refs[page] < 0:
                raise RuntimeError(f"nanoflow_fx: KV page {page} freed more often than allocated")

    def page_hash(self, parent: bytes | None, tokens: Sequence[int]) -> bytes:
        """The chained hash of a full page holding `tokens`, after the page whose hash is `parent` (None: the
        first page)."""
        digest = hashlib.blake2b(self.key if parent is None else parent, digest_size=16)
        digest.update(struct.pack(f"<{len(tokens)}q", *tokens))
        return digest.digest()

    def match(self, hashes: Sequence[bytes]) -> list[int]:
        """The registered pages of the longest prefix of the chain `hashes` (a sequence's full pages' hashes)."""
        pages = []
        for h in hashes:
            page = self._page_of.get(h)
            if page is None:
                break
            pages.append(page)
        return pages

    def acquire(self, pages: Sequence[int]) -> None:
        """Take a reference to each of `pages` (registered ones, from `match`)."""
        refs = self._refs
        for page in pages:
            if refs[page] == 0:
                del self._lru[page]
            refs[page] += 1

    def register(self, page: int, page_hash: bytes) -> None:
        """Cache `page` (held, full, its K/V computed) under `page_hash`; a hash already cached keeps its page."""
        if page_hash not in self._page_of and page not in self._hash_of:
            self._page_of[page_hash] = page
            self._hash_of[page] = page_hash

    def check(self, held: Sequence[Sequence[int]]) -> None:
        """Raise unless the reference counts equal the pages `held` (each holder's list) and every page is held,
        free or cached-unreferenced exactly once (a test helper; linear in the cache)."""
        counts = [0] * self.num_pages
        for pages in held:
            for page in pages:
                counts[page] += 1
        if counts != self._refs:
            bad = [p for p in range(self.num_pages) if counts[p] != self._refs[p]]
            raise AssertionError(f"KV page reference counts differ from the holders' pages at pages {bad[:10]}")
        unheld = sorted(self._free + list(self._lru))
        if unheld != [p for p in range(self.num_pages) if not counts[p]]:
            raise AssertionError("KV pages free or cached-unreferenced are not exactly the unheld pages")
        if any(p not in self._hash_of for p in self._lru) or len(set(self._free)) != len(self._free):
            raise AssertionError("the LRU list holds an unregistered page, or the free list a page twice")
        if any(self._page_of[h] != p for p, h in self._hash_of.items()) or len(self._page_of) != len(self._hash_of):
            raise AssertionError("the prefix cache's hash -> page and page -> hash tables disagree")


class HostPages:
    """The prefix cache's second tier: the K/V of cached pages evicted from the device, kept in host memory (pinned
    when the cache is on a GPU) under their chained hashes, `num_pages` of them; when full, the least recently used
    is dropped.

    The engine `save`s each page the allocator evicts (`PageAllocator.on_evict`), `count`s how far a request's chain
    continues here after its cached pages, `hold`s the entries a plan will load (so that the saves the same step's
    allocations make cannot drop them), then `load`s them into the request's new pages. Like the allocator, it is a
    pure function of the calls made (tensor-parallel ranks keep equal tables).

    On a GPU the copies run on a copy stream of their own (the copy engines, which the step's kernels do not use),
    ordered against the step stream by events, once per step: `flush` (after the step's allocations) makes the copy
    stream wait for the steps already queued (which may still read or write the pages), copies the evicted pages
    out, and makes the step stream wait for them (the next step overwrites those pages); the loads then go on the
    copy stream, under the next step, and `wait_loads` (before the step after it is queued) makes the step stream
    wait for them. The scheduler runs a request whose pages are loading one step later (`StepPlan.loads`), so the
    copy back hides under a whole step. Runs of consecutive slots and pages go as one copy per layer.
    """

    def __init__(self, caches: Sequence[torch.Tensor], num_pages: int) -> None:
        self.caches, self.num_pages = tuple(caches), num_pages
        device = self.caches[0].device
        # Per layer [num_pages, ...a page's shape]. Made here, not at the first eviction: pinning gigabytes takes
        # seconds, which a first eviction in the middle of serving would stall the engine for.
        self.data = tuple(torch.empty((num_pages, *c.shape[1:]), dtype=c.dtype, pin_memory=device.type == "cuda")
                          for c in self.caches)
        self._free = list(range(num_pages - 1, -1, -1))
        self._slot_of: OrderedDict[bytes, int] = OrderedDict()  # hash -> slot, least recently used first
        self._held: set[bytes] = set()
        self._saves: list[tuple[int, int]] = []  # (page, slot) evicted this step, not yet copied out
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._loaded: Any = None  # (a GPU) the event after the last loads, until the step stream waits for it
        self.saved = self.loaded = 0  # pages copied out, pages copied back

    @property
    def num_used(self) -> int:
        return len(self._slot_of)

    def save(self, page: int, page_hash: bytes) -> None:
        """Keep device page `page`'s K/V under `page_hash` (copied out at the next `flush`, before the page is
        written again)."""
        if page_hash in self._slot_of:  # (its K/V are here already: a page is only cached once computed)
            self._slot_of.move_to_end(page_hash)
            return
        if self._free:
            slot = self._free.pop()
        else:
            victim = next((h for h in self._slot_of if h not in self._held), None)
            if victim is None:  # every entry is about to be loaded: the evicted page is not kept
                return
            slot = self._slot_of.pop(victim)
        self._slot_of[page_hash] = slot
        self._saves.append((page, slot))
        self.saved += 1

    def count(self, hashes: Sequence[bytes]) -> int:
        """How many of `hashes` (a chain, in order) are here before the first that is not."""
        count = 0
        for page_hash in hashes:
            if page_hash not in self._slot_of:
                break
            count += 1
        return count

    def hold(self, hashes: Sequence[bytes]) -> None:
        """Keep `hashes`' entries until they are loaded (`save` drops others first)."""
        self._held.update(hashes)

    def flush(self) -> None:
        """Copy out the pages saved since the last flush; the step stream waits for them (its next step may
        overwrite them). On a GPU the copy stream first waits for the steps already queued."""
        if self.stream is None:
            self._copy(self._saves, out=True)
        elif self._saves:
            self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
            with torch.cuda.stream(self.stream):
                self._copy(self._saves, out=True)
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
        self._saves = []

    def load(self, hashes: Sequence[bytes], pages: Sequence[int]) -> None:
        """Copy the K/V kept under `hashes` into device `pages` (one each), and release their hold. Call `flush`
        first (the step's saves go out before any load into a page they came from). On a GPU the copies run under
        the step queued next; `wait_loads` ends them."""
        pairs = []
        for page_hash, page in zip(hashes, pages, strict=True):
            pairs.append((page, self._slot_of[page_hash]))
            self._slot_of.move_to_end(page_hash)
            self._held.discard(page_hash)
        if self.stream is None:
            self._copy(pairs, out=False)
        else:
            self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
            with torch.cuda.stream(self.stream):
                self._copy(pairs, out=False)
                self._loaded = torch.cuda.Event()
                self._loaded.record(self.stream)
        self.loaded += len(pages)

    def wait_loads(self) -> None:
        """The step stream waits for the loads issued so far (before it runs a step that reads them)."""
        if self._loaded is not None:
            torch.cuda.current_stream(self.stream.device).wait_event(self._loaded)  # type: ignore[union-attr]
            self._loaded = None

    def _copy(self, pairs: Sequence[tuple[int, int]], out: bool) -> None:
        """Copy (device page, host slot) pairs out to the host (`out`) or back in, a run at a time."""
        for page, slot, n in _runs(pairs):
            for host, device in zip(self.data, self.caches):
                if out:
                    host[slot:slot + n].copy_(device[page:page + n], non_blocking=True)
                else:
                    device[page:page + n].copy_(host[slot:slot + n], non_blocking=True)


def _runs(pairs: Sequence[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(page, slot) pairs as runs (first page, first slot, length) of consecutive pages into consecutive slots."""
    runs: list[tuple[int, int, int]] = []
    for page, slot in pairs:
        if runs and (page, slot) == (runs[-1][0] + runs[-1][2], runs[-1][1] + runs[-1][2]):
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((page, slot, 1))
    return runs


def page_bytes(layers: Sequence[AttentionConfig], page_size: int, dtype: torch.dtype) -> int:
    """Bytes one page takes across all layers (keys and values), `dtype` the pages' element type (an FP8 page
    takes half a 16-bit one's bytes)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return sum(2 * page_size * spec.num_kv_heads * spec.head_dim * itemsize for spec in layers)


class PagedKVCache:
    """One [num_pages + 1, 2, page_size, num_kv_heads, head_dim] tensor per layer (FlashInfer's NHD layout).

    `layers[i]` is layer i's attention configuration. Pages 0..num_pages-1 belong to the allocator; the last
    one, `scratch_page`, takes the padding tokens' writes. `dtype` is the pages' element type; `model_dtype` the
    dtype the model computes K/V (and queries) in (None: `dtype`). `xqa_width` > 0: planners run decode rows on
    XQA (`ops.xqa`, `NanoFlowConfig.fp8_attention`) with page tables of that many pages. An FP8 cache (`dtype`
    torch.float8_e4m3fn) has `scales`: per layer a [2] fp32 tensor (k_scale, v_scale) on the device, 1.0 unless
    `kv_scales` gives them (`set_scales` changes them in place: captured CUDA graphs read the new values, or, where
    a backend took them as host floats, are captured again: `scales_version`).
    """

    def __init__(
        self,
        layers: Sequence[AttentionConfig],
        num_pages: int,
        page_size: int,
        dtype: torch.dtype,
        device: torch.device,
        model_dtype: torch.dtype | None = None,
        kv_scales: Sequence[tuple[float, float]] | None = None,
        xqa_width: int = 0,
    ) -> None:
        self.page_size, self.layers = page_size, tuple(layers)
        self.xqa_width = xqa_width  # decode rows on XQA with page tables this wide (`fp8_attention`); 0: off
        self.model_dtype = model_dtype if model_dtype is not None else dtype
        self.allocator = PageAllocator(num_pages)
        self.scratch_page = num_pages
        self.caches = tuple(
            torch.zeros(num_pages + 1, 2, page_size, spec.num_kv_heads, spec.head_dim, dtype=dtype, device=device)
            for spec in layers
        )
        self.scales: tuple[torch.Tensor, ...] = ()
        self.scale_values: list[tuple[float, float]] = []  # `scales` on the host
        self.scales_version = 0  # counts `set_scales` calls (what captured host values were taken from)
        if kv_quant.is_fp8(dtype):
            self.scales = tuple(torch.ones(2, dtype=torch.float32, device=device) for _ in layers)
            self.scale_values = [(1.0, 1.0)] * len(self.layers)
            self._scale_layer = {t.data_ptr(): i for i, t in enumerate(self.scales)}  # (`scale_values_of`)
            if kv_scales is not None:
                self.set_scales(kv_scales)
        elif kv_scales is not None:
            raise ValueError(f"KV scales are for an FP8 cache; this cache holds {dtype}")

    def set_scales(self, kv_scales: Sequence[tuple[float, float]]) -> None:
        """Set each layer's (k_scale, v_scale) (positive, finite; kept as fp32), in place."""
        if not self.scales:
            raise ValueError(f"KV scales are for an FP8 cache; this cache holds {self.dtype}")
        values = [(float(k), float(v)) for k, v in kv_scales]
        if len(values) != len(self.layers):
            raise ValueError(f"{len(values)} KV scale pairs for {len(self.layers)} attention layers")
        bad = [i for i, pair in enumerate(values) if not all(0 < x < float("inf") for x in pair)]
        if bad:
            raise ValueError(f"KV scales must be positive and finite; layers {bad} have {[values[i] for i in bad]}")
        host = [torch.tensor(pair, dtype=torch.float32) for pair in values]
        read = [(float(k), float(v)) for k, v in host]  # (fp32: what the kernels read)
        kv_quant.check_query_range(self.query_dtype, read)
        for tensor, pair in zip(self.scales, host):
            tensor.copy_(pair)
        self.scale_values = read
        self.scales_version += 1

    def release(self) -> None:
        """Give the pages' memory back: the cache holds no page after (not to be stepped on again). A cache sized
        to replace this one counts its bytes as free (`pages_from_memory`), so it is released before the new one is
        allocated: both at once may not fit."""
        self.caches = tuple(torch.empty((0, *c.shape[1:]), dtype=c.dtype, device=c.device) for c in self.caches)
        self.allocator = PageAllocator(0)

    @property
    def quantized(self) -> bool:
        """Whether the pages hold FP8 values (read back as value * scale)."""
        return bool(self.scales)

    @property
    def dtype(self) -> torch.dtype:
        return self.caches[0].dtype

    @property
    def query_dtype(self) -> torch.dtype:
        """What attention over this cache takes its query in (`kv_quant.query_dtype`: fp16 for a bf16 model over
        e4m3)."""
        return kv_quant.query_dtype(self.model_dtype, self.dtype)

    @property
    def device(self) -> torch.device:
        return self.caches[0].device

    @property
    def num_bytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in self.caches)

    def make_planner(self, backend: AttentionBackend, configs: Sequence[AttentionConfig],
                     decode_batch: int | None = None, max_pages: int = 0) -> Planner | None:
        """`backend`'s planner for steps over this cache (queries in `query_dtype`, pages of `dtype`); with
        `decode_batch`, a CUDA-graph bucket's (`AttentionBackend.make_planner`)."""
        return backend.make_planner(configs, self.page_size, self.query_dtype, self.device, decode_batch, max_pages,
                                    kv_dtype=self.dtype, scale_values=self.scale_values_of if self.scales else None,
                                    xqa_width=self.xqa_width)

    def scale_values_of(self, scale: torch.Tensor) -> tuple[float, float] | None:
        """The host values (k_scale, v_scale) of one of `scales` (a layer's tensor, as a step passes it on); None
        for another tensor."""
        layer = self._scale_layer.get(scale.data_ptr())
        return self.scale_values[layer] if layer is not None else None

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def read(self, layer: int, pages: Sequence[int], num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [num_tokens, Hkv, D] of a request whose KV lives in `pages` (an FP8 cache's dequantised,
        in `model_dtype`)."""
        idx = torch.tensor(list(pages), dtype=torch.long, device=self.caches[layer].device)
        scale = self.scales[layer] if self.quantized else None
        return read_pages(self.caches[layer], idx, num_tokens, scale, self.model_dtype if scale is not None
                          else self.dtype)


# -- sizing -----------------------------------------------------------------------------------------------------
CPU_SEQ_CAP = 4096  # CPU default cache: max_batch_size sequences of at most this many tokens


def default_pages(cfg: Any) -> int:
    """The cache's pages when not sized from GPU memory: `num_pages`, or every sequence at its longest (capped)."""
    if cfg.num_pages is not None:
        return cfg.num_pages
    return cfg.max_batch_size * -(-min(cfg.max_seq_len, CPU_SEQ_CAP) // cfg.page_size)


def profile_requests(cfg: Any) -> list[int]:
    """Prompt lengths of the step whose memory `pages_from_memory` measures: `max_num_tokens` tokens over as
    many requests as may run (every one completing, so the logits and sampling buffers are the largest)."""
    budget, count = int(cfg.max_num_tokens), min(cfg.max_batch_size, int(cfg.max_num_tokens))
    return [budget // count + (1 if i < budget % count else 0) for i in range(count)]


def profile_pages(cfg: Any, probe_tokens: int) -> int:
    """Pages of the small cache the memory profile and the probe (`probe_tokens` tokens) run on, before the real
    cache is sized."""
    return sum(-(-n // cfg.page_size) for n in profile_requests(cfg)) + -(-probe_tokens // cfg.page_size) + 2


@torch.no_grad()
def pages_from_memory(runner: Any, cfg: Any, vocab_size: int) -> int:
    """KV pages that fit in `kv_cache_memory_fraction` of the GPU once weights and the largest step's
    activations are counted: the step is run once on `runner` (a full `max_num_tokens` step of `cfg`, a resolved
    `NanoFlowConfig`) and its peak measured."""
    cache = runner.kv_cache
    device = cache.device
    # Memory of dropped objects still in reference cycles (a dropped optimized model is not: it frees its runtime
    # at once; other objects of the caller may be) is reclaimed first, so the cache is sized from what is free;
    # and the allocator's cached free blocks go back to the driver: a previous model's cache, freed into blocks of
    # its own sizes, left the new cache's large allocations without room (models optimized one after another).
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab_size, (n,), generator=gen).tolist() for n in profile_requests(cfg)]
    logits = runner.run_prompts(prompts)
    logits.float().argmax(-1)  # sampling's buffers
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    free, total = torch.cuda.mem_get_info(device)
    others = total - free - torch.cuda.memory_reserved(device)  # CUDA context, other processes
    del logits
    gc.collect()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    reserved = torch.cuda.memory_reserved(device)
    # What torch's allocator keeps reserved counts against the fraction like what is allocated. Its kept blocks
    # (free, in segments other tensors still use: the measured step's activations freed into blocks of their
    # sizes, weights replaced by fused or quantised ones) serve later steps' activations, which the peak already
    # counts, but not the cache's tensors (fresh allocations of a layer's pages each: hundreds of MiB on a large
    # model), nor CUDA graphs' private pools and libraries' workspaces (a thread's cuBLAS handle), which need the
    # fraction's remainder. (Counted as usable, ~2.5 GiB of kept blocks left an 80-layer 70B shape at fraction 0.96
    # on an H100 without memory for its graphs and its engine thread's cuBLAS handle.) At least 1 GiB stays free.
    # The measured step's small cache is freed before the sized one is allocated: its bytes count as free.
    budget = min(cfg.kv_cache_memory_fraction * total - others - max(peak, reserved),
                 free - float(2**30)) + cache.num_bytes
    lost = reserved - peak
    if lost > 0:
        log.log(logging.WARNING if lost >= 2**30 else logging.INFO,
                "nanoflow_fx: the KV cache is %s smaller for the blocks torch's allocator keeps (%s reserved beyond "
                "the %s a step peaks at; free blocks in segments still in use); "
                "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, set before the process first uses CUDA, lets "
                "torch give such blocks back", _gib(lost), _gib(reserved - torch.cuda.memory_allocated(device)),
                _gib(peak))
    per_page = page_bytes(cache.layers, cfg.page_size, cache.dtype)
    pages = int(budget // per_page)
    need = -(-cfg.max_seq_len // cfg.page_size)
    if pages < need:
        raise KVCacheExhaustedError(
            f"after the weights ({_gib(peak)} at the peak of a {cfg.max_num_tokens}-token step) only "
            f"{_gib(max(budget, 0))} of kv_cache_memory_fraction={cfg.kv_cache_memory_fraction} x {_gib(total)} "
            f"is left for the KV cache: {max(pages, 0)} pages, fewer than one sequence of max_seq_len="
            f"{cfg.max_seq_len} needs ({need}); raise kv_cache_memory_fraction, lower max_num_tokens or "
            "max_seq_len, or free GPU memory")
    log.info("nanoflow_fx: KV cache sized from GPU memory: %d pages (%s; step peak %s, other %s of %s)", pages,
             _gib(pages * per_page), _gib(peak), _gib(others), _gib(total))
    return pages


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.1f} GiB"
