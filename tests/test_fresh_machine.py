"""What a newcomer's machine has: the CPU build of torch (no Triton), and none of the optional extras.

The README's first command installs the package with no extras and runs `examples/generate.py`; these tests
run the same path in a subprocess in which the optional packages cannot be imported (`sys.modules[name] = None`
makes `import name` raise ImportError, as on a machine without them). CI also runs that command as written, in
a venv of its own (`.ci/run`)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

_OPTIONAL = ("triton", "flashinfer", "matplotlib")


def _run_without_extras(code: str) -> subprocess.CompletedProcess[str]:
    blocker = f"import sys\nfor _name in {_OPTIONAL!r}:\n    sys.modules[_name] = None\n"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["NANOFLOW_FX_SAVE_STEP"] = "0"
    return subprocess.run([sys.executable, "-c", blocker + textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_import_is_light() -> None:
    """`import nanoflow_fx` loads the config and the errors only; optimize() and explain() load on first use
    (torch's compiler stack and transformers take seconds to import)."""
    done = _run_without_extras("""
        import sys
        import nanoflow_fx
        heavy = sorted(m for m in ("torch", "transformers", "nanoflow_fx.optimize", "nanoflow_fx.explain")
                       if m in sys.modules)
        assert not heavy, heavy
        assert nanoflow_fx.NanoFlowConfig(max_batch_size=2).max_batch_size == 2
        assert callable(nanoflow_fx.optimize) and callable(nanoflow_fx.explain)
        # importing the submodules directly must not replace the public functions of the same names
        from nanoflow_fx.explain import profile_step  # noqa: F401
        import nanoflow_fx.optimize
        assert nanoflow_fx.optimize.__name__ == "optimize" and nanoflow_fx.explain.__name__ == "explain"
        print("ok")
    """)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_optimize_and_generate_without_triton_or_extras() -> None:
    """The README's example path on a machine with no Triton (the CPU build of torch brings none)."""
    done = _run_without_extras("""
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
        import nanoflow_fx

        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        model = LlamaForCausalLM(config).eval()
        ids = torch.randint(3, 64, (2, 5))
        want = model.generate(ids, max_new_tokens=4, do_sample=False)
        nanoflow_fx.optimize(model, nanoflow_fx.NanoFlowConfig(max_batch_size=2, max_seq_len=16))
        assert model.nanoflow.attention_backend.name == "torch"
        assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False), want)
        print("ok")
    """)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
