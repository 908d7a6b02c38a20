"""Bits per byte from token ids, checked against a hand computation over decoded text."""

import math

import numpy as np
import pytest
import torch

from loop_megatron.data import bits_per_byte, bpb_sums, build_tokenizer, target_bytes

from .conftest import MULTILINGUAL


def documents_stream(tok, texts):
    ids = []
    for t in texts:
        ids += tok.encode(t) + [tok.eod]
    return np.array(ids, dtype=np.int64)


@pytest.mark.parametrize("kind", ["hf", "gpt2"])
def test_bpb_matches_hand_computation(kind, tiny_tokenizer_dir):
    tok = build_tokenizer("HuggingFaceTokenizer", tiny_tokenizer_dir) if kind == "hf" else build_tokenizer()
    texts = MULTILINGUAL + ["Fellow-Citizens of the Senate and House of Representatives:"]
    stream = documents_stream(tok, texts)
    inputs, targets = stream[:-1], stream[1:]  # a window: the first document's first token is never a target
    rng = np.random.default_rng(0)
    nll = rng.uniform(0.1, 5.0, size=targets.shape)

    # By hand: the targets' text is the decoded stream minus the first token; EOD targets are not text.
    first = tok.decode(stream[:1])
    target_text = "".join(texts)[len(first):]
    hand_bytes = len(target_text.encode("utf-8"))
    hand_nats = sum(float(n) for n, t in zip(nll, targets) if t != tok.eod)
    hand_bpb = hand_nats / hand_bytes / math.log(2)

    lengths = tok.token_byte_lengths()
    assert int(target_bytes(targets, lengths)) == hand_bytes
    nats, nbytes = bpb_sums(nll, targets, lengths)
    assert int(nbytes) == hand_bytes and float(nats) == pytest.approx(hand_nats, rel=1e-12)
    assert bits_per_byte(float(nats), int(nbytes)) == pytest.approx(hand_bpb, rel=1e-12)
    # Keeping the EOD targets' loss adds exactly their nats.
    all_nats, _ = bpb_sums(nll, targets, lengths, include_zero_byte_targets=True)
    assert float(all_nats) == pytest.approx(float(nll.sum()), rel=1e-12)

    # The same on torch tensors, batched [B, T], summed per batch then added up.
    t_targets = torch.as_tensor(targets[: len(targets) // 2 * 2]).view(2, -1)
    t_nll = torch.as_tensor(nll[: len(targets) // 2 * 2]).view(2, -1)
    t_lengths = torch.as_tensor(lengths)
    parts = [bpb_sums(t_nll[i], t_targets[i], t_lengths) for i in range(2)]
    n_t, b_t = sum(p[0] for p in parts), sum(p[1] for p in parts)
    np_n, np_b = bpb_sums(t_nll.numpy(), t_targets.numpy(), lengths)
    assert int(b_t) == int(np_b) and float(n_t) == pytest.approx(float(np_n), rel=1e-12)


def test_bits_per_byte_units():
    # One byte predicted with probability 1/2 is one bit.
    assert bits_per_byte(math.log(2), 1) == pytest.approx(1.0)
    assert bits_per_byte(8 * math.log(256), 8) == pytest.approx(8.0)
    assert math.isnan(bits_per_byte(1.0, 0))
