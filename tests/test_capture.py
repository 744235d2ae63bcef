"""Structure of the captured step: one ATen graph, one attention op per layer, no whole-cache copies."""

from __future__ import annotations

import pytest
import torch

import nanoflow_fx
from tests.conftest import ALL_FAMILIES, optimized
from tests.test_generate_parity import _left_padded_batch

ATTENTION = torch.ops.nanoflow.paged_attention.default


def _mutating_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
            and n.target._schema.is_mutable]


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_one_graph_one_attention_op_per_layer_and_cache_mutated_in_place(family: str) -> None:
    model = optimized(family)  # shared: other tests may have run it on other caches (more graphs) before
    graphs = model.nanoflow.step_fn.graphs
    before = len(graphs)  # optimize() captured graphs[0] on the model's own cache (its probe)
    ids, mask = _left_padded_batch([6, 2, 9])
    model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    model.generate(ids[:1], max_new_tokens=3, do_sample=False)  # batch of one: 1-token decode steps
    assert len(graphs) == before, "step sizes are kept >= 2, so no shape may trigger a recompile"
    gm = graphs[0]
    num_layers = len(model.nanoflow.layers)
    attention = [n for n in gm.graph.nodes if n.target is ATTENTION]
    assert len(attention) == num_layers
    # Every KV cache is a graph input written only by its layer's attention op: no functionalised copy of it.
    caches = {n.args[3] for n in attention}
    assert len(caches) == num_layers and all(c.op == "placeholder" for c in caches)
    for node in _mutating_nodes(gm):
        if node.target is not ATTENTION:  # in-place ops elsewhere may only touch intermediates
            mutated = [a for a, arg in zip(node.args, node.target._schema.arguments) if arg.is_write]
            assert all(isinstance(m, torch.fx.Node) and m.op != "placeholder" for m in mutated), node.format_node()
    users = {u for c in caches for u in c.users}
    assert users <= set(attention), f"cache read outside attention: {users - set(attention)}"


def test_backend_works_with_torch_compile_directly() -> None:
    from nanoflow_fx.capture.backend import make_backend
    from nanoflow_fx.capture.lowering import Capture, lowering_for

    def f(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ w).sum(-1)

    x, w = torch.randn(5, 4), torch.randn(4, 3)
    public = torch.compile(f, backend=nanoflow_fx.backend(), fullgraph=True)
    torch.testing.assert_close(public(x, w), f(x, w))
    captures: list[Capture] = []
    lowering = lowering_for(nanoflow_fx.NanoFlowConfig(inductor=False))
    compiled = torch.compile(f, backend=make_backend(lowering, on_capture=captures.append), fullgraph=True)
    torch.testing.assert_close(compiled(x, w), f(x, w))
    assert len(captures) == 1
    targets = {n.target for n in captures[0].graph.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.mm.default in targets  # lowered to ATen
    assert [p.kind for p in captures[0].program.pieces] == ["dense"]  # no attention call: one piece


def test_optimize_returns_the_same_object() -> None:
    from tests.tiny_models import build

    model = build("qwen2")
    cls = type(model)
    assert nanoflow_fx.optimize(model, nanoflow_fx.NanoFlowConfig(max_batch_size=2, max_seq_len=16)) is model
    assert type(model) is cls and isinstance(model, cls)


def test_loading_another_model_class_does_not_recompile_the_step() -> None:
    """transformers registers every model class in a process-wide registry on first use; that must not
    invalidate an already captured step (Dynamo would otherwise guard on the registry's size)."""
    import transformers as tf

    from tests.tiny_models import build

    model = nanoflow_fx.optimize(build("llama"), nanoflow_fx.NanoFlowConfig(max_batch_size=2, max_seq_len=32))
    ids, _ = _left_padded_batch([5])
    model.generate(ids, max_new_tokens=2)
    before = len(model.nanoflow.step_fn.graphs)
    other = tf.OlmoForCausalLM(tf.OlmoConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=1, num_attention_heads=2)).eval()
    other(torch.tensor([[1, 2, 3]]))  # registers OlmoModel's class in transformers' registry
    model.generate(ids, max_new_tokens=2)
    assert len(model.nanoflow.step_fn.graphs) == before


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_inductor_pieces_generate_like_hf(family: str) -> None:
    """inductor=True: the ops between attention calls run as Inductor-compiled pieces, attention as captured
    (in place); greedy generation still equals HF's, and the KV write is still one in-place op per layer."""
    import dataclasses

    from nanoflow_fx.capture.inductor import CompiledPiece
    from nanoflow_fx.passes.info import ATTENTION_OP
    from tests.conftest import DEFAULT_CONFIG, optimized, reference
    from tests.test_generate_parity import _left_padded_batch

    model = optimized(family, dataclasses.replace(DEFAULT_CONFIG, inductor=True))
    ids, mask = _left_padded_batch([3, 12, 7])
    got = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    want = reference(family).generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)
    graph = model.nanoflow.step_fn.graphs[0]
    layers = model.config.num_hidden_layers
    assert len(list(graph.graph.find_nodes(op="call_function", target=ATTENTION_OP))) == layers
    dense = [p for p in model.nanoflow.step_fn.program.pieces if p.kind == "dense"]
    assert len(dense) == layers + 1  # before, between and after the attention calls
    assert all(isinstance(p.fn, CompiledPiece) for p in dense)
    assert not any(n.op == "call_function" and n.target is torch.ops.aten.copy_.default for n in graph.graph.nodes)


