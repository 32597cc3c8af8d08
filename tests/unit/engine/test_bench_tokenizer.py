"""The benchmark's tokenizer (engine/benchmark.py): every id of the model's vocabulary decodes to text, so the host
profile's detokenization does the per-token work a real tokenizer's would; encoding and the special tokens' ids are
those of the trained byte-level BPE."""

from deepfleet.engine.benchmark import BENCH_TRAINED_TOKENS, SHAPES, bench_tokenizer
from deepfleet.models.tiny import SPECIAL_TOKENS, THINK_TOKENS, build_tokenizer


def test_every_model_id_decodes_to_text_and_encoding_is_the_trained_one():
    vocab = SHAPES["1.5b"]["vocab_size"]
    tok, trained = bench_tokenizer(vocab), build_tokenizer(BENCH_TRAINED_TOKENS)
    assert tok.get_vocab_size(with_added_tokens=True) == vocab
    assert all(tok.decode([i], skip_special_tokens=False) for i in range(0, vocab, 97))
    assert tok.decode([BENCH_TRAINED_TOKENS, vocab - 1]) == f" w{BENCH_TRAINED_TOKENS} w{vocab - 1}"
    text = "The quick brown fox <think> hmm </think> café 🙂"
    assert tok.encode(text).ids == trained.encode(text).ids
    for token in SPECIAL_TOKENS + THINK_TOKENS:
        assert tok.token_to_id(token) == trained.token_to_id(token)
