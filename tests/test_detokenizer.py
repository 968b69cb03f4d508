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
