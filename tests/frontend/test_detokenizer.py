"""IncrementalDetokenizer with the tiny model's byte-level tokenizer, where one token is one UTF-8 byte, so most
single tokens of non-ASCII text are partial characters."""

from __future__ import annotations

import random

from diptych.services.frontend.detokenizer import IncrementalDetokenizer
from tests.frontend.conftest import text_ids

MIXED = "Hé, 世界! 👋🏽 naïve café — ok"


def feed(detok: IncrementalDetokenizer, ids: list[int], chunk: int = 1) -> list[str]:
    return [detok.push(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]


def test_ascii_streams_token_by_token(tokenizer):
    deltas = feed(IncrementalDetokenizer(tokenizer), text_ids(tokenizer, "hello world"))
    assert deltas == list("hello world")


def test_multibyte_characters_are_never_split(tokenizer):
    deltas = feed(IncrementalDetokenizer(tokenizer), text_ids(tokenizer, MIXED))
    assert "".join(deltas) == MIXED
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas  # bytes of an incomplete character were held back
    for delta in deltas:
        delta.encode("utf-8")  # every delta is whole characters


def test_random_chunking_round_trips(tokenizer):
    rng = random.Random(7)
    alphabet = "ab \n€漢字🙂é\u00e9\u0301"
    for _ in range(50):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
        ids = text_ids(tokenizer, text)
        detok, out, i = IncrementalDetokenizer(tokenizer), [], 0
        while i < len(ids):
            n = rng.randint(1, 5)
            out.append(detok.push(ids[i:i + n]))
            i += n
        out.append(detok.flush())
        assert "".join(out) == text
        assert all("\ufffd" not in d for d in out)


def test_special_tokens_are_skipped(tokenizer):
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    detok = IncrementalDetokenizer(tokenizer)
    out = feed(detok, [bos, *text_ids(tokenizer, "hi"), eos])
    assert "".join(out) + detok.flush() == "hi"


def test_stop_string_cuts_before_it(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, stop=["STOP"])
    out = feed(detok, text_ids(tokenizer, "abc STOP def"))
    assert "".join(out) == "abc "
    assert detok.stopped
    assert detok.push(text_ids(tokenizer, "more")) == "" and detok.flush() == ""


def test_partial_stop_string_is_held_then_released(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, stop=["STOP"])
    assert "".join(feed(detok, text_ids(tokenizer, "xSTO"))) == "x"
    assert detok.push(text_ids(tokenizer, "P")) == ""  # completes the stop string
    assert detok.stopped

    detok = IncrementalDetokenizer(tokenizer, stop=["STOP"])
    assert "".join(feed(detok, text_ids(tokenizer, "xSTO"))) == "x"
    assert detok.push(text_ids(tokenizer, "x")) == "STOx"  # not a stop after all
    assert not detok.stopped


def test_held_partial_stop_is_flushed_at_the_end(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, stop=["STOP"])
    assert "".join(feed(detok, text_ids(tokenizer, "abcST"))) == "abc"
    assert detok.flush() == "ST"
    assert not detok.stopped


def test_earliest_of_several_stop_strings_wins(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, stop=["world", "lo w", "zzz"])
    out = detok.push(text_ids(tokenizer, "hello world"))  # one push with every token
    assert out == "hel" and detok.stopped


def test_multibyte_stop_string(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, stop=["世界"])
    assert "".join(feed(detok, text_ids(tokenizer, "Hi 世界 bye"))) == "Hi "
    assert detok.stopped


def test_incomplete_character_at_the_end_is_flushed_as_replacement(tokenizer):
    detok = IncrementalDetokenizer(tokenizer)
    ids = text_ids(tokenizer, "a🙂")
    assert "".join(feed(detok, ids[:-1])) == "a"
    assert detok.flush() == "\ufffd"


def test_empty_stop_strings_are_ignored(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, stop=[""])
    assert "".join(feed(detok, text_ids(tokenizer, "abc"))) == "abc"
