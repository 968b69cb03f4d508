"""The `openai` Python client against the server's /v1 routes."""

from __future__ import annotations

import httpx
import openai
import pytest


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def test_models_lists_the_served_model(client):
    [m] = client.models.list().data
    assert m.id.endswith("tiny0") or "tiny" in m.id


def test_completion_from_text_and_tokens(client, server):
    native = httpx.post(f"{server}/generate", json={"text": "The river flows",
                                                     "sampling_params": {"max_new_tokens": 8, "temperature": 0}}).json()
    c = client.completions.create(model="tiny", prompt="The river flows", max_tokens=8, temperature=0)
    assert c.choices[0].text == native["text"]
    assert c.choices[0].finish_reason == "length"
    assert c.usage.completion_tokens == 8 and c.usage.total_tokens == c.usage.prompt_tokens + 8
    t = client.completions.create(model="tiny", prompt=native["output_ids"][:3], max_tokens=2, temperature=0)
    assert t.usage.prompt_tokens == 3


def test_streaming_completion_concatenates_to_the_full_text(client):
    full = client.completions.create(model="tiny", prompt="Hello", max_tokens=12, temperature=0)
    parts = list(client.completions.create(model="tiny", prompt="Hello", max_tokens=12, temperature=0, stream=True,
                                           stream_options={"include_usage": True}))
    text = "".join(p.choices[0].text for p in parts if p.choices)
    assert text == full.choices[0].text
    assert parts[-1].usage.completion_tokens == 12


def test_chat_completion_uses_the_chat_template(client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Write a poem."}],
                                       max_tokens=10, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens == 10
    # ChatML framing of one user turn plus the assistant header: far more than the 4 content tokens.
    assert r.usage.prompt_tokens > 8
    parts = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Write a poem."}],
                                                max_tokens=10, temperature=0, stream=True))
    assert "".join(p.choices[0].delta.content or "" for p in parts) == r.choices[0].message.content


def test_bad_openai_request_is_a_400_naming_the_field(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", max_tokens=-2)
    assert "max_tokens" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:  # a standard field tpfleet lacks: said so, not "extra input"
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                       response_format={"type": "json_object"})
    assert e.value.body["param"] == "response_format"
    assert "does not support this OpenAI field" in e.value.body["message"]
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=1,
                                       response_format={"type": "text"})  # its default: accepted
    assert r.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as e:  # no scoring call in this API: the message offers none
        client.completions.create(model="tiny", prompt="x", max_tokens=0, logprobs=1)
    assert e.value.body["param"] == "max_tokens"
    assert e.value.body["message"] == "max_tokens: must be an integer >= 1, got 0"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], top_logprobs=2)
    assert e.value.body["param"] == "top_logprobs"
    with pytest.raises(openai.BadRequestError) as e:  # the engine's words, in the OpenAI request's names
        client.completions.create(model="tiny", prompt="x", max_tokens=2, extra_body={"min_tokens": 50})
    assert e.value.body["message"] == "min_tokens: 50 exceeds max_tokens (2)"


def test_chat_logprobs_in_openai_format(client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Count."}],
                                       max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens > 0
    # the tokens' own bytes spell the text (a byte the model left without its character shows as U+FFFD)
    assert b"".join(bytes(c.bytes) for c in content).decode("utf-8", "replace") == r.choices[0].message.content
    for c in content:
        whole = bytes(c.bytes).decode("utf-8", "replace")
        assert c.logprob <= 0
        assert c.token == whole if "\ufffd" not in whole else c.token.startswith("bytes:\\x")
        assert len(c.top_logprobs) == 3 and c.top_logprobs[0].logprob == pytest.approx(c.logprob, abs=1e-5)
    parts = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Count."}],
                                                max_tokens=6, temperature=0, logprobs=True, stream=True))
    streamed = [c for p in parts if p.choices and p.choices[0].logprobs for c in p.choices[0].logprobs.content]
    assert [(c.token, c.logprob) for c in streamed] == [(c.token, c.logprob) for c in content]


def test_completion_logprobs_in_openai_format(client, server):
    c = client.completions.create(model="tiny", prompt="The river flows", max_tokens=5, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    count = c.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == count > 0
    assert "".join(lp.tokens) == c.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(count)]
    held = {"stop": ["".join(lp.tokens[1:4]) + "\x00"], "max_tokens": 5, "temperature": 0, "logprobs": 0}
    whole = client.completions.create(model="tiny", prompt="The river flows", **held).choices[0].logprobs
    chunks = client.completions.create(model="tiny", prompt="The river flows", stream=True, **held)
    streamed = [o for chunk in chunks if chunk.choices and chunk.choices[0].logprobs
                for o in chunk.choices[0].logprobs.text_offset]
    assert streamed == whole.text_offset == lp.text_offset  # text held back for a stop string counts all the same
    assert all(len(top) <= 3 and max(top.values()) == pytest.approx(chosen, abs=1e-5)  # the top 2 and the sampled
               for top, chosen in zip(lp.top_logprobs, lp.token_logprobs))
    native = httpx.post(f"{server}/generate", json={"text": "The river flows", "return_logprob": True,
                                                     "sampling_params": {"max_new_tokens": 5, "temperature": 0}}).json()
    assert lp.token_logprobs == pytest.approx([e[0] for e in native["meta_info"]["output_token_logprobs"]], abs=1e-5)