# Linear groups fused per layer: Q/K/V and gate/up (Phi-3 ships both pre-fused; GPT-2 uses Conv1D; Mixtral's
# experts are not nn.Linear, so only its Q/K/V), and the GEMMs that saves per layer (3 -> 1 and 2 -> 1).
_FUSED_PER_LAYER = {"gemma2": 2, "gpt2": 0, "llama": 2, "mistral": 2, "mixtral": 1, "phi3": 0, "qwen2": 2, "qwen3": 2}
_GEMMS_SAVED_PER_LAYER = {"gemma2": 3, "gpt2": 0, "llama": 3, "mistral": 3, "mixtral": 2, "phi3": 0, "qwen2": 3,
                          "qwen3": 3}


def _gemms(model: torch.nn.Module) -> int:
    graph = model.nanoflow.step_fn.graphs[0].graph
    return sum(n.op == "call_function" and n.target in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
               for n in graph.nodes)


def _step_logits(model: torch.nn.Module, lengths: list[int]) -> torch.Tensor:
    """All logits of one packed step over fresh prompts of `lengths` (seeded), its pages released after."""
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 90, (n,), generator=gen).tolist() for n in lengths]
    return model.nanoflow.runner.run_prompts(prompts, all_logits=True).float()


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_fused_linears_give_the_unfused_step(family: str) -> None:
    """fuse_linears: Q/K/V and gate/up run as one GEMM each over weights re-laid out in one buffer (views, no
    copy); the eager model is bit-for-bit unchanged and the captured step's logits equal the unfused step's."""
    import dataclasses

    from tests.conftest import DEFAULT_CONFIG
    from tests.tiny_models import build

    unfused = optimized(family, dataclasses.replace(DEFAULT_CONFIG, fuse_linears=False))
    model = build(family)
    storage_bytes = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    ids = torch.randint(3, 90, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager_before = model(ids).logits
    nanoflow_fx.optimize(model, DEFAULT_CONFIG)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, eager_before)
    after = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    assert sum(after.values()) == sum(storage_bytes.values()), "fusion must not add weight memory"
    layers = model.config.num_hidden_layers
    assert model.nanoflow.fused_linear_groups == _FUSED_PER_LAYER[family] * layers
    for lengths in ([5, 1, 8], [1, 1]):  # the step is captured on its first run
        torch.testing.assert_close(_step_logits(model, lengths), _step_logits(unfused, lengths), rtol=1e-5,
                                   atol=1e-5)
    assert model.nanoflow.step_fn.captures[0].changed("fuse_linears") == _FUSED_PER_LAYER[family] * layers
    assert _gemms(unfused) - _gemms(model) == _GEMMS_SAVED_PER_LAYER[family] * layers


def test_inductor_compiles_identical_layers_once() -> None:
    """Identical layers share one compiled piece: a 5-layer model's 6 pieces (before the first attention call,
    4 between layers, after the last) are 3 distinct compiles (first, middle, last), whatever ran before in the
    process and whatever Inductor's on-disk cache holds."""
    import dataclasses

    import transformers as tf

    from tests.conftest import DEFAULT_CONFIG

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=5,
                            num_attention_heads=4, num_key_value_heads=2)
    model = tf.LlamaForCausalLM(config)
    nanoflow_fx.optimize(model, dataclasses.replace(DEFAULT_CONFIG, inductor=True))
    program = model.nanoflow.step_fn.program
    pieces = [p.fn for p in program.pieces if p.kind == "dense"]
    assert program.compiles == 3
    assert len(pieces) == 6 and len({id(fn) for fn in pieces}) == 3  # the 4 middle pieces are one object
