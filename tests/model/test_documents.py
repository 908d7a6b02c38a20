"""Packed documents kept apart (Megatron's --reset-position-ids, --reset-attention-mask, --eod-mask-loss):
the positions and document ids equal a transcription of Megatron's get_ltor_masks_and_position_ids loop;
with both resets every packed document's logits equal the same document run alone, at fixed depth, with
per-position exits and through the exit gate's objective; eod_mask_loss leaves out exactly the targets after
an end-of-document input; a KV cache is refused; and a leading end-of-document token is dropped for accuracy
only where it changes nothing."""
import pytest
import torch

from loop_megatron.config import Config, ModelConfig
from loop_megatron.model import LoopGPT
from loop_megatron.model.documents import DocumentLayout, DocumentMask, document_ids, document_positions
from loop_megatron.model.exit import ExitRule
from loop_megatron.model.gpt import IGNORE_INDEX
from loop_megatron.model.inputs import prepare_inputs, split_inputs

EOD = 0


def megatron_reference(data: torch.Tensor, eod: int):
    """Megatron-LM's get_ltor_masks_and_position_ids (reset_position_ids and reset_attention_mask on, one
    python loop per end-of-document token), transcribed: (attention allowed [B, T, T] bool, position_ids)."""
    B, T = data.shape
    allowed = torch.tril(torch.ones(B, T, T)).bool()
    position_ids = torch.arange(T).repeat(B, 1)
    for b in range(B):
        eod_index = (data[b] == eod).nonzero().flatten().tolist()
        prev = 0
        for i in eod_index:
            allowed[b, (i + 1):, :(i + 1)] = False
            position_ids[b, (i + 1):] -= i + 1 - prev
            prev = i + 1
    return allowed, position_ids


def windows(seed=0, batch=3, seq=24, vocab=40):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    ids[0, [0, 5, 6, 15]] = EOD  # an EOD first, two in a row
    ids[1, [seq - 1]] = EOD  # an EOD last
    ids[2, [3, 11, 19]] = EOD
    return ids


def test_positions_and_document_ids_match_megatrons_loop():
    ids = windows()
    allowed, positions = megatron_reference(ids, EOD)
    mask = DocumentLayout(EOD, reset_position_ids=True, reset_attention_mask=True).mask(ids)
    assert torch.equal(mask.position_ids, positions)
    assert torch.equal(mask.attention()[:, 0], allowed)
    assert torch.equal(document_positions(ids, EOD), positions)
    assert document_ids(ids, EOD)[0].tolist()[:8] == [0, 1, 1, 1, 1, 1, 2, 3]  # the EOD ends its own document


def model_cfg(**overrides) -> ModelConfig:
    cfg = ModelConfig(vocab_size=40, make_vocab_size_divisible_by=8, max_position_embeddings=32, hidden_size=32,
                      num_attention_heads=4, num_layers=1, num_loops=3, prelude_layers=1, coda_layers=1,
                      loop_gates="vector", init_method_std=0.2)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def documents_of(row: torch.Tensor):
    """[(start, end)] of each document in one window (each ends with its EOD, the last maybe without)."""
    ends = (row == EOD).nonzero().flatten().tolist()
    spans, start = [], 0
    for e in ends + ([len(row) - 1] if not ends or ends[-1] != len(row) - 1 else []):
        spans.append((start, e + 1))
        start = e + 1
    return spans


@pytest.mark.parametrize("exit_rule", [None, ExitRule("kl", 0.05)], ids=["fixed-depth", "kl-exit"])
def test_each_packed_document_gets_the_logits_it_gets_alone(exit_rule):
    torch.manual_seed(0)
    model = LoopGPT(model_cfg()).eval()
    ids = windows()
    mask = DocumentLayout(EOD, True, True).mask(ids)
    with torch.no_grad():
        packed, _ = model(ids, attention_mask=mask, exit_rule=exit_rule)
        plain, _ = model(ids, exit_rule=exit_rule)
        for b in range(ids.shape[0]):
            for start, end in documents_of(ids[b]):
                alone, _ = model(ids[b:b + 1, start:end], exit_rule=exit_rule)
                # fp32, the same operations on fewer keys: differences are rounding (1e-6), a shared key 1e-1
                assert (packed[b, start:end] - alone[0]).abs().max().item() < 2e-5, (b, start, end)
    assert (packed - plain).abs().max().item() > 1e-2  # without the mask the documents do see each other


