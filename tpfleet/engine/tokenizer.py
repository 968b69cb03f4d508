"""A checkpoint's tokenizer without transformers: tokenizer.json through the `tokenizers` library, and
the chat template rendered in a sandboxed Jinja environment configured as transformers configures its
own (blocks trimmed, `loopcontrols`, `tojson` without HTML escaping, `raise_exception`,
`strftime_now`, `{% generation %}` blocks rendered as plain text).

Importing transformers costs a serving process a second or more of its start-up (docs/benchmarks.md),
while an engine needs only encode, decode and the chat template. A checkpoint without tokenizer.json
(a slow tokenizer) is loaded by transformers instead.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

from tokenizers import Tokenizer as Backend

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class Encoding(NamedTuple):
    input_ids: list[int]


def load_tokenizer(model_dir: str | Path):
    """The lean tokenizer where the checkpoint has tokenizer.json, else transformers' AutoTokenizer."""
    if (Path(model_dir) / "tokenizer.json").is_file():
        return Tokenizer(model_dir)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


class ChatTemplateError(ValueError):
    """The chat template refused the messages (e.g. Qwen3's "No user query found in messages.")."""


class Tokenizer:
    """The part of transformers' fast tokenizer an engine uses: `tokenizer(text).input_ids` (special
    tokens added as tokenizer.json's post-processor says), `decode`, `apply_chat_template`, and
    `backend_tokenizer` for streaming detokenization."""

    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        self.backend_tokenizer = Backend.from_file(str(model_dir / "tokenizer.json"))
        config_path = model_dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self.special_tokens = {name: text for name in SPECIAL_TOKENS if (text := _token_text(config.get(name)))}
        self.chat_template = _chat_template(model_dir, config)

    def __call__(self, text: str) -> Encoding:
        return Encoding(self._encode(text, add_special_tokens=True))

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        """`encode_batch` of one text: unlike `encode`, it lets go of the interpreter lock while it works, so
        a long prompt tokenized on a worker thread does not stall the event loop and the engine thread."""
        return self.backend_tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """The text of `ids`, with no clean-up of spaces: transformers skips it for byte-level BPE
        tokenizers (Qwen3's), whatever tokenizer_config.json says."""
        return self.backend_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], /, tokenize: bool = False, add_generation_prompt: bool = False,
                            tools: list[dict] | None = None, documents: list[dict] | None = None,
                            continue_final_message: bool = False, **kwargs) -> str | list[int]:
        """The conversation as the model's template writes it (token ids with `tokenize`); extra keyword
        arguments reach the template, as transformers passes them (e.g. enable_thinking). With
        `continue_final_message` the text ends where the last message's content does, as transformers cuts
        it, so that the model goes on writing that message."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        if continue_final_message and add_generation_prompt:
            raise ChatTemplateError("continue_final_message and add_generation_prompt exclude each other")
        import jinja2.sandbox

        if continue_final_message:
            messages = _tag_final_message(messages)
        context = {**self.special_tokens, **kwargs, "messages": messages, "tools": tools, "documents": documents,
                   "add_generation_prompt": add_generation_prompt}
        try:
            text = self._template.render(context)  # a mapping: a variable of any name, "self" too, is just one
        except (jinja2.TemplateSyntaxError, jinja2.sandbox.SecurityError):
            raise  # the checkpoint's template is at fault, not the messages
        except (jinja2.TemplateError, TypeError) as error:  # its own raise_exception, or messages or variables
            raise ChatTemplateError(str(error)) from None  # it cannot render (a variable shadowing a function)
        if continue_final_message:
            text = _cut_at_tag(text)
        return self._encode(text, add_special_tokens=False) if tokenize else text

    @cached_property
    def _template(self):
        return _environment().from_string(self.chat_template)


CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # transformers' own, so that both cut a conversation alike


def _tag_final_message(messages: list[dict]) -> list[dict]:
    """The conversation with a tag after its last message's content: the text is cut where the tag lands."""
    final = messages[-1].get("content") if messages else None
    if not isinstance(final, str):
        raise ChatTemplateError("continue_final_message needs a last message with text content")
    return [*messages[:-1], {**messages[-1], "content": final + CONTINUE_TAG}]


def _cut_at_tag(text: str) -> str:
    """The rendered conversation up to the end of its last message's content, as transformers cuts it: at the
    tag, or before the spaces the template trimmed from the content's end with the tag's."""
    if CONTINUE_TAG.strip() not in text:
        raise ChatTemplateError("continue_final_message: the template does not write out the last message's content")
    at = text.rindex(CONTINUE_TAG.strip())
    return text[:at] if text[at:at + len(CONTINUE_TAG)] == CONTINUE_TAG else text[:at].rstrip()


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json gives it: a string, or an added-token object."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(model_dir: Path, config: dict) -> str | None:
    """chat_template.jinja beside the tokenizer wins (where transformers now writes it); else the config's
    template, or the one named "default" among several."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        return named.get("default")
    return template if isinstance(template, str) else None


def _environment():
    """Imported on first use: only a chat request renders a template."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` marks what the assistant wrote (for training masks):
        rendered as its body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        @staticmethod
        def _body(caller) -> str:
            return caller()

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env
