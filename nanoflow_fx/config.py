"""`NanoFlowConfig`: the one configuration object of nanoflow_fx."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Literal

from nanoflow_fx.errors import NanoFlowError

__all__ = ["NanoFlowConfig", "ExperimentalConfig", "ATTENTION_BACKENDS", "KV_CACHE_DTYPES", "as_config", "cache_root",
           "resolve"]

ATTENTION_BACKENDS = ("auto", "torch", "triton", "flashinfer")  # see nanoflow_fx.ops.backend
KV_CACHE_DTYPES = ("auto", "fp8_e4m3")  # see nanoflow_fx.ops.kv_quant
LINEAR_DTYPES = ("auto", "fp8_e4m3")  # see NanoFlowConfig.linear_dtype
SM_PARTITIONS = ("off", "streams", "soft", "carveout", "hard", "hard-triton")


@dataclass(frozen=True)
class ExperimentalConfig:
    """Research knobs of nano-batched CUDA steps (NanoFlow's execution units on SM partitions), apart from what a
    user of the library sets: no setting has been found to make the engine's steps faster on one GPU
    (docs/findings.md). `NanoFlowConfig(experimental=ExperimentalConfig(sm_partition="soft"))`, or in a dict,
    `{"experimental": {"sm_partition": "soft"}}`."""

    sm_partition: str = "off"
    """The execution units of nano-batched CUDA steps: "off" (one stream, in the Schedule's order), "streams"
    (a stream per unit, events for cross-unit waits), "soft" (the memory unit's attention confined to
    `memory_sms` SMs by a green context, the compute unit free), "carveout" (as "soft", and the compute unit's
    cuBLASLt GEMMs leave those SMs free), or "hard" (the compute unit on a green context of the remaining SMs,
    its GEMMs sized to them by the same carve-out: the two units never share an SM), or "hard-triton" (as "hard",
    its GEMMs on a persistent Triton GEMM with one program per SM of its partition; slower than cuBLAS on a
    step's GEMMs: benchmarks/RESULTS.md).
    Ignored with num_nanobatches="auto" (the search picks units per step shape)."""

    memory_sms: int = 32
    """SMs of the memory-bound unit's partition ("soft"/"carveout"/"hard"); rounded up to a multiple of 8."""

    split_decode_graphs: bool = False
    """Cut the decode steps replayed from CUDA graphs too: each bucket's graph is captured with the cut the step's
    split policy gives its size (`num_nanobatches`; the search's pick with "auto"), its nano-batches' streams
    forking from and joining the capture. Off: decode graphs run whole, as a cut reads every weight once more per
    nano-batch."""

    def __post_init__(self) -> None:
        _require_positive_int("memory_sms", self.memory_sms)
        if not isinstance(self.split_decode_graphs, bool):
            raise ValueError(f"ExperimentalConfig.split_decode_graphs must be True or False, not "
                             f"{self.split_decode_graphs!r}")
        if self.sm_partition not in SM_PARTITIONS:
            raise ValueError(f"ExperimentalConfig.sm_partition={self.sm_partition!r} is not one of {SM_PARTITIONS}")


@dataclass(frozen=True)
class NanoFlowConfig:
    """How `optimize()` captures and runs a model. Frozen; round-trips through `to_dict`/`from_dict`.

    The model's dtype and device are taken from the model itself, not from here. Fields that say "auto" (or
    None) are resolved by `optimize()` for the model and device; `model.nanoflow.config` holds the values used.
    """

    max_batch_size: int = 512
    """Most requests running at once (each holds a slot of the engine); more wait in its queue. Decode steps of
    up to this many requests replay CUDA graphs."""

    max_seq_len: int | None = None
    """Longest sequence (prompt plus generated tokens) a request may reach. None: the model's
    `max_position_embeddings` (2048 if it has none)."""

    page_size: int = 16
    """Tokens per KV-cache page."""

    num_pages: int | None = None
    """KV-cache pages (per layer). None: on CUDA, as many as `kv_cache_memory_fraction` of the GPU's memory
    holds after the weights and a full step's activations; elsewhere, enough for `max_batch_size` sequences of
    `max_seq_len` tokens (at most 4096 each)."""

    kv_cache_memory_fraction: float = 0.9
    """On CUDA with `num_pages=None`: the share of the GPU's total memory nanoflow_fx may fill (weights,
    activations, the KV cache and the free blocks torch's allocator keeps, together; the rest stays free for CUDA
    graphs, libraries' workspaces and other users)."""

    max_num_tokens: int | Literal["auto"] = "auto"
    """Token budget of one step (NanoFlow's dense batch: decode tokens first, then prefill chunks fill the rest;
    longer prefills are chunked). "auto": on CUDA, the smallest power of two (>= 256) at which a step's GEMMs take
    at least five times as long as reading the weights, from the device's measured matmul rate and copy
    bandwidth (`nanoflow_fx.cost.device`; measured once per device type and saved in `cache_dir`, so every later
    process uses the same figures), so steps run compute-bound (the rule's evidence: benchmarks/RESULTS.md,
    "Defaults re-measured"); elsewhere 512."""

    num_nanobatches: int | Literal["auto"] = 1
    """Nano-batches an eager step is cut into (even sizes, on the units `experimental.sm_partition` names); decode
    steps replayed as CUDA graphs run whole. "auto": on CUDA, `optimize()` measures candidate cuts of two dense step
    shapes and keeps, per shape, the fastest, unless no cut beats the whole step by more than 1%
    (`nanoflow_fx.cost.autotune`; its cost table is kept on disk, so a later process searches much faster); on the
    CPU every step runs whole.
    Every configuration runs the step as the same program of pieces, cut per step (`nanoflow_fx.capture.program`),
    so the saved step and the interim attention kernel serve every value. 1 is the default because no cut of the
    engine's dense steps has been found to beat the whole step (docs/findings.md): "auto" would add its search to
    `optimize()` for no faster step."""

    attention_backend: str = "auto"
    """Paged attention kernel: "torch" (reference, CPU and GPU), "triton" (GPU), "flashinfer" (GPU, fp16/bf16;
    needs `pip install flashinfer-python`), or "auto": flashinfer where it can run, else triton on CUDA when
    Triton imports, else torch."""

    kv_cache_dtype: str = "auto"
    """What the paged KV cache stores: "auto" (the model's dtype) or "fp8_e4m3" (torch.float8_e4m3fn, one byte an
    element: about twice the tokens fit, and decode attention reads half the bytes). FP8 pages hold K / k_scale
    and V / v_scale, clamped to +-448 (e4m3's largest value) and rounded to 3 mantissa bits; every attention backend
    multiplies them back. The per-layer scales (fp32) are 1.0 unless the model carries `k_scale`/`v_scale` tensors
    on its attention modules (FP8 checkpoints) or `calibrate_kv_scales` is set. See docs/runtime.md."""

    calibrate_kv_scales: bool = False
    """With kv_cache_dtype="fp8_e4m3": set each layer's K and V scales from `optimize()`'s probe (the largest |K|
    and |V| an eager forward of the probe prompts writes, times a margin, over 448, rounded up to a power of two)
    instead of the model's own scales or 1.0. Keys or values beyond 448 x their scale are clamped: a model whose
    K/V exceed that range needs it."""

    fp8_attention: bool = False
    """With kv_cache_dtype="fp8_e4m3": attend the decode rows with FlashInfer's XQA kernel, which computes in FP8 (on
    Hopper, wgmma over e4m3: the query and the softmax probabilities are rounded to e4m3 as well, not only K and V).
    It reads the e4m3 cache at about the bandwidth a bf16 decode reaches: decode attention in ~0.5x the bf16 time,
    where the default (16-bit arithmetic over the dequantised cache) takes ~0.65x at the engine's shapes
    (docs/runtime.md). Needs FlashInfer >= 0.5 (`pip install 'flashinfer-python>=0.5'`), a compute capability
    9.x GPU, the "flashinfer" (or "auto") attention backend and no logit soft-capping; optimize() says which is
    missing. Prefill rows stay on FlashInfer's 16-bit kernels."""

    interim_attention: bool = True
    """While the attention backend's kernels are still being built when the step is ready (FlashInfer's JIT build
    on a fresh machine), run the first steps on Triton's kernel (the same captured step; checked against the
    eager model like any step) instead of waiting, and switch to the backend at the first step after its build (its
    check and the CUDA-graph capture run then). `optimize()` then returns sooner, and the first tokens come from
    slower eager steps. False: `optimize()` waits for the build. Until the switch, steps run whole (a cut plans each
    nano-batch on the backend), and `num_nanobatches="auto"` searches at the switch."""

    inductor: bool | Literal["auto"] = "auto"
    """Compile the step's ops between attention calls with Inductor (fuses HF's elementwise work: norms, RoPE,
    activations, residual adds); attention calls stay as captured (nano-batches run the same pieces on their token
    slices). "auto": on for CUDA models (the fused elementwise work makes the decode step faster than HF's many
    small kernels: benchmarks/RESULTS.md), off on the CPU, where compiling costs more than it saves for small
    models."""

    fuse_linears: bool = True
    """Merge linear layers that read the same input into one GEMM (Q/K/V projections, gate/up): `optimize()`
    moves their weights into one buffer, each parameter becoming a view of it (no extra memory; the eager model
    computes as before), and the captured step runs one GEMM per group. See `nanoflow_fx.capture.fuse_linears`."""

    linear_dtype: str = "auto"
    """The arithmetic of the decoder layers' linear layers (attention and MLP projections, fused ones included):
    "auto" computes them in the dtype their weights have (the model's; FP8 where the model came quantised to FP8:
    torchao's float8 tensors, transformers' FBGEMM FP8 linears), or "fp8_e4m3": `optimize()` stores each such
    weight as float8 e4m3 with one fp32 scale per output channel (its bf16/fp16/fp32 copy freed, so the KV cache
    gets that memory), quantises activations per token on the fly (fused by Inductor into the op before the
    linear) and multiplies with `torch._scaled_mm`. Embeddings, the LM head, norms, MoE routers and experts stay
    in the model's dtype. Costs accuracy (docs/capture.md, "FP8 linears"); needs a GPU with FP8 tensor cores
    (compute capability 8.9+) or the CPU. See `nanoflow_fx.capture.fp8_linears`."""

    replicate_layers: bool = True
    """Trace only the first layers of the model's repeated decoder layers (three periods: 3 layers of a Llama, 6-7 of a
    Gemma-2, whose sliding/global layers alternate) and copy their graph for the others, each copy reading its own
    weights and KV cache, instead of tracing every layer: Dynamo and AOTAutograd then cost about as much for a 32-layer
    model as for a 3-layer one. Layers repeat when their classes, attributes (but `layer_idx`), hooks, parameter layout
    and attention configuration are equal; the traced layers are also checked against each other node for node, and the
    result against the eager model (`check_capture`). Models whose layers do not repeat are traced whole. See
    `nanoflow_fx.capture.replicate`."""

    cuda_graphs: bool = True
    """On CUDA with the "triton" or "flashinfer" backend: replay decode-sized steps as CUDA graphs."""

    check_capture: bool = True
    """Compare the captured step with the eager model on a probe input in `optimize()`."""

    check_plans: bool = True
    """Under tensor parallelism: check every step's plan (admissions, preemptions, pages, chunks) across the TP
    ranks before it runs, one small all-gather on the CPU group per step; ranks that diverge raise, naming the
    difference, instead of hanging in a collective. Off saves that all-gather (`runtime.control_plane`)."""

    prefix_caching: bool = True
    """Share the KV pages of identical prompt prefixes between requests (and keep finished requests' pages cached
    for later ones): a request whose first full pages match cached ones skips computing them
    (`runtime.kv_cache.PageAllocator`). On by default: measured to cost nothing where nothing is shared
    (`benchmarks/bench_prefix.py`). Outputs are the same either way."""

    prefix_offload_gib: float = 0.0
    """With `prefix_caching`: host memory (GiB; pinned on a GPU) for cached pages evicted from the KV cache. An
    evicted page's K/V are copied there (the least recently evicted dropped when it is full), and a later request
    whose chain continues there gets them copied back instead of computed (NanoFlow's multi-round KV reuse). 0: off
    (`runtime.kv_cache.HostPages`)."""

    cache_dir: str | None = None
    """Where compiled work persists across processes: the captured and lowered step goes to `<cache_dir>/steps`
    (see `save_step`), the device's measured ceilings to `device_ceilings.json` (see `max_num_tokens`), Inductor's
    compiled pieces to `<cache_dir>/inductor` (unless TORCHINDUCTOR_CACHE_DIR is set,
    or Inductor already ran in this process). None: `$XDG_CACHE_HOME/nanoflow_fx`, else `~/.cache/nanoflow_fx`.
    FlashInfer keeps its built kernels in its own cache (`~/.cache/flashinfer`), shared with its other users. Like
    Inductor's cache, the directory holds code that is run when loaded: keep it private."""

    save_step: bool = True
    """Save the captured and lowered step in `cache_dir` and, in a later process, load it instead of tracing the
    model again (Dynamo and AOTAutograd). The file is keyed by the model class, its config and parameter layout,
    this config, nanoflow_fx's source and the torch/transformers/triton versions; a loaded step is still checked
    against the eager model (`check_capture`). One saved step serves every `num_nanobatches`. The environment
    variable NANOFLOW_FX_SAVE_STEP=0 turns it off for a whole process (the test suite does)."""

    experimental: ExperimentalConfig = dataclasses.field(default_factory=lambda: ExperimentalConfig())
    """Research knobs (`ExperimentalConfig`): the execution units of nano-batched steps."""

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "page_size"):
            _require_positive_int(name, getattr(self, name))
        for name in ("max_seq_len", "num_pages"):
            if getattr(self, name) is not None:
                _require_positive_int(name, getattr(self, name))
        for name in ("max_num_tokens", "num_nanobatches"):
            if getattr(self, name) != "auto":
                _require_positive_int(name, getattr(self, name))
        fraction = self.kv_cache_memory_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ValueError(f"NanoFlowConfig.kv_cache_memory_fraction must be in (0, 1], got {fraction!r}")
        offload = self.prefix_offload_gib
        if isinstance(offload, bool) or not isinstance(offload, (int, float)) or not 0 <= offload < float("inf"):
            raise ValueError(f"NanoFlowConfig.prefix_offload_gib must be a finite number >= 0, got {offload!r}")
        if offload > 0 and not self.prefix_caching:
            raise ValueError("NanoFlowConfig.prefix_offload_gib keeps evicted prefix-cache pages: it needs "
                             "prefix_caching=True")
        if not isinstance(self.experimental, ExperimentalConfig):
            raise ValueError(f"NanoFlowConfig.experimental must be an ExperimentalConfig, got {self.experimental!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"NanoFlowConfig.attention_backend={self.attention_backend!r} is not one of {ATTENTION_BACKENDS}"
            )
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"NanoFlowConfig.kv_cache_dtype={self.kv_cache_dtype!r} is not one of {KV_CACHE_DTYPES} "
                             "('auto': the model's dtype)")
        if self.calibrate_kv_scales is True and self.kv_cache_dtype == "auto":
            raise ValueError("NanoFlowConfig.calibrate_kv_scales=True calibrates FP8 KV-cache scales: it needs "
                             "kv_cache_dtype='fp8_e4m3'")
        if not isinstance(self.fp8_attention, bool):
            raise ValueError(f"NanoFlowConfig.fp8_attention must be True or False, not {self.fp8_attention!r}")
        if self.fp8_attention and self.kv_cache_dtype != "fp8_e4m3":
            raise ValueError("NanoFlowConfig.fp8_attention=True attends over an FP8 KV cache: it needs "
                             "kv_cache_dtype='fp8_e4m3'")
        if self.linear_dtype not in LINEAR_DTYPES:
            raise ValueError(f"NanoFlowConfig.linear_dtype={self.linear_dtype!r} is not one of {LINEAR_DTYPES} "
                             "(\"auto\": the weights' own dtype; \"fp8_e4m3\": FP8 weights and activations)")
        if self.cache_dir is not None and not isinstance(self.cache_dir, str):
            raise ValueError(f"NanoFlowConfig.cache_dir must be a path string or None, got {self.cache_dir!r}")
        for name in ("check_capture", "check_plans", "cuda_graphs", "inductor", "fuse_linears", "save_step",
                     "replicate_layers", "interim_attention", "calibrate_kv_scales", "prefix_caching"):
            value = getattr(self, name)
            if not isinstance(value, bool) and not (name == "inductor" and value == "auto"):
                raise ValueError(f"NanoFlowConfig.{name} must be a bool, got {value!r}")

    @property
    def nanobatched(self) -> bool:
        """Whether every eager step is cut into a fixed count (> 1) of nano-batches ("auto": the search decides)."""
        return self.num_nanobatches != "auto" and self.num_nanobatches > 1


    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> NanoFlowConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        moved = sorted(set(values) & {f.name for f in dataclasses.fields(ExperimentalConfig)})
        if moved:
            raise ValueError(f"NanoFlowConfig's {moved} moved to its experimental sub-config: pass "
                             f"{{'experimental': {{{', '.join(repr(k) + ': ...' for k in moved)}}}}}")
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"NanoFlowConfig has no field(s) {unknown}; known fields: {sorted(known)}")
        values = dict(values)
        experimental = values.get("experimental")
        if isinstance(experimental, dict):
            extra = sorted(set(experimental) - {f.name for f in dataclasses.fields(ExperimentalConfig)})
            if extra:
                raise ValueError(f"ExperimentalConfig has no field(s) {extra}")
            values["experimental"] = ExperimentalConfig(**experimental)
        return cls(**values)