@pytest.mark.parametrize("injection", ["add", "diagonal"])
def test_packed_documents_in_training_with_truncated_backprop_match_each_document_alone(injection):
    """The recurrent recipe's training forward (no prelude, injection, a zero first state so no noise is drawn,
    1, 3 or 7 iterations with backprop through the last 4): each packed document's logits are its logits alone."""
    from loop_megatron.model.depth import LoopDepth

    torch.manual_seed(0)
    model = LoopGPT(model_cfg(prelude_layers=0, coda_layers=0, loop_injection=injection, loop_state_init="zeros",
                              loop_gates="none", num_loops=4)).train()
    ids = windows()
    mask = DocumentLayout(EOD, True, True).mask(ids)
    for r in (1, 3, 7):
        depth = LoopDepth(num_loops=r, backprop_loops=4)
        packed, _ = model(ids, attention_mask=mask, depth=depth, return_logits=True)
        for b in range(ids.shape[0]):
            for start, end in documents_of(ids[b]):
                alone, _ = model(ids[b:b + 1, start:end], depth=depth, return_logits=True)
                assert (packed[b, start:end] - alone[0]).abs().max().item() < 2e-5, (r, b, start, end)


def test_exit_gate_objective_with_documents_is_the_sum_over_documents_alone():
    torch.manual_seed(1)
    model = LoopGPT(model_cfg(exit_gate=True, num_loops=4)).train()
    ids = torch.randint(1, 40, (1, 17))
    ids[0, 7] = EOD
    labels = torch.randint(1, 40, (1, 17))
    mask = DocumentLayout(EOD, True, True).mask(ids)
    _, packed = model(ids, labels, attention_mask=mask, loss_reduction="mean")
    # per-document losses weighted by their target counts (8 and 9) make the packed mean
    _, first = model(ids[:, :8], labels[:, :8])
    _, second = model(ids[:, 8:], labels[:, 8:])
    assert packed.item() == pytest.approx((8 * first.item() + 9 * second.item()) / 17, abs=2e-5)


def test_only_positions_reset_keeps_attention_across_documents():
    ids = windows()
    mask = DocumentLayout(EOD, reset_position_ids=True).mask(ids)
    assert mask.document_ids is None and mask.attention() is None
    assert torch.equal(mask.position_ids, megatron_reference(ids, EOD)[1])
    only_attention = DocumentLayout(EOD, reset_attention_mask=True).mask(ids)
    assert only_attention.position_ids is None and only_attention.attention() is not None
    assert DocumentLayout(EOD, eod_mask_loss=True).mask(ids) is None


def test_eod_mask_loss_leaves_out_the_targets_after_an_end_of_document_input():
    tokens = torch.cat([windows(), torch.randint(1, 40, (3, 1))], dim=1)
    x, y = split_inputs(tokens, torch.device("cpu"))
    x2, y2, kwargs = prepare_inputs(tokens, torch.device("cpu"), DocumentLayout(EOD, eod_mask_loss=True))
    assert kwargs == {} and torch.equal(x, x2)
    assert torch.equal(y2 == IGNORE_INDEX, x == EOD)
    assert torch.equal(y2[x != EOD], y[x != EOD])
    # no layout: exactly split_inputs
    x3, y3, none = prepare_inputs(tokens, torch.device("cpu"), None)
    assert none == {} and torch.equal(x3, x) and torch.equal(y3, y)


def test_layout_follows_the_data_config():
    cfg = Config()
    assert DocumentLayout.of(cfg.data, 5) is None
    cfg.data.reset_attention_mask = True
    layout = DocumentLayout.of(cfg.data, 5)
    assert layout == DocumentLayout(5, reset_attention_mask=True)


def test_a_document_mask_with_a_kv_cache_is_refused():
    from loop_megatron.model import KVCache

    model = LoopGPT(model_cfg()).eval()
    ids = windows()[:1]
    with pytest.raises(ValueError, match="KV cache"):
        model(ids, attention_mask=DocumentMask(document_ids=document_ids(ids, EOD)), kv_cache=KVCache())


def test_accuracy_drops_a_leading_eod_only_when_both_resets_were_on():
    from loop_megatron.inference.accuracy import documents_kept_apart

    assert documents_kept_apart({"reset_position_ids": True, "reset_attention_mask": True})
    assert not documents_kept_apart({})
    with pytest.raises(ValueError, match="reset_position_ids but not data.reset_attention_mask"):
        documents_kept_apart({"reset_position_ids": True}, "ck/iter_0000010")
