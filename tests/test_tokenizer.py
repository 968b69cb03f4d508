"""The engine's own tokenizer (tokenizer.json through `tokenizers`, chat templates in a Jinja sandbox)
gives what transformers' AutoTokenizer gives on the same checkpoint: token ids, decoded text and
rendered chat templates, including templates that use every feature transformers' environment adds."""

from __future__ import annotations

import json
import shutil

import jinja2
import pytest
from transformers import AutoTokenizer

from tpfleet.engine.tokenizer import ChatTemplateError, Tokenizer, load_tokenizer

TEXTS = ["Hello, world!", "  leading spaces and trailing  ", "<|im_start|>user\nhi<|im_end|>", "naïve café — 東京",
         "tabs\tand\nnewlines\r\n", "", "x" * 300, "Don't stop: it's 5 o'clock , right ?"]

# Written for this test: a Qwen3-like template using namespace, loop controls, tojson, raise_exception,
# strftime_now, string methods, generation blocks, tools and an extra keyword (enable_thinking).
TEMPLATE = """{%- set ns = namespace(system=none, turns=0) %}
{%- if messages[0].role == 'system' %}{% set ns.system = messages[0].content %}{% endif %}
{%- if tools %}
<|im_start|>system
{{ ns.system or 'You may call tools.' }}
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}<|im_end|>
{% elif ns.system %}<|im_start|>system
{{ ns.system }}<|im_end|>
{% endif %}
{%- for message in messages %}
  {%- if message.role == 'system' %}{% continue %}{% endif %}
  {%- if message.role not in ('user', 'assistant', 'tool') %}
{{- raise_exception('bad role ' + message.role) }}{% endif %}
  {%- set ns.turns = ns.turns + 1 %}
<|im_start|>{{ message.role }}{% if message.name is defined %} ({{ message.name }}){% endif %}

  {%- if message.role == 'assistant' %}
{% generation %}{{ message.content.strip() }}{% endgeneration %}<|im_end|>
  {%- else %}
{{ message.content }}<|im_end|>
  {%- endif %}
  {%- if loop.last and ns.turns > 20 %}{% break %}{% endif %}
{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and not enable_thinking %}<think>

</think>

{% endif %}{% endif %}
{{- '' if strftime_now('%Y') | length == 4 else raise_exception('no date') }}{{ eos_token if false }}"""

CHATS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "  4  "}, {"role": "user", "content": "and 3+3?", "name": "bob"}],
    [{"role": "user", "content": "naïve \"quotes\" <tags> & ünïcode 東京"}],
]
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add <a> & b", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}]


@pytest.fixture(scope="module")
def checkpoint(tiny_model, tmp_path_factory):
    """The tiny checkpoint's tokenizer files, with this test's chat template, and a clean-up of spaces asked
    for that transformers does not do for a byte-level BPE tokenizer (nor does tpfleet)."""
    out = tmp_path_factory.mktemp("tok")
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copy(tiny_model / name, out / name)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config.update(chat_template=TEMPLATE, clean_up_tokenization_spaces=True)
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def test_encode_and_decode_match_transformers(tiny_model, checkpoint):
    for directory in (tiny_model, checkpoint):
        ours, theirs = Tokenizer(directory), AutoTokenizer.from_pretrained(directory)
        for text in TEXTS:
            ids = ours(text).input_ids
            assert ids == theirs(text).input_ids, text
            for skip in (False, True):
                assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
        assert ours.decode([7]) == theirs.decode([7])
        assert ours.backend_tokenizer.get_vocab_size() == theirs.backend_tokenizer.get_vocab_size()


def test_chat_templates_render_as_transformers_renders_them(tiny_model, checkpoint):
    for directory in (tiny_model, checkpoint):
        ours, theirs = Tokenizer(directory), AutoTokenizer.from_pretrained(directory)
        for chat in CHATS:
            for extra in ({}, {"add_generation_prompt": True}, {"tools": TOOLS},
                          {"add_generation_prompt": True, "enable_thinking": False}):
                if "tools" in extra and directory == tiny_model:
                    continue  # the tiny checkpoint's template has no tools
                want = theirs.apply_chat_template(chat, tokenize=False, **extra)
                assert ours.apply_chat_template(chat, tokenize=False, **extra) == want, (chat, extra)
                tokens = theirs(want, add_special_tokens=False).input_ids  # how transformers tokenizes a chat
                assert ours.apply_chat_template(chat, tokenize=True, **extra) == tokens


def test_template_errors_and_the_sandbox(checkpoint, tmp_path):
    ours = Tokenizer(checkpoint)
    with pytest.raises(ChatTemplateError, match="bad role robot"):  # the messages' fault: a 400 for a server
        ours.apply_chat_template([{"role": "robot", "content": "x"}])
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(checkpoint / name, tmp_path / name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ messages.__class__.__mro__ }}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(jinja2.exceptions.SecurityError):
        Tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])
    (tmp_path / "chat_template.jinja").write_text("{{ messages | length }} messages")
    assert Tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "x"}]) == "1 messages"
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "chat_template.jinja").unlink()
    assert Tokenizer(tmp_path).chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])


def test_a_checkpoint_without_tokenizer_json_falls_back_to_transformers(tiny_model, tmp_path):
    """The same BPE as vocab.json and merges.txt only (a Qwen2Tokenizer's files): transformers loads it,
    and it encodes as the lean tokenizer does from tokenizer.json."""
    assert isinstance(load_tokenizer(tiny_model), Tokenizer)
    spec = json.loads((tiny_model / "tokenizer.json").read_text())
    (tmp_path / "vocab.json").write_text(json.dumps(spec["model"]["vocab"]))
    merges = ["#version: 0.2"] + [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    (tmp_path / "merges.txt").write_text("\n".join(merges) + "\n")
    config = json.loads((tiny_model / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "Qwen2Tokenizer"
    keys = ("content", "lstrip", "rstrip", "normalized", "single_word", "special")
    config["added_tokens_decoder"] = {str(t["id"]): {key: t[key] for key in keys} for t in spec["added_tokens"]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    fallback = load_tokenizer(tmp_path)
    assert not isinstance(fallback, Tokenizer)
    lean = Tokenizer(tiny_model)
    for text in TEXTS[:4]:
        assert fallback(text).input_ids == lean(text).input_ids, text


def test_continue_final_message_cuts_as_transformers_does(tiny_model):
    ours, theirs = load_tokenizer(tiny_model), AutoTokenizer.from_pretrained(str(tiny_model))
    for final in ("The answer is ", "The answer is", ""):
        messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": final}]
        assert ours.apply_chat_template(messages, continue_final_message=True) == theirs.apply_chat_template(
            messages, tokenize=False, continue_final_message=True)


def test_a_template_variable_of_any_name_renders_or_is_refused(tiny_model):
    tok = load_tokenizer(tiny_model)
    messages = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(messages, self=1) == tok.apply_chat_template(messages)
    shadowed = load_tokenizer(tiny_model)
    shadowed.chat_template = "{{ range(3) | list }}{{ messages[0].content }}"
    with pytest.raises(ChatTemplateError):
        shadowed.apply_chat_template(messages, range=1)
