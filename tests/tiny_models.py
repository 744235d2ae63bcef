"""Tiny random models of every supported family, built from config classes in code (no downloads)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers as tf

VOCAB = 96

_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)


# Each builder takes config overrides (`build(..., num_hidden_layers=5)`).
def _llama(**kw: object) -> tf.PreTrainedModel:
    return tf.LlamaForCausalLM(tf.LlamaConfig(**{**_COMMON, **kw}))


def _mistral(**kw: object) -> tf.PreTrainedModel:  # window 5 < prompt lengths used in tests: the window really cuts
    return tf.MistralForCausalLM(tf.MistralConfig(**{**_COMMON, "sliding_window": 5, **kw}))


def _qwen2(**kw: object) -> tf.PreTrainedModel:
    return tf.Qwen2ForCausalLM(tf.Qwen2Config(**{**_COMMON, **kw}))


def _qwen3(**kw: object) -> tf.PreTrainedModel:
    return tf.Qwen3ForCausalLM(tf.Qwen3Config(**{**_COMMON, "head_dim": 16, **kw}))


def _gemma2(**kw: object) -> tf.PreTrainedModel:  # soft-capping, alternating sliding (window 4) / global layers
    cfg = tf.Gemma2Config(**{**_COMMON, "num_hidden_layers": 3, "head_dim": 8, "sliding_window": 4,
                             "attn_logit_softcapping": 2.0, "final_logit_softcapping": 5.0,
                             "query_pre_attn_scalar": 8, **kw})
    return tf.Gemma2ForCausalLM(cfg)


def _phi3(**kw: object) -> tf.PreTrainedModel:
    return tf.Phi3ForCausalLM(tf.Phi3Config(**{**_COMMON, **kw}))


def _mixtral(**kw: object) -> tf.PreTrainedModel:
    return tf.MixtralForCausalLM(tf.MixtralConfig(**{**_COMMON, "num_local_experts": 4, "num_experts_per_tok": 2,
                                                     **kw}))


def _gpt2(**kw: object) -> tf.PreTrainedModel:
    layers = kw.pop("num_hidden_layers", 2)
    cfg = tf.GPT2Config(**{"vocab_size": VOCAB, "n_embd": 32, "n_layer": layers, "n_head": 4, "n_positions": 256,
                           "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, **kw})
    return tf.GPT2LMHeadModel(cfg)


FAMILIES: dict[str, Callable[[], tf.PreTrainedModel]] = {
    "llama": _llama, "mistral": _mistral, "qwen2": _qwen2, "qwen3": _qwen3,
    "gemma2": _gemma2, "phi3": _phi3, "mixtral": _mixtral, "gpt2": _gpt2,
}


def build(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu",
          **config: object) -> tf.PreTrainedModel:
    """A fresh tiny model of `family` with weights drawn from `seed`, in eval mode, eager attention; `config`
    overrides its config's fields (e.g. `num_hidden_layers`)."""
    torch.manual_seed(seed)
    model = FAMILIES[family](**config)
    model.set_attn_implementation("eager")
    return model.to(dtype=dtype, device=device).eval()


# The chat template of `word_tokenizer`: each message as `<|role|> words <|end|>`, then `<|assistant|>` to reply.
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


def word_tokenizer(vocab_size: int = VOCAB) -> tf.PreTrainedTokenizerFast:
    """A word-level tokenizer of `vocab_size` ids built in code (no download): the special tokens above (pad 0,
    bos 1, eos 2, as the tiny models' config), then the words "w0", "w1", ... split on whitespace, decoded joined
    by spaces; with `CHAT_TEMPLATE`."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(vocab_size - len(SPECIAL_TOKENS))]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIAL_TOKENS + words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tf.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                      unk_token="<unk>", extra_special_tokens=SPECIAL_TOKENS[4:],
                                      chat_template=CHAT_TEMPLATE)
