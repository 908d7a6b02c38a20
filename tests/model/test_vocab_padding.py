"""Vocab padding takes no part in the loss: a padded model equals an unpadded one with the same weights."""
import torch
import torch.nn.functional as F

from loop_megatron.config import ModelConfig
from loop_megatron.model import LoopGPT

VOCAB = 97


def cfg(multiple: int) -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB, make_vocab_size_divisible_by=multiple, max_position_embeddings=16,
                       hidden_size=32, num_attention_heads=4, num_layers=1, num_loops=2)


def test_padded_vocab_loss_and_grads_equal_unpadded_reference():
    torch.manual_seed(0)
    padded = LoopGPT(cfg(64))  # 97 rows padded to 128
    assert padded.wte.weight.shape[0] == 128
    plain = LoopGPT(cfg(1))
    state = {k: (v[:VOCAB] if k == "wte.weight" else v) for k, v in padded.state_dict().items()}
    plain.load_state_dict(state)
    with torch.no_grad():  # padding rows that would dominate the softmax if they took part
        padded.wte.weight[VOCAB:] = 50.0
    ids = torch.randint(0, VOCAB, (2, 13))
    x, y = ids[:, :-1], ids[:, 1:]

    logits, loss = padded(x, y, return_logits=True)
    loss.backward()
    _, ref_loss = plain(x, y)
    ref_loss.backward()
    # The explicit computation: tied head over the real rows only, then the usual cross-entropy.
    with torch.no_grad():
        h = plain.hidden_states(x)
        explicit = F.cross_entropy((h @ plain.wte.weight.T).reshape(-1, VOCAB), y.reshape(-1))

    assert logits.shape[-1] == VOCAB
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(loss.detach(), explicit, rtol=0, atol=1e-5)
    grads = dict(plain.named_parameters())
    for name, p in padded.named_parameters():
        g = p.grad[:VOCAB] if name == "wte.weight" else p.grad
        torch.testing.assert_close(g, grads[name].grad, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
    assert torch.count_nonzero(padded.wte.weight.grad[VOCAB:]) == 0  # padding rows get no gradient
