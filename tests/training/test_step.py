"""The trainer's step helpers: fused clipping equals torch's clip_grad_norm_, one host sync per step."""
import os
import traceback

import torch

from loop_megatron.training.step import FusedClipper


def _params_with_grads(scale: float):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in ((7, 5), (5,), (3, 3, 2))]
    for p in params:
        p.grad = torch.randn_like(p) * scale
    return params


def test_fused_clipper_matches_torch_clip_grad_norm():
    for scale, max_norm in ((10.0, 1.0), (0.01, 1.0), (10.0, 0.0)):  # clips / below threshold / measure only
        ours, ref = _params_with_grads(scale), _params_with_grads(scale)
        norm = FusedClipper(ours, max_norm)(torch.device("cpu"))
        expected = torch.nn.utils.clip_grad_norm_(ref, max_norm if max_norm > 0 else float("inf"))
        torch.testing.assert_close(norm, expected.float(), rtol=1e-6, atol=0)
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)
        if scale == 10.0 and max_norm == 1.0:
            assert abs(float(torch.cat([p.grad.flatten() for p in ours]).norm()) - 1.0) < 1e-5


def _count_host_syncs(rank, world):
    """Scalar reads (.item(), float(t), bool(t): aten._local_scalar_dense) in train_step; tolist() of the
    step's one stats tensor is counted separately by wrapping Tensor.tolist."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from loop_megatron.config import Config
    from loop_megatron.model import LoopGPT
    from loop_megatron.parallel import initialize_model_parallel
    from loop_megatron.training.distributed import skip_shm_comm_build
    from loop_megatron.training.engine import build_engine
    from loop_megatron.training.step import train_step

    skip_shm_comm_build()  # as the trainer does: DeepSpeed's CPU shm op is not needed for training

    class Count(TorchDispatchMode):
        scalars = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            # torch.optim's AdamW reads its step counter with .item(), but keeps that counter on the host
            # (state["step"] is a CPU tensor unless fused/capturable): no device sync, so not counted.
            if func is torch.ops.aten._local_scalar_dense.default and not any(
                    "torch/optim/" in f.filename.replace(os.sep, "/") for f in traceback.extract_stack()):
                Count.scalars += 1
            return func(*args, **(kwargs or {}))

    initialize_model_parallel(1)
    cfg = Config()
    m = cfg.model
    m.vocab_size, m.make_vocab_size_divisible_by, m.hidden_size, m.num_attention_heads = 100, 64, 32, 4
    m.num_layers, m.num_loops, m.max_position_embeddings = 1, 2, 8
    cfg.data.seq_length = 8
    cfg.training.micro_batch_size, cfg.training.precision = 2, "fp32"
    engine, clipper, _ = build_engine(cfg, LoopGPT(m), 1, "fp32", log=lambda s: None)
    assert clipper is not None and engine.gradient_clipping() == 0.0  # the trainer clips at ZeRO-0 fp32
    batches = iter([torch.randint(0, 100, (2, 9)) for _ in range(6)])
    train_step(engine, batches, 2, torch.device("cpu"), clipper)  # warm-up
    tolist_calls = []
    original = torch.Tensor.tolist

    def counted_tolist(self):
        tolist_calls.append(self.shape)
        return original(self)

    torch.Tensor.tolist = counted_tolist
    try:
        with Count():
            stats = train_step(engine, batches, 2, torch.device("cpu"), clipper)
    finally:
        torch.Tensor.tolist = original
    return Count.scalars, len(tolist_calls), stats


def test_train_step_reads_the_host_once():
    from tests.dist_utils import run_distributed

    scalars, tolists, stats = run_distributed(_count_host_syncs, 1)[0]
    assert scalars == 0 and tolists == 1, (scalars, tolists)
    assert stats.grad_norm is not None and stats.grad_norm > 0 and 0 < stats.loss < 10 and stats.stop is False


def test_stop_flag_is_read_at_the_steps_all_reduce():
    """A stop signal that arrives while the step's micro-batches run is carried by that same step (the
    trainer passes a callable read right before the all-reduce), not by the next one."""
    from loop_megatron.training.step import train_step

    signalled = []

    class Engine:
        def __call__(self, x, labels=None, depth=None):
            return None, (x.float().mean() * 0 + 1.0)

        def backward(self, loss):
            signalled.append(True)  # the signal lands mid-step

        def step(self):
            pass

        def get_global_grad_norm(self):
            return 0.5

    batches = iter([torch.zeros(2, 5, dtype=torch.long)] * 2)
    stats = train_step(Engine(), batches, 2, torch.device("cpu"), stop_requested=lambda: bool(signalled))
    assert stats.stop and stats.loss == 1.0 and stats.grad_norm == 0.5
