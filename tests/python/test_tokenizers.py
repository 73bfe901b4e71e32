"""Both tokenizers: round trips of arbitrary UTF-8 and the same special ids."""
import pytest

from vlmkit import data

SAMPLES = ["a red circle above a blue square", "héllo wörld ✓ 日本語 🙂", "<image>What colour is it?", "",
           "tabs\tand\nnewlines", "x" * 300]


def test_byte_tokenizer_round_trips_utf8_and_specials():
    tok = data.ByteTokenizer()
    for s in SAMPLES:
        ids = tok.encode(s, True, True)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert tok.decode(ids[1:-1], False) == s
    assert tok.encode("<image>", False, False) == [tok.image_id]


def test_sentencepiece_trains_saves_loads_and_round_trips(tmp_path):
    corpus = tmp_path / "corpus.txt"
    lines = [f"a {c} {s} is {p} the {c2} {s2}" for c in ("red", "green", "blue") for s in ("circle", "square")
             for p in ("left of", "above") for c2 in ("yellow", "purple") for s2 in ("cross", "triangle")]
    corpus.write_text("\n".join(lines * 3) + "\nhéllo wörld ✓ 日本語\n")
    data.SentencePieceTokenizer.train(str(corpus), str(tmp_path / "sp"), 400)  # 256 byte pieces + merges
    tok = data.SentencePieceTokenizer(str(tmp_path / "sp.model"))
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.image_id) == (0, 1, 2, 3)
    for s in SAMPLES:
        ids = tok.encode(s, True, True)
        assert ids[0] == 1 and ids[-1] == 2
        assert tok.decode(ids) == s
    ids = tok.encode("<image>What colour?", False, False)
    assert ids[0] == tok.image_id
    assert len(tok.encode("a red circle")) < len("a red circle")  # merges learned
    tok.save(str(tmp_path / "copy.model"))
    again = data.SentencePieceTokenizer(str(tmp_path / "copy.model"))
    assert again.encode(SAMPLES[1]) == tok.encode(SAMPLES[1])
    assert "".join(tok.token_text(i) for i in tok.encode("a red circle", False, False)) == "a red circle"
    with pytest.raises(FileNotFoundError):
        data.SentencePieceTokenizer(str(tmp_path / "none.model"))
    with pytest.raises(IndexError):
        tok.decode([10**6])
