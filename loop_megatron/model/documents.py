"""Packed documents inside one window: Megatron-LM's `--reset-position-ids`, `--reset-attention-mask` and
`--eod-mask-loss`.

A training window of `seq_length` tokens holds the end of one document, whole documents and the start of
another, separated by end-of-document tokens. By default (like Megatron-LM) the model sees the window as
one text: positions run 0..T-1 across the documents and every token attends to every earlier one. With
the options on, the documents are kept apart the way Megatron's `get_ltor_masks_and_position_ids` does:

* reset_position_ids: the token after each end-of-document token gets position 0 again, so a document's
  positions are the same wherever it was packed in the window;
* reset_attention_mask: a token attends only to earlier tokens of its own document (the end-of-document
  token ends the document it closes);
* eod_mask_loss: the targets predicted *from* an end-of-document token (the next document's first token,
  which nothing before it can predict) are left out of the loss.

Short documents need the first two: a prompt/answer record of 20 tokens packed at a random offset of a
64-token window otherwise has its answer at a different absolute position every time, and a small model with
learned positions learns even "copy the last prompt token" slowly (studies/reasoning/README.md, the
calibration). The mask goes through PyTorch's scaled_dot_product_attention (not flash-attn's causal kernel),
as Megatron's explicit attention mask does.

`DocumentMask` is what the model takes (as its `attention_mask`, model/gpt.py); `DocumentLayout` makes one
from a batch (model/inputs.py `prepare_inputs`), for training and evaluation alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class DocumentMask:
    """Where each document of a batch of packed windows starts, as the model needs it.

    position_ids: [B, T] long, each token's position within its document, or None (positions 0..T-1).
    document_ids: [B, T] long, which document of its window each token is in (0, 1, ...), or None
        (attention crosses documents).
    """

    position_ids: Optional[torch.Tensor] = None
    document_ids: Optional[torch.Tensor] = None

    def attention(self) -> Optional[torch.Tensor]:
        """[B, 1, T, T] bool (True = attend): causal and within one document; None without document_ids."""
        if self.document_ids is None:
            return None
        doc = self.document_ids
        T = doc.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=doc.device).tril()
        return (causal[None] & (doc[:, :, None] == doc[:, None, :]))[:, None]

    def to(self, device) -> "DocumentMask":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return DocumentMask(move(self.position_ids), move(self.document_ids))


def document_ids(input_ids: torch.Tensor, eod: int) -> torch.Tensor:
    """[B, T] long: the number of end-of-document tokens strictly before each position (the token after
    an end-of-document token starts the next document; the end-of-document token belongs to the one it ends)."""
    is_eod = (input_ids == eod).long()
    return is_eod.cumsum(dim=1) - is_eod


def document_positions(input_ids: torch.Tensor, eod: int) -> torch.Tensor:
    """[B, T] long: each token's position within its document (0 right after an end-of-document token)."""
    B, T = input_ids.shape
    index = torch.arange(T, device=input_ids.device).expand(B, T)
    starts = torch.zeros_like(input_ids, dtype=torch.bool)
    starts[:, 1:] = input_ids[:, :-1] == eod
    starts[:, 0] = True
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values  # start of each one's document
    return index - first


@dataclass(frozen=True)
class DocumentLayout:
    """How a run treats the documents packed in its windows (data.reset_position_ids,
    data.reset_attention_mask, data.eod_mask_loss) and the tokenizer's end-of-document id."""

    eod: int
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False

    @classmethod
    def of(cls, data_cfg, eod: int) -> Optional["DocumentLayout"]:
        """The layout of a DataConfig, or None when all three options are off (the model sees one text)."""
        layout = cls(int(eod), bool(getattr(data_cfg, "reset_position_ids", False)),
                     bool(getattr(data_cfg, "reset_attention_mask", False)),
                     bool(getattr(data_cfg, "eod_mask_loss", False)))
        return layout if layout.reset_position_ids or layout.reset_attention_mask or layout.eod_mask_loss else None

    def mask(self, input_ids: torch.Tensor) -> Optional[DocumentMask]:
        """The DocumentMask of a batch of input windows, or None when neither reset is on."""
        if not (self.reset_position_ids or self.reset_attention_mask):
            return None
        return DocumentMask(document_positions(input_ids, self.eod) if self.reset_position_ids else None,
                            document_ids(input_ids, self.eod) if self.reset_attention_mask else None)

    def labels(self, input_ids: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
        """`labels` with the targets predicted from an end-of-document input set to `ignore_index` when
        eod_mask_loss is on (Megatron: loss_mask[tokens == eod] = 0)."""
        if not self.eod_mask_loss:
            return labels
        return labels.masked_fill(input_ids == self.eod, ignore_index)
