"""Answer-masked loss: the mean over counted targets, equal to a hand computation with torch's
cross_entropy on the selected positions, at every layer: the model's loss, train_step over gradient
accumulation and data-parallel ranks (DeepSpeed's own scaling), evaluation with bits per byte, and a
train.py run end to end. Unmasked batches keep the old loss exactly."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from loop_megatron.model.inputs import collate_tokens, split_inputs
from tests.training.helpers import evaluate_tiny_run, train_tiny_cli

VOCAB = 100


def _tiny_model(seed=0, vocab=VOCAB):
    from loop_megatron.config import Config
    from loop_megatron.model import LoopGPT

    cfg = Config()
    m = cfg.model
    m.vocab_size, m.make_vocab_size_divisible_by, m.hidden_size, m.num_attention_heads = vocab, 64, 32, 4
    m.num_layers, m.num_loops, m.max_position_embeddings = 1, 2, 16
    cfg.data.seq_length = 8
    cfg.training.micro_batch_size, cfg.training.precision = 2, "fp32"
    torch.manual_seed(seed)
    return cfg, LoopGPT(m)


def _masked_batch(seed, counted, batch=2, seq=8):
    """{"tokens": [batch, seq + 1], "loss_mask": [batch, seq]} with exactly `counted` ones, at random places."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batch, seq + 1), generator=g)
    mask = torch.zeros(batch * seq)
    mask[torch.randperm(batch * seq, generator=g)[:counted]] = 1.0
    return {"tokens": tokens, "loss_mask": mask.view(batch, seq)}


def _reference(model, batches):
    """Hand computation: cross_entropy over the positions the masks select, summed over all batches, / count."""
    nll, count = 0.0, 0
    for b in batches:
        logits = model(b["tokens"][:, :-1])[0].float()
        keep = b["loss_mask"].bool()
        nll = nll + F.cross_entropy(logits[keep], b["tokens"][:, 1:][keep], reduction="sum")
        count += int(keep.sum())
    return nll / max(count, 1)


def test_split_inputs_ignores_masked_targets_and_the_model_loss_is_their_mean():
    _, model = _tiny_model()
    batch = _masked_batch(1, counted=5, batch=1)  # B = 1: the labels slice must not alias the inputs
    x, y = split_inputs(batch, torch.device("cpu"))
    assert torch.equal(x, batch["tokens"][:, :-1]) and int((y != -100).sum()) == 5
    _, loss = model(x, labels=y)
    torch.testing.assert_close(loss, _reference(model, [batch]), rtol=1e-6, atol=0)
    # No mask: labels are the plain shifted tokens (the old batches, bit for bit).
    x2, y2 = split_inputs(batch["tokens"], torch.device("cpu"))
    assert torch.equal(x2, x) and torch.equal(y2, batch["tokens"][:, 1:])


def test_collate_keeps_plain_batches_plain():
    items = [{"tokens": np.arange(9)}, {"tokens": np.arange(9) + 1}]
    assert isinstance(collate_tokens(items), torch.Tensor)
    masked = collate_tokens([dict(items[0], loss_mask=np.zeros(8, np.float32)), items[1]])
    assert masked["loss_mask"].tolist() == [[0.0] * 8, [1.0] * 8]  # an item without a mask counts every target


class _Engine:
    """The DeepSpeed calls train_step makes, on a plain module: backward accumulates loss / accum (DeepSpeed's
    gradient-accumulation scaling), step does nothing."""

    def __init__(self, model, accum):
        self.model, self.accum, self.losses = model, accum, []

    def __call__(self, x, labels=None, depth=None):
        logits, loss = self.model(x, labels=labels)
        self.losses.append(loss.detach().double())
        return logits, loss

    def backward(self, loss):
        (loss / self.accum).backward()

    def step(self):
        pass

    def get_global_grad_norm(self):
        return None


def test_unmasked_batches_give_exactly_the_old_loss():
    from loop_megatron.training.step import train_step

    _, model = _tiny_model()
    plain = [_masked_batch(s, 16)["tokens"] for s in range(3)]
    engine = _Engine(model, 3)
    stats = train_step(engine, iter(plain), 3, torch.device("cpu"))
    assert stats.loss == float(sum(engine.losses) / 3)  # the mean of micro-batch means, as before masks
    ones = [{"tokens": t, "loss_mask": torch.ones(2, 8)} for t in plain]
    masked = train_step(_Engine(model, 3), iter(ones), 3, torch.device("cpu"))
    assert masked.loss == pytest.approx(stats.loss, rel=1e-6)  # all-ones masks: the same mean, other sum order