def test_the_sampled_token_is_always_among_the_top_logprobs_and_ids_name_tokens_on_request(client):
    c = client.completions.create(model="tiny", prompt="The river flows", max_tokens=6, temperature=1.5, seed=3,
                                  logprobs=1)
    lp = c.choices[0].logprobs
    assert all(top[token] == chosen for top, token, chosen in zip(lp.top_logprobs, lp.tokens, lp.token_logprobs))
    none = client.completions.create(model="tiny", prompt="The river flows", max_tokens=6, temperature=1.5, seed=3,
                                     logprobs=0).choices[0].logprobs
    assert none.top_logprobs == [{t: v} for t, v in zip(lp.tokens, lp.token_logprobs)]
    ids = client.completions.create(model="tiny", prompt="The river flows", max_tokens=6, temperature=1.5, seed=3,
                                    logprobs=0, extra_body={"return_tokens_as_token_ids": True}).choices[0]
    assert all(t.startswith("token_id:") for t in ids.logprobs.tokens)
    native = client.completions.create(model="tiny", prompt="The river flows", max_tokens=6, temperature=1.5, seed=3)
    assert ids.text == native.choices[0].text
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Count."}], max_tokens=3,
                                       logprobs=True, extra_body={"return_tokens_as_token_ids": True})
    assert all(c.token.startswith("token_id:") and c.bytes for c in r.choices[0].logprobs.content)


def test_seeded_samples_of_n_differ_yet_repeat_and_usage_counts_each_prompt_once(client):
    def draw():
        return client.completions.create(model="tiny", prompt=["Hello there", "Goodbye"], max_tokens=8,
                                         temperature=1.5, n=2, seed=-7)
    first, again = draw(), draw()
    texts = [c.text for c in first.choices]
    assert texts == [c.text for c in again.choices]  # seeded: reproducible
    assert texts[0] != texts[1] and texts[2] != texts[3]  # sample j draws with seed + j
    single = [client.completions.create(model="tiny", prompt=p, max_tokens=1).usage.prompt_tokens
              for p in ("Hello there", "Goodbye")]
    assert first.usage.prompt_tokens == sum(single)
    chunks = list(client.completions.create(model="tiny", prompt="Hello there", max_tokens=2, n=3, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens == single[0] and chunks[-1].usage.completion_tokens == 6


def test_chat_takes_text_parts_agent_turns_and_template_arguments(client):
    def prompt_tokens(messages, **extra):
        return client.chat.completions.create(model="tiny", messages=messages, max_tokens=1,
                                              **({"extra_body": extra} if extra else {})).usage.prompt_tokens

    plain = prompt_tokens([{"role": "user", "content": "Hello\nworld"}])
    assert prompt_tokens([{"role": "user", "content": [{"type": "text", "text": "Hello"},
                                                       {"type": "text", "text": "world"}]}]) == plain
    assert prompt_tokens([{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]) == \
        prompt_tokens([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    agent = [{"role": "user", "content": "Add 2 and 3."},
             {"role": "assistant", "content": None, "tool_calls": [
                 {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 2, \"b\": 3}"}}]},
             {"role": "tool", "content": "5", "tool_call_id": "c1"}]
    assert prompt_tokens(agent) > plain
    thinking_off = prompt_tokens([{"role": "user", "content": "Hello\nworld"}],
                                 chat_template_kwargs={"enable_thinking": False})
    assert thinking_off > plain  # the template's empty thinking block
    assert prompt_tokens([{"role": "user", "content": "Hello\nworld"}], add_generation_prompt=False) < plain
    assert prompt_tokens([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Once upon"}],
                         continue_final_message=True) < \
        prompt_tokens([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Once upon"}])
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", max_tokens=1, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://127.0.0.1/x.png"}}]}])
    assert e.value.body["param"] == "messages[0].content" and "image_url" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", max_tokens=1, messages=[{"role": "user", "content": "x"}],
                                       extra_body={"chat_template_kwargs": {"tokenize": True}})
    assert e.value.body["param"] == "chat_template_kwargs"
    assert prompt_tokens([{"role": "user", "content": "Hello\nworld"}], chat_template_kwargs={"self": 1}) == plain


def test_bookkeeping_fields_are_accepted_and_a_typo_is_not(client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=1,
                                       metadata={"run": "7"}, store=False, service_tier="auto", user="me")
    assert r.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=1,
                                       extra_body={"max_tokenz": 3})
    assert e.value.body["param"] == "max_tokenz"


def test_a_model_is_retrieved_by_name(client):
    [listed] = client.models.list().data
    assert client.models.retrieve(listed.id).id == listed.id and listed.created > 0
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_include_stop_str_in_output_keeps_the_stop_string(client):
    free = client.completions.create(model="tiny", prompt="The river flows", max_tokens=8, temperature=0).choices[0]
    stop = free.text[2:5]
    cut = client.completions.create(model="tiny", prompt="The river flows", max_tokens=8, temperature=0, stop=[stop])
    kept = client.completions.create(model="tiny", prompt="The river flows", max_tokens=8, temperature=0, stop=[stop],
                                     extra_body={"include_stop_str_in_output": True})
    assert cut.choices[0].text == free.text[:free.text.index(stop)]
    assert kept.choices[0].text == free.text[:free.text.index(stop) + len(stop)]


