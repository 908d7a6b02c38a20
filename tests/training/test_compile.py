"""training.compile: a model whose blocks are torch.compiled gives the eager loss and gradients.

torch.compile on CPU builds C++ kernels with the system compiler (tens of seconds on a 2-core machine),
so this test runs only when LOOP_MEGATRON_TEST_COMPILE=1 is set.
"""
import copy
import os

import pytest
import torch

from loop_megatron.config import ModelConfig
from loop_megatron.model import LoopGPT
from loop_megatron.training.compile import CompileTimer, compile_blocks

pytestmark = pytest.mark.skipif(os.environ.get("LOOP_MEGATRON_TEST_COMPILE") != "1",
                                reason="torch.compile is slow on CPU; set LOOP_MEGATRON_TEST_COMPILE=1 to run")


def test_compiled_blocks_match_eager_loss_and_grads():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, make_vocab_size_divisible_by=1, max_position_embeddings=16, hidden_size=32,
                      num_attention_heads=4, num_layers=1, num_loops=3)
    eager = LoopGPT(cfg)
    compiled = copy.deepcopy(eager)
    lines = []
    timer = CompileTimer(lines.append)
    try:
        assert compile_blocks(compiled) == 1
        ids = torch.randint(0, 64, (2, 9))
        losses = []
        for model in (eager, compiled):
            _, loss = model(ids[:, :-1], ids[:, 1:])
            loss.backward()
            losses.append(loss.detach())
        ids2 = torch.randint(0, 64, (2, 9))  # a second step reuses the compiled graph: no new compile
        graphs_after_first = timer.graphs
        compiled(ids2[:, :-1], ids2[:, 1:])
    finally:
        timer.close()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    grads = dict(eager.named_parameters())
    for name, p in compiled.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert list(compiled.state_dict()) == list(eager.state_dict())  # in-place compile keeps the names
    assert graphs_after_first >= 1 and timer.graphs == graphs_after_first, (graphs_after_first, timer.graphs)
    assert lines and all("compiled in" in line for line in lines)
