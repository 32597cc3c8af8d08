"""Incremental detokenization and stop strings against a real byte-level BPE tokenizer trained here."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from deepfleet.engine.detokenizer import IncrementalDetokenizer, StopChecker, decode_outputs
from deepfleet.models.tokenizer import Tokenizer

CORPUS = [
    "日本語のテキスト café naïve 🙂 emoji 🙂🙂 and plain English words.",
    "The quick brown fox jumps over the lazy dog. END of story.",
    "Привет мир, 你好世界, مرحبا بالعالم, 🚀 rockets 🚀!",
]
EOS = "<|eos|>"
ALPHABET = "ab éç日本語🙂🚀\nEND"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    hf.train_from_iterator(CORPUS * 5, trainer)
    model_dir = tmp_path_factory.mktemp("tok")
    hf.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(f'{{"eos_token": "{EOS}"}}')
    return Tokenizer(model_dir)


def stream(tokenizer, prompt, output, skip_special_tokens=True):
    detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip_special_tokens)
    deltas = [detok.append(t) for t in output]
    return detok, deltas


def test_multibyte_character_split_over_byte_tokens_waits_until_complete(tokenizer):
    # "🙂" as four single-byte tokens: nothing until the fourth byte
    byte_chars = _bytes_to_unicode()
    ids = [tokenizer.token_to_id(byte_chars[b]) for b in "🙂".encode()]
    detok, deltas = stream(tokenizer, tokenizer.encode("hi "), ids)
    assert deltas == ["", "", "", "🙂"]
    assert detok.text == "🙂"


@settings(max_examples=60, deadline=None)
@given(prompt=st.text(ALPHABET, max_size=20), text=st.text(ALPHABET, max_size=40))
def test_streamed_text_equals_full_decode_for_real_text(tokenizer, prompt, text):
    prompt_ids, output_ids = tokenizer.encode(prompt), tokenizer.encode(text)
    detok, deltas = stream(tokenizer, prompt_ids, output_ids)
    assert "".join(deltas) == detok.text == tokenizer.decode(output_ids) == text
    assert not any("\ufffd" in d for d in deltas)
    assert detok.flush() == ""


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), length=st.integers(0, 30), prompt=st.text(ALPHABET, max_size=10))
def test_random_token_sequences_match_full_decode(tokenizer, seed, length, prompt):
    # random ids make broken UTF-8, special tokens and ids past the vocabulary (a model's padding rows); after
    # flush the text still equals one full decode
    rng = random.Random(seed)
    output_ids = [rng.randrange(tokenizer.vocab_size + 40) for _ in range(length)]
    for skip in (True, False):
        detok, deltas = stream(tokenizer, tokenizer.encode(prompt), output_ids, skip_special_tokens=skip)
        tail = detok.flush()
        assert "".join(deltas) + tail == detok.text == tokenizer.decode(output_ids, skip_special_tokens=skip)


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), length=st.integers(0, 30), prompt=st.text(ALPHABET, max_size=10))
def test_decoding_a_whole_output_at_once_gives_the_streamed_text(tokenizer, seed, length, prompt):
    # the engine's path for a request whose text nobody reads before it ends: random ids (broken UTF-8, special
    # tokens, ids past the vocabulary) after a text prompt
    rng = random.Random(seed)
    outputs = [[rng.randrange(tokenizer.vocab_size + 40) for _ in range(length)], tokenizer.encode(prompt)]
    streamed, fresh = [], []
    for skip, output_ids in zip((True, False, False), (*outputs, outputs[0]), strict=True):
        detok, deltas = stream(tokenizer, tokenizer.encode(prompt), output_ids, skip_special_tokens=skip)
        streamed.append("".join(deltas) + detok.flush())
        fresh.append(IncrementalDetokenizer(tokenizer, tokenizer.encode(prompt), skip))
    assert decode_outputs(fresh, [*outputs, outputs[0]]) == streamed


def test_streaming_never_calls_a_full_decode(tokenizer):
    # the per-token path is DecodeStream's (constant work per token); Python-side decode runs only in flush
    calls = []

    class Spy:
        backend = tokenizer.backend

        def decode(self, ids, skip_special_tokens=True):
            calls.append(len(ids))
            return tokenizer.decode(ids, skip_special_tokens)

    ids = tokenizer.encode(" ".join(CORPUS * 3))
    detok = IncrementalDetokenizer(Spy(), ids[:10])
    for t in ids[10:]:
        detok.append(t)
    assert calls == []
    assert detok.text == tokenizer.decode(ids[10:])


def test_ids_past_the_vocabulary_never_reach_the_stream(tokenizer, monkeypatch):
    # the stream re-decodes what it holds back at every step: a run of ids that decode to nothing would make each
    # step slower than the last
    from deepfleet.engine import detokenizer

    stepped, real = [], detokenizer.DecodeStream

    class CountingStream:
        def __init__(self, **kwargs):
            self._stream = real(**kwargs)

        def step(self, backend, token_id):
            stepped.append(token_id)
            return self._stream.step(backend, token_id)

    monkeypatch.setattr(detokenizer, "DecodeStream", CountingStream)
    words = tokenizer.encode(" fox jumps")
    ids = words[:1] + [tokenizer.vocab_size + i for i in range(500)] + words[1:]
    detok, deltas = stream(tokenizer, tokenizer.encode("The quick"), ids)
    assert stepped == words
    assert "".join(deltas) + detok.flush() == tokenizer.decode(ids) == " fox jumps"


def test_flush_decodes_a_held_back_incomplete_character_like_a_full_decode(tokenizer):
    byte_chars = _bytes_to_unicode()
    ids = tokenizer.encode("ok ") + [tokenizer.token_to_id(byte_chars[b]) for b in "🙂".encode()[:3]]
    detok, deltas = stream(tokenizer, [], ids)
    assert "".join(deltas) == "ok "
    assert "".join(deltas) + detok.flush() == tokenizer.decode(ids) == "ok \ufffd"


def feed_all(checker, deltas, finish=True):
    """Feed deltas one step at a time as the engine does; return (stopped, emitted text)."""
    emitted = ""
    for i, delta in enumerate(deltas):
        stopped, safe = checker.feed(delta, finished=finish and i == len(deltas) - 1)
        emitted += safe
        if stopped:
            return True, emitted
    return False, emitted


def test_stop_string_spanning_tokens_is_cut(tokenizer):
    text = "The quick brown fox jumps over the lazy dog. END of story."
    ids = tokenizer.encode(text)
    assert "lazy dog" not in [tokenizer.decode([t]) for t in ids]  # the stop string spans tokens
    detok, checker = IncrementalDetokenizer(tokenizer, []), StopChecker(["lazy dog"])
    emitted = ""
    for t in ids:
        stopped, safe = checker.feed(detok.append(t))
        emitted += safe
        assert "lazy" not in emitted
        if stopped:
            break
    assert stopped and emitted == "The quick brown fox jumps over the "
    assert checker.matched == "lazy dog"


def test_stop_string_spanning_many_one_character_steps():
    assert feed_all(StopChecker(["</answer>"]), list("ok </ans") + ["wer> tail"]) == (True, "ok ")
    assert feed_all(StopChecker(["</answer>"]), list("ok </ans") + ["x"]) == (False, "ok </ansx")


def test_stop_checker_holds_back_only_possible_stop_prefixes():
    checker = StopChecker(["</answer>", "\n\n"])
    assert checker.feed("result </ans") == (False, "result ")
    assert checker.feed(" x") == (False, "</ans x")
    assert checker.feed("\n") == (False, "")
    assert checker.matched is None
    assert checker.feed("\nmore") == (True, "")
    assert checker.matched == "\n\n"


def test_stop_checker_releases_the_tail_when_finished_and_passes_through_without_stops():
    assert StopChecker(["STOP"]).feed("ends with ST", finished=True) == (False, "ends with ST")
    checker = StopChecker(["STOP"])
    assert checker.feed("ends with ST") == (False, "ends with ")
    assert checker.feed("", finished=True) == (False, "ST")
    assert StopChecker(None).feed("anything") == (False, "anything")


@settings(max_examples=200, deadline=None)
@given(
    text=st.text("abc", max_size=40),
    stops=st.lists(st.text("abc", min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(1, 5), max_size=40),
)
def test_streaming_never_emits_a_partial_stop_string(text, stops, cuts):
    ends = sorted({min(sum(cuts[:i]), len(text)) for i in range(1, len(cuts) + 1)} | {len(text)})
    # generation halts at the first chunk whose text contains a stop string; the output is cut before it
    first_hit = next((end for end in ends if any(s in text[:end] for s in stops)), None)
    if first_hit is None:
        expected = text
    else:
        expected = text[: min(i for i in (text[:first_hit].find(s) for s in stops) if i >= 0)]
    checker, emitted, start = StopChecker(stops), "", 0
    for end in ends:
        stopped, safe = checker.feed(text[start:end], finished=end == len(text))
        start = end
        emitted += safe
        assert expected.startswith(emitted)
        assert stopped or end - len(emitted) <= max(map(len, stops)) - 1
        if stopped:
            break
    assert emitted == expected and stopped == (first_hit is not None)
    assert checker.matched is None if not stopped else text[len(emitted) :].startswith(checker.matched)


def _bytes_to_unicode():
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are written in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs, strict=True))]
