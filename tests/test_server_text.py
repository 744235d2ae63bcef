"""The server's pure parts: `TextStream` (incremental detokenization, stop strings) and the OpenAI request
parsing (`protocol`), without a model or a server."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoflow_fx.server.protocol import APIError, parse_chat, parse_completion
from nanoflow_fx.server.text import TextStream


def _utf8(ids: list[int]) -> str:
    """A byte-level tokenizer's decode: token i is byte i (ids >= 256 are special tokens: skipped)."""
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def _words(ids: list[int]) -> str:
    """A word-level tokenizer's decode: words joined by spaces (id 0 is a special token: skipped)."""
    return " ".join(f"w{i}" for i in ids if i != 0)


def _stream(decode, prompt, tokens, stop=()):  # type: ignore[no-untyped-def]
    text = TextStream(decode, prompt, stop)
    pieces = [text.push(t) for t in tokens] + [text.finish()]
    return text, pieces


# Byte tokens that often split UTF-8 characters (é, €, 𝄞 and stray continuation bytes), and special tokens.
_BYTES = st.lists(st.sampled_from([*b"ab ", *"é€𝄞".encode(), 0x80, 0xBF, 300]), max_size=24)
_PROMPT = st.sampled_from(["x", "é y"]).map(lambda s: list(s.encode()))


@settings(max_examples=300, deadline=None)
@given(prompt=_PROMPT, tokens=_BYTES)
def test_pieces_join_to_the_completion_of_the_prompt_text(prompt: list[int], tokens: list[int]) -> None:
    # The prompt's text is complete UTF-8, so the generated text is what the whole sequence decodes to after it.
    _, pieces = _stream(_utf8, prompt, tokens)
    assert "".join(pieces) == _utf8(prompt + tokens)[len(_utf8(prompt)) :]


@settings(max_examples=300, deadline=None)
@given(prompt=_PROMPT, tokens=_BYTES)
def test_a_character_split_across_tokens_comes_out_whole(prompt: list[int], tokens: list[int]) -> None:
    # Before the end no piece ends in U+FFFD (an incomplete character is held back, not sent as garbage) unless the
    # bytes were invalid for good: the text sent so far is always a prefix of the final text.
    text = TextStream(_utf8, prompt)
    sent = ""
    final = _utf8(prompt + tokens)[len(_utf8(prompt)) :]
    for t in tokens:
        sent += text.push(t)
        assert final.startswith(sent)


@settings(max_examples=300, deadline=None)
@given(tokens=st.lists(st.integers(0, 5), max_size=20),
       stop=st.lists(st.sampled_from(["w1", "w2 w3", "3 w", " w4 w", "w5"]), max_size=3))
def test_stop_strings_cut_the_text_and_never_appear_in_it(tokens: list[int], stop: list[str]) -> None:
    prompt = [7]
    full = _words(prompt + tokens)[len(_words(prompt)) :]
    text, pieces = _stream(_words, prompt, tokens, stop)
    sent = "".join(pieces)
    assert sent == text.text and full.startswith(sent)
    assert not any(s in sent for s in stop)
    if text.stopped:  # cut right before a stop string, at the token that completed it
        assert any(full[len(sent) :].startswith(s) for s in stop)
        completed = _words(prompt + tokens[: text.num_tokens])[len(_words(prompt)) :]
        before = _words(prompt + tokens[: text.num_tokens - 1])[len(_words(prompt)) :]
        assert any(s in completed for s in stop) and not any(s in before for s in stop)
    else:
        assert sent == full and text.num_tokens == len(tokens)


def test_text_that_may_begin_a_stop_string_is_held_back_until_it_cannot() -> None:
    text = TextStream(_words, [7], ["w1 w2"])
    assert text.push(3) == " w3"
    assert text.push(1) == " "  # "w1" may begin "w1 w2": held back
    assert text.push(4) == "w1 w4"  # not a stop after all: released
    assert text.push(1) == " " and text.push(2) == "" and text.stopped and text.num_tokens == 5
    assert text.push(5) == "" and text.finish() == "" and text.text == " w3 w1 w4 "


def test_an_empty_stop_string_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        TextStream(_words, [1], ["w1", ""])


# ---------------------------------------------------------------------------------------------- protocol
@pytest.mark.parametrize("body, param", [
    ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "a", "max_tokens": 2.5}, "max_tokens"),
    ({"prompt": "a", "max_tokens": True}, "max_tokens"),
    ({"prompt": "a", "temperature": -0.1}, "temperature"),
    ({"prompt": "a", "temperature": "hot"}, "temperature"),
    ({"prompt": "a", "top_p": 0}, "top_p"),
    ({"prompt": "a", "top_p": 1.5}, "top_p"),
    ({"prompt": "a", "top_k": -2}, "top_k"),
    ({"prompt": "a", "stop": ""}, "stop"),
    ({"prompt": "a", "stop": ["x", 3]}, "stop"),
    ({"prompt": "a", "n": 2}, "n"),
    ({"prompt": "a", "echo": True}, "echo"),
    ({"prompt": "a", "logprobs": 2}, "logprobs"),
    ({"prompt": "a", "frequency_penalty": 0.5}, "frequency_penalty"),
    ({"prompt": "a", "stream": "yes"}, "stream"),
    ({"prompt": "a", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "a", "stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
    ({"prompt": "a", "best_of": 3}, "best_of"),
    ({"prompt": "a", "bogus": 1}, "bogus"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": [1, -2]}, "prompt"),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": "a", "model": 3}, "model"),
])
def test_a_bad_completion_field_is_named(body: dict, param: str) -> None:
    with pytest.raises(APIError) as info:
        parse_completion(body)
    assert info.value.status == 400 and info.value.param == param, info.value.message
    assert info.value.body()["error"]["message"] and info.value.body()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0]"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages[0].tool_calls"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -1}, "max_completion_tokens"),
])
def test_a_bad_chat_field_is_named(body: dict, param: str) -> None:
    with pytest.raises(APIError) as info:
        parse_chat(body)
    assert info.value.status == 400 and info.value.param == param, info.value.message


def test_requests_parse_with_openai_defaults() -> None:
    request = parse_completion({"prompt": [[5, 6]], "model": "m", "stop": "x", "top_k": -1, "user": "u",
                                "temperature": None})
    assert request.prompt == [5, 6] and request.model == "m" and not request.stream
    assert request.sampling.max_tokens == 16 and request.sampling.stop == ("x",) and request.sampling.top_k == 0
    assert request.sampling.temperature is None  # null is "not given": the model's default applies
    chat = parse_chat({"messages": [{"role": "system", "content": "s"},
                                    {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                 {"type": "text", "text": "b"}]}],
                       "max_tokens": 4, "max_completion_tokens": 7, "stream": True,
                       "stream_options": {"include_usage": True}})
    assert chat.messages == [{"role": "system", "content": "s"}, {"role": "user", "content": "ab"}]
    assert chat.sampling.max_tokens == 7 and chat.include_usage and chat.stream
    assert parse_chat({"messages": [{"role": "user", "content": "x"}]}).sampling.max_tokens is None
