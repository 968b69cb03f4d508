"""The `openai` Python client against the server's /v1 routes."""

from __future__ import annotations

import openai
import pytest


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def test_models_lists_the_served_model(client):
    [m] = client.models.list().data
    assert m.id.endswith("tiny0") or "tiny" in m.id


def test_completion_from_text_and_tokens(client, server):
    import httpx

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
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], n=3)
    assert "n" in e.value.body["param"]
