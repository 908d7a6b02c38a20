"""Bits per byte: a loss that stays comparable across tokenizers.

    bpb = (sum of the targets' negative log-likelihoods in nats) / (ln 2 x UTF-8 bytes of those targets)

Targets that are IGNORE_INDEX (any negative id: prompt tokens of answer-masked data, padding) count
neither nats nor bytes, so bpb over answer-masked data is over the answer tokens' bytes only.

Bytes are counted from the target ids alone with the tokenizer's ``token_byte_lengths()`` table (for
byte-level BPE each token is an exact byte string, so this equals the UTF-8 length of the decoded
targets). Special tokens (``<|endoftext|>``) are 0 bytes long. By default their loss is left out of the
sum as well (``include_zero_byte_targets=False``, nanochat's convention): bpb then measures the text
only, and a tokenizer that marks document ends differently cannot change it.

The functions work on numpy arrays and on torch tensors alike (pass ``byte_lengths`` as a tensor on
the same device as ``targets`` to keep the sums on the accelerator)::

    lengths = torch.as_tensor(tokenizer.token_byte_lengths(), device=device)   # once
    nats, nbytes = bpb_sums(per_token_nll, labels, lengths)                    # per batch, on device
    total_nats += nats; total_bytes += nbytes                                  # sum over batches/ranks
    bpb = bits_per_byte(float(total_nats), int(total_bytes))
"""

import math


def bits_per_byte(total_nll_nats: float, total_bytes: int) -> float:
    """``total_nll_nats / (ln 2 * total_bytes)``; NaN when no bytes were evaluated."""
    if total_bytes <= 0:
        return float("nan")
    return float(total_nll_nats) / (math.log(2) * float(total_bytes))


def target_bytes(targets, byte_lengths):
    """Total UTF-8 bytes of the target ids (``byte_lengths[targets].sum()``, same array type)."""
    return byte_lengths[targets].sum()


def bpb_sums(token_nll, targets, byte_lengths, include_zero_byte_targets: bool = False):
    """``(nats, bytes)`` to accumulate for bits per byte over one batch.

    Args:
        token_nll: per-target negative log-likelihood in nats (unreduced cross-entropy), any shape.
        targets: target ids, same shape as ``token_nll``; negative ids (IGNORE_INDEX) are left out.
        byte_lengths: the tokenizer's ``token_byte_lengths()`` (numpy array or torch tensor).
        include_zero_byte_targets: also count the loss of 0-byte targets (special tokens).
    """
    counted = targets >= 0
    lengths = byte_lengths[targets.clip(min=0)] * counted
    if include_zero_byte_targets:
        nats = (token_nll * counted).sum()
    else:
        nats = (token_nll * (lengths > 0)).sum()
    return nats, lengths.sum()