def _require_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"NanoFlowConfig.{name} must be a positive int, got {value!r}")


CPU_MAX_NUM_TOKENS = 512  # the step budget on the CPU ("auto")


def as_config(config: NanoFlowConfig | dict[str, Any] | None) -> NanoFlowConfig:
    """`config` as a `NanoFlowConfig` (None: the defaults; a dict: its fields)."""
    if config is None:
        return NanoFlowConfig()
    if isinstance(config, dict):
        return NanoFlowConfig.from_dict(config)
    if not isinstance(config, NanoFlowConfig):
        raise TypeError(f"optimize() takes a NanoFlowConfig or a dict of its fields, got {type(config).__name__}")
    return config


def cache_root(config: NanoFlowConfig) -> str:
    """Where nanoflow_fx keeps what it saves (`cache_dir`, else `$XDG_CACHE_HOME/nanoflow_fx` or ~/.cache)."""
    return config.cache_dir or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                            "nanoflow_fx")


def resolve(config: NanoFlowConfig, model: Any, device: Any, dtype: Any) -> NanoFlowConfig:
    """`config` with every "auto"/None that depends on the model and device made concrete (not `num_pages`:
    that is sized after the probe, from the memory left). `max_num_tokens="auto"` on CUDA measures the device
    once per device type (`cost.device`, kept under `cache_root`)."""
    import torch

    from nanoflow_fx.cost.device import measure_ceilings, token_budget

    if dtype == torch.float64 and config.attention_backend in ("triton", "flashinfer"):
        raise NanoFlowError(f"attention_backend={config.attention_backend!r} does not take float64 models; "
                            "use 'torch' (or 'auto'), or run the model in float32")
    positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if config.max_seq_len is not None and positions is not None and config.max_seq_len > positions:
        raise NanoFlowError(
            f"NanoFlowConfig.max_seq_len={config.max_seq_len} exceeds {type(model).__name__}'s "
            f"max_position_embeddings={positions}: a longer request would read positions the model does not have; "
            f"set max_seq_len <= {positions} (or None), or raise the model's config.max_position_embeddings if "
            "its position encoding extends further (e.g. scaled RoPE)")
    max_seq_len = config.max_seq_len or positions
    on_cuda = device.type == "cuda"
    budget = config.max_num_tokens
    if budget == "auto":
        element = torch.empty((), dtype=dtype).element_size()
        budget = (token_budget(measure_ceilings(device, cache_root(config)), element) if on_cuda
                  else CPU_MAX_NUM_TOKENS)
    inductor = config.inductor if config.inductor != "auto" else on_cuda
    return dataclasses.replace(config, max_seq_len=int(max_seq_len or 2048), max_num_tokens=budget,
                               inductor=inductor, linear_dtype=_linear_dtype(config, model))


def _linear_dtype(config: NanoFlowConfig, model: Any) -> str:
    """`linear_dtype` resolved: "fp8_e4m3" when asked for or when the model's linears are FP8 (another library's, or
    quantised by `optimize()`), else "auto" (the model's dtype)."""
    from nanoflow_fx.capture.fp8_weights import has_fp8_linears

    return "fp8_e4m3" if config.linear_dtype == "fp8_e4m3" or has_fp8_linears(model) else config.linear_dtype
