"""Hugging Face configuration of a Loop-Residual GPT (Ng & Wang, arXiv 2409.14199).

Field names follow GPT-2's config where they exist; `model_config()` translates them into the package's
`ModelConfig`, the one description of the model's shape (config.py, exported beside this file).
"""
from transformers import PretrainedConfig

from ..config import ModelConfig


class LoopGPTConfig(PretrainedConfig):
    """GPT-2 whose stack of `n_layer` shared blocks is applied `num_loops` times with gates.

    One outer iteration n applies each shared block `inner_loops` times in place, then mixes
    ``x = x + a_n * (h - x)``; `prelude_layers` unshared blocks run before the loop and `coda_layers`
    after it. `loop_injection` ('none', 'add', 'linear', 'diagonal') re-injects the prelude output e into
    every iteration and `loop_state_init` ('input', 'zeros', 'random') picks the first state (a 'random'
    model starts from zeros unless a `state_generator` is passed at inference); `gate_init` is the gates' initial
    value. `loop_gate_count` gates exist (the export writes the checkpoint's count, so `from_pretrained(...,
    num_loops=L)` loads at any L); iterations beyond them reuse the last one, as the package's `depth=` does.
    `exit_criterion` ('none', 'kl', 'entropy', 'gate', 'delta') and `exit_threshold` stop each token's loop separately
    at inference (`num_loops` is then the cap; `exit_gate` adds the learned gate 'gate' reads); they can also
    be passed to forward() / generate(). `num_hidden_layers` is the number of block *applications* per
    forward pass (one KV-cache layer each); it is derived from the other fields.
    """

    model_type = "loop_gpt"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {
        "hidden_size": "n_embd",
        "max_position_embeddings": "n_positions",
        "num_attention_heads": "n_head",
    }

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_head: int = 12
    n_inner: int | None = None
    n_layer: int = 12
    num_loops: int = 1
    inner_loops: int = 1
    prelude_layers: int = 0
    coda_layers: int = 0
    loop_gates: str = "vector"
    gate_init: float = 1.0
    loop_gate_count: int = 0
    loop_injection: str = "none"
    loop_state_init: str = "input"
    loop_state_std: float = 0.02
    exit_gate: bool = False
    exit_criterion: str = "none"
    exit_threshold: float = 0.0
    num_hidden_layers: int = 12
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.0
    embd_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    use_cache: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    pad_token_id: int | None = None
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        if self.loop_gates not in ("vector", "scalar", "none"):
            raise ValueError(f"loop_gates must be 'vector', 'scalar' or 'none', got {self.loop_gates!r}.")
        if self.loop_injection not in ("none", "add", "linear", "diagonal"):
            raise ValueError(f"loop_injection must be 'none', 'add', 'linear' or 'diagonal', got {self.loop_injection!r}.")
        if self.loop_state_init not in ("input", "zeros", "random"):
            raise ValueError(f"loop_state_init must be 'input', 'zeros' or 'random', got {self.loop_state_init!r}.")
        if self.exit_criterion not in ("none", "kl", "entropy", "gate", "delta"):
            raise ValueError(f"exit_criterion must be 'none', 'kl', 'entropy', 'gate' or 'delta', got "
                             f"{self.exit_criterion!r}.")
        if self.exit_criterion == "gate" and not self.exit_gate:
            raise ValueError("exit_criterion 'gate' needs exit_gate true.")
        self.num_hidden_layers = self.applications(self.num_loops, self.exit_criterion)
        super().__post_init__(**kwargs)

    def applications(self, num_loops: int, exit_criterion: str = "none") -> int:
        """Block applications per forward pass with `num_loops` outer iterations. The 'kl' and 'entropy' exit
        criteria read the state out through the coda after every iteration (its applications then belong to
        each iteration)."""
        core = self.n_layer * self.inner_loops
        if exit_criterion in ("kl", "entropy"):
            return self.prelude_layers + num_loops * (core + self.coda_layers)
        return self.prelude_layers + num_loops * core + self.coda_layers

    def model_config(self) -> ModelConfig:
        """The package's ModelConfig of this model: the HF vocabulary is unpadded (the export drops padding
        rows) and dropout is GPT-2's residual/attention dropout."""
        return ModelConfig(
            vocab_size=self.vocab_size, make_vocab_size_divisible_by=1, max_position_embeddings=self.n_positions,
            hidden_size=self.n_embd, num_attention_heads=self.n_head, ffn_hidden_size=self.n_inner or 0,
            num_layers=self.n_layer, num_loops=self.num_loops, inner_loops=self.inner_loops,
            prelude_layers=self.prelude_layers, coda_layers=self.coda_layers, loop_gates=self.loop_gates,
            gate_init=self.gate_init, hidden_dropout=self.resid_pdrop, attention_dropout=self.attn_pdrop,
            layernorm_epsilon=self.layer_norm_epsilon, init_method_std=self.initializer_range,
            loop_gate_count=self.loop_gate_count, loop_injection=self.loop_injection,
            loop_state_init=self.loop_state_init, loop_state_std=self.loop_state_std, exit_gate=self.exit_gate,
            exit_criterion=self.exit_criterion, exit_threshold=self.exit_threshold)


__all__ = ["LoopGPTConfig"]
