from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from tpfleet.engine.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tok(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def feed(d, ids):
    pieces = []
    for t in ids:
        d.add(t)
        pieces.append(d.take(final=False))
    pieces.append(d.take(final=True))
    return pieces


def test_incremental_text_equals_full_decode(tok):
    text = "Grey waves fold on the shore — the gulls call once; naïve café, 数据 🙂 done."
    ids = tok(text).input_ids
    d = IncrementalDetokenizer(tok, [])
    pieces = feed(d, ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)  # multi-byte characters never come out half-made


def test_stop_string_is_cut_and_never_shown(tok):
    ids = tok("the tide goes out again and again").input_ids
    d = IncrementalDetokenizer(tok, ["out ag"])
    shown = ""
    for t in ids:
        d.add(t)
        shown += d.take(final=d.matched_stop is not None)
        if d.matched_stop:
            break
    assert d.matched_stop == "out ag"
    assert shown == "the tide goes "


def test_a_stop_string_held_back_by_another_is_never_shown(tok):
    """Two stop strings: the hold-back for the longer one is counted from the text's end, not from where the
    shorter one's hold-back already stopped, so its start never leaks out before it completes."""
    ids = [tok.convert_tokens_to_ids(t) for t in ("x", "Ġa", "Ġb", "Y")]
    assert tok.decode(ids) == "x a bY"
    d = IncrementalDetokenizer(tok, [" bX", " a bY"])
    shown = ""
    for t in ids:
        d.add(t)
        shown += d.take(final=d.matched_stop is not None)
    assert d.matched_stop == " a bY" and shown == d.text == "x"


def test_the_bytes_of_an_unfinished_character_come_out_when_the_request_ends(tok):
    """The last tokens hold part of a character: at the end they are decoded as they are (U+FFFD), so the
    text is the decode of the output ids, as SGLang returns it."""
    ids = tok("the tide").input_ids + tok("🙂").input_ids[:1]
    assert tok.decode(ids).endswith("\ufffd")
    d = IncrementalDetokenizer(tok, [])
    assert "".join(feed(d, ids)) == tok.decode(ids)