def test_echo_gives_the_prompt_with_its_logprobs_as_loglikelihood_scoring_asks(client, server):
    prompt = "The river flows into the sea"
    c = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=1, temperature=0)
    [choice] = c.choices
    lp = choice.logprobs
    ids = httpx.post(f"{server}/generate", json={"text": prompt, "return_logprob": True, "logprob_start_len": 0,
                                                 "sampling_params": {"max_new_tokens": 0}}).json()
    expected = ids["meta_info"]["input_token_logprobs"]
    assert choice.text == prompt and c.usage.completion_tokens == 0
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx([e[0] for e in expected[1:]], abs=1e-5)
    assert "".join(lp.tokens) == prompt and lp.text_offset[0] == 0
    assert all(top[token] == value for top, token, value in zip(lp.top_logprobs[1:], lp.tokens[1:],
                                                                 lp.token_logprobs[1:]))
    both = client.completions.create(model="tiny", prompt=prompt, max_tokens=4, echo=True, logprobs=0, temperature=0)
    alone = client.completions.create(model="tiny", prompt=prompt, max_tokens=4, logprobs=0, temperature=0).choices[0]
    assert both.choices[0].text == prompt + alone.text
    assert both.choices[0].logprobs.token_logprobs == lp.token_logprobs + alone.logprobs.token_logprobs
    offsets = both.choices[0].logprobs.text_offset
    assert offsets[len(lp.tokens):] == [len(prompt) + o for o in alone.logprobs.text_offset]
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=4, echo=True, temperature=0,
                                            stream=True))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == both.choices[0].text
    with pytest.raises(openai.BadRequestError):  # no echo: a reply must have a token
        client.completions.create(model="tiny", prompt=prompt, max_tokens=0)


def test_n_choices(client):
    c = client.completions.create(model="tiny", prompt=["Hello", "Goodbye"], max_tokens=4, temperature=1.0, n=3)
    assert sorted(choice.index for choice in c.choices) == list(range(6))
    assert len(c.choices) == 6 and c.usage.completion_tokens <= 24
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                       n=2, temperature=0)
    assert [choice.index for choice in r.choices] == [0, 1]
    assert r.choices[0].message.content == r.choices[1].message.content  # greedy: both the same


def test_messages_the_chat_template_refuses_are_a_400(tiny_model, tmp_path):
    """Qwen3's template raises on a conversation with no user turn: the request's fault, so a 400 naming
    messages, and the server goes on serving."""
    import json
    import shutil

    from fastapi.testclient import TestClient

    from tpfleet.config import EngineConfig
    from tpfleet.engine.llm_engine import LLMEngine
    from tpfleet.server.app import create_app
    from tpfleet.server.async_engine import AsyncEngine

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{%- if not messages | selectattr('role', 'equalto', 'user') | list %}"
                               "{{ raise_exception('No user query found in messages.') }}{%- endif %}"
                               "{%- for m in messages %}{{ m.role }}: {{ m.content }}\n{%- endfor %}")
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    aengine = AsyncEngine(LLMEngine(EngineConfig(model=str(model), kv_cache_tokens=2048)))
    with TestClient(create_app(aengine, {"model": str(model), "tp_size": 1})) as client:
        refused = client.post("/v1/chat/completions", json={"messages": [{"role": "assistant", "content": "hi"}]})
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["param"] == "messages" and "No user query" in refused.json()["message"]
        ok = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                       "max_tokens": 3})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


def test_logprobs_of_tokens_that_split_a_character(server):
    """"é" is two byte tokens in the tiny model's vocabulary (0xC3, 0xA9): each shows its own byte, not the
    replacement character, and the character counts once in the text offsets."""
    bias = {"logit_bias": {"130": 100, "105": 100}, "seed": 2}
    chat = httpx.post(f"{server}/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "logprobs": True, **bias}).json()
    choice = chat["choices"][0]
    assert choice["message"]["content"] == "é"
    content = choice["logprobs"]["content"]
    assert [c["bytes"] for c in content] == [[0xC3], [0xA9]]
    assert [c["token"] for c in content] == ["bytes:\\xc3", "bytes:\\xa9"]
    completion = httpx.post(f"{server}/v1/completions", json={
        "prompt": "hi", "max_tokens": 2, "logprobs": 5, **bias}).json()["choices"][0]
    assert completion["text"] == "é" and completion["logprobs"]["text_offset"] == [0, 0]
    # every top logprob keeps its own key: byte tokens no longer collide on the replacement character
    wide = httpx.post(f"{server}/v1/completions", json={
        "prompt": "hi", "max_tokens": 6, "temperature": 0, "logprobs": 20}).json()["choices"][0]
    assert [len(top) for top in wide["logprobs"]["top_logprobs"]] == [20] * 6
