"""What the model takes from a batch of dataset windows: input ids and labels.

A batch is a LongTensor [B, T+1] of token windows, or, for answer-masked data (data/loss_mask.py), a dict
with the windows and a float ``loss_mask`` [B, T]; labels are the windows shifted by one, with
IGNORE_INDEX (which the model's loss, evaluation and bits per byte leave out) where the mask is 0. Used by
training (training/data.py, training/step.py) and evaluation (inference/evaluation.py) alike, so both count
the same targets. `prepare_inputs` adds the run's document layout (model/documents.py: Megatron's reset of
positions and attention at each end-of-document token, and the loss left out after one), for both alike too.
"""
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch

from .documents import DocumentLayout
from .gpt import IGNORE_INDEX


def collate_tokens(items) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
    """Stack dataset items into a batch: a LongTensor [B, T+1] of tokens, or, when the items carry a
    ``loss_mask`` (answer-masked data), ``{"tokens": [B, T+1], "loss_mask": float [B, T]}`` (an item
    without one counts every target)."""
    tokens = torch.from_numpy(np.stack([np.asarray(item["tokens"], dtype=np.int64) for item in items]))
    if not any("loss_mask" in item for item in items):
        return tokens
    masks = [np.asarray(item["loss_mask"], np.float32) if "loss_mask" in item
             else np.ones(tokens.shape[1] - 1, np.float32) for item in items]
    return {"tokens": tokens, "loss_mask": torch.from_numpy(np.stack(masks))}


def split_inputs(batch: Union[torch.Tensor, Dict[str, torch.Tensor]], device: torch.device
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """[B, T+1] window -> (input_ids [B, T], labels [B, T]). A batch with a ``loss_mask``
    (`collate_tokens`) gets IGNORE_INDEX labels where the mask is 0, which the model's loss, evaluation
    and bits per byte leave out."""
    if isinstance(batch, dict):
        tokens, mask = batch["tokens"], batch["loss_mask"]
    else:
        tokens, mask = batch, None
    tokens = tokens.to(device, non_blocking=True)
    if mask is None:
        labels = tokens[:, 1:].contiguous()
    else:  # out of place: with B = 1 the slice is already contiguous and shares storage with the inputs
        labels = tokens[:, 1:].masked_fill(mask.to(device, non_blocking=True) == 0, IGNORE_INDEX)
    return tokens[:, :-1].contiguous(), labels


def is_masked_batch(batch) -> bool:
    """The batch carries a loss mask (answer-masked data): the trainer then weights micro-batch losses by
    their counted targets (training/step.py)."""
    return isinstance(batch, dict) and "loss_mask" in batch


def prepare_inputs(batch: Union[torch.Tensor, Dict[str, torch.Tensor]], device: torch.device,
                   layout: Optional[DocumentLayout] = None) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, Any]]:
    """`split_inputs`, then the run's document layout: (input_ids, labels, model keyword arguments), the
    last ``{"attention_mask": DocumentMask}`` when the layout resets positions or attention at each
    end-of-document token, else {}; with eod_mask_loss the targets after an end-of-document input are
    IGNORE_INDEX. `layout` None (the default run) is `split_inputs` exactly."""
    inputs, labels = split_inputs(batch, device)
    if layout is None:
        return inputs, labels, {}
    labels = layout.labels(inputs, labels, IGNORE_INDEX)
    mask = layout.mask(inputs)
    return inputs, labels, ({} if mask is None else {"attention_mask": mask})