def test_accumulation_weights_micro_batches_by_counted_targets():
    """Three micro-batches with 2, 0 and 16 counted targets: the loss and the accumulated gradient are those of
    the mean over all 18 (a mean of micro-batch means would weigh the two targets of the first 8 times more)."""
    from loop_megatron.training.step import train_step

    _, model = _tiny_model()
    batches = [_masked_batch(s, c) for s, c in enumerate((2, 0, 16))]
    stats = train_step(_Engine(model, 3), iter(batches), 3, torch.device("cpu"))
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref = _reference(model, batches)
    ref.backward()
    assert stats.loss == pytest.approx(float(ref.detach()), rel=1e-6)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)
    model.zero_grad()
    none = train_step(_Engine(model, 2), iter([_masked_batch(s, 0) for s in range(2)]), 2, torch.device("cpu"))
    assert none.loss == 0.0 and all(p.grad is None or not p.grad.any() for p in model.parameters())


COUNTS = (3, 0, 7, 16)  # counted targets of the 4 micro-batches of the global batch (DP 2 x accumulation 2)


def _deepspeed_dp2_worker(rank, world):
    from loop_megatron.parallel import initialize_model_parallel
    from loop_megatron.training.distributed import skip_shm_comm_build
    from loop_megatron.training.engine import build_engine
    from loop_megatron.training.step import train_step

    skip_shm_comm_build()
    initialize_model_parallel(1)
    cfg, model = _tiny_model()
    _, ref_model = _tiny_model()  # the same initial weights, for the hand computation
    cfg.training.global_batch_size = 2 * 2 * world
    engine, clipper, _ = build_engine(cfg, model, world, "fp32", log=lambda s: None)
    batches = [_masked_batch(s, c) for s, c in enumerate(COUNTS)]
    ref = _reference(ref_model, batches)
    ref.backward()
    ref_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in ref_model.parameters()))
    mine = batches[2 * rank: 2 * rank + 2]  # this DP rank's two micro-batches
    stats = train_step(engine, iter(mine), 2, torch.device("cpu"), clipper)
    zero = train_step(engine, iter([_masked_batch(9, 0), _masked_batch(10, 0)]), 2, torch.device("cpu"), clipper)
    return float(ref.detach()), float(ref_norm), stats, zero


def test_deepspeed_dp2_accumulation_mean_over_global_counted_targets():
    """Real DeepSpeed (ZeRO-0 fp32, gloo), DP 2 x accumulation 2: loss and gradient norm of the step equal the
    hand-computed masked mean over the whole global batch; a global batch with no counted target gives 0, not NaN."""
    from tests.dist_utils import run_distributed

    results = run_distributed(_deepspeed_dp2_worker, 2)
    for ref, ref_norm, stats, zero in results:
        assert stats.loss == pytest.approx(ref, rel=1e-6) and stats.grad_norm == pytest.approx(ref_norm, rel=1e-5)
        assert zero.loss == 0.0 and zero.grad_norm == 0.0 and zero.finite_norm


def test_evaluate_masked_loss_and_bpb_equal_hand_computation(tmp_path):
    from loop_megatron.data import GPT2Tokenizer, GPTDataset, IndexedDataset
    from loop_megatron.inference.evaluation import evaluate
    from tests.data.test_loss_mask import masked_prefix

    prefix, _ = masked_prefix(tmp_path)
    ds = GPTDataset(IndexedDataset(prefix), "valid", (0, 20), 12, 1, None, str(tmp_path / "cache"))
    _, model = _tiny_model(vocab=50257)
    model.eval()
    lengths = torch.as_tensor(GPT2Tokenizer().token_byte_lengths())
    result = evaluate(model, ds, micro_batch_size=3, eval_iters=2, byte_lengths=lengths)
    batches = [collate_tokens([ds[i] for i in range(s, s + 3)]) for s in (0, 3)]
    with torch.no_grad():
        assert result.loss == pytest.approx(float(_reference(model, batches)), rel=1e-6)
        nats, nbytes, count = 0.0, 0, 0
        for b in batches:
            keep = b["loss_mask"].bool()
            targets = b["tokens"][:, 1:][keep]
            nll = F.cross_entropy(model(b["tokens"][:, :-1])[0][keep], targets, reduction="none")
            text = lengths[targets] > 0  # EOD (0 bytes) is scored in the loss but not in bits per byte
            nats, nbytes, count = nats + float(nll[text].sum()), nbytes + int(lengths[targets].sum()), count + len(targets)
    assert result.tokens == count < 6 * 12 and result.bytes == nbytes
    assert result.bpb == pytest.approx(nats / (math.log(2) * nbytes), rel=1e-6)


def test_train_py_on_masked_data_end_to_end(tmp_path):
    """train.py trains on answer-masked data; its last valid loss is the masked mean that evaluating the saved
    checkpoint gives over the same samples, whose token count is the answer targets of those samples."""
    from tests.data.test_loss_mask import RECORDS, masked_prefix

    prefix, _ = masked_prefix(tmp_path, records=RECORDS * 2)
    proc = train_tiny_cli(prefix, tmp_path)
    assert "loss mask" in proc.stdout, proc.stdout[-2000:]
    result, valid = evaluate_tiny_run(prefix, tmp_path)
    counted = sum(int(valid[i]["loss_mask"].sum()) for i in range(4))
    assert result.tokens == counted < 4 * 16
