"""Hugging Face model of a Loop-Residual GPT (Ng & Wang, arXiv 2409.14199), for trust_remote_code.

Self-contained: imports only torch and transformers (plus the sibling configuration file), so it can be
copied into an exported model folder. A GPT-2 (pre-LayerNorm, GELU tanh, learned positions, tied
embeddings) whose middle is a stack of `n_layer` shared blocks applied `num_loops` times:

    for n in 1..N:  h = x;  for each block k: repeat inner_loops times: h = block_k(h)
                    x = x + a_n * (h - x)          (a_n: learned gate; 'none' means x = h)

With input injection (`loop_injection`; e = the prelude output, s = the loop state, f = the shared blocks):

    none:      u = s            s' = s + a_n * (f(u) - s)
    add:       u = s + e        s' = s + a_n * (f(u) - s)
    linear:    u = W [s ; e]    s' = s + a_n * (f(u) - s)
    diagonal:  u = s            s' = A * s + B * e + a_n * (f(u) - u),  A = exp(-softplus(delta) * softplus(rate))

and the first state s_0 = e ('input'), 0 ('zeros') or, for 'random', 0 unless `state_generator` is given
(then N(0, loop_state_std^2)): inference is deterministic by default.

The shared blocks are stored once. Every block *application* has its own key/value cache entry (the
same weights see a different hidden state each time), so the cache is a `DynamicCache` with one layer
index per application, in application order: prelude blocks, loop applications, coda blocks.
Iterations beyond the trained count (``num_loops=`` larger than ``config.num_loops``) reuse the last gate.

Adaptive per-token exit (``exit_criterion``/``exit_threshold`` in the config or as forward()/generate()
kwargs; ``num_loops`` is then the cap), as loop_megatron's model/exit.py: after iteration n a token stops
when H(p_n) < T ('entropy'), KL(p_n || p_{n-1}) < T ('kl', n >= 2) or the exit gate's cumulative exit
probability 1 - prod_j (1 - sigmoid(w . LayerNorm(s_j) + b)) >= T ('gate'); its state is then frozen. For
'kl' and 'entropy' p_n is read out through coda + ln_f + head after every iteration (the coda's applications
are part of each iteration) and a token's output is that of its exit iteration; otherwise the coda runs
once after the loop. KV rule ("latest entry"): at iteration n, a token that stopped after m < n iterations
contributes the key/value it produced at iteration m for the same block application; in the cache its
slots of iterations m+1..num_loops hold copies of those entries.

Padded batches: a 2-D ``attention_mask`` (1 = real token, over the cached and new positions, as generate()
passes it) masks pad keys out (a pad query sees itself, so no row is empty), positions default to the real
tokens before each one (cumsum(mask) - 1, 0 at leading pads; generate() passes the same ``position_ids``),
and with an exit criterion pad positions count as exited before the first iteration, so each real token's
logits equal its row's alone.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_loop_gpt import LoopGPTConfig

# transformers >= 5.2x names the cache `cache` (kwarg and output field; `past_key_values` is a deprecated
# alias); earlier 5.x used `past_key_values`. Accept both on the way in, write the current name on the way out.
_CACHE_FIELD = "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


class LoopGPTAttention(nn.Module):
    """Causal multi-head self-attention; `qkv` is nn.Linear with output rows [q; k; v]."""

    def __init__(self, config: LoopGPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_pdrop = config.attn_pdrop

    def forward(self, x, mask, past_key_values: Optional[Cache], layer_idx: int):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, layer_idx)
        dropout_p = self.attn_pdrop if self.training else 0.0
        if isinstance(mask, str):  # "causal": no cache offset, no padding
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=T > 1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class LoopGPTMLP(nn.Module):
    def __init__(self, config: LoopGPTConfig):
        super().__init__()
        inner = config.n_inner or 4 * config.n_embd
        self.fc = nn.Linear(config.n_embd, inner)
        self.proj = nn.Linear(inner, config.n_embd)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class LoopGPTBlock(nn.Module):
    """Pre-LayerNorm GPT-2 block."""

    def __init__(self, config: LoopGPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = LoopGPTAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = LoopGPTMLP(config)
        self.drop = nn.Dropout(config.resid_pdrop)

    def forward(self, x, mask, past_key_values, layer_idx):
        x = x + self.drop(self.attn(self.ln_1(x), mask, past_key_values, layer_idx))
        return x + self.drop(self.mlp(self.ln_2(x)))


class LoopGPTLinearInjection(nn.Module):
    """u = W [s ; e] (W: 2d -> d, no bias)."""

    def __init__(self, config: LoopGPTConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.cat([torch.eye(config.n_embd)] * 2, dim=1))

    def forward(self, s, e):
        return F.linear(torch.cat([s, e], dim=-1), self.weight)


class LoopGPTDiagonalInjection(nn.Module):
    """A * s + B * e with A = exp(-softplus(delta) * softplus(rate)) in (0, 1) and B = input_gain."""

    def __init__(self, config: LoopGPTConfig):
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(1))
        self.rate = nn.Parameter(torch.zeros(config.n_embd))
        self.input_gain = nn.Parameter(torch.zeros(config.n_embd))

    def forward(self, s, e):
        return torch.exp(-F.softplus(self.delta) * F.softplus(self.rate)) * s + self.input_gain * e


class LoopGPTLoop(nn.Module):
    """The shared blocks, the per-iteration gates ([G, d] 'vector', [G, 1] 'scalar'; G = loop_gate_count or
    num_loops) and the injection's parameters."""

    def __init__(self, config: LoopGPTConfig):
        super().__init__()
        self.blocks = nn.ModuleList([LoopGPTBlock(config) for _ in range(config.n_layer)])
        gate_count = config.loop_gate_count or config.num_loops
        if config.loop_gates == "vector":
            self.gates = nn.Parameter(torch.ones(gate_count, config.n_embd))
        elif config.loop_gates == "scalar":
            self.gates = nn.Parameter(torch.ones(gate_count, 1))
        else:
            self.register_parameter("gates", None)
        if config.loop_injection == "linear":
            self.injection = LoopGPTLinearInjection(config)
        elif config.loop_injection == "diagonal":
            self.injection = LoopGPTDiagonalInjection(config)
        else:
            self.injection = None


class LoopGPTExitGate(nn.Module):
    """lambda = sigmoid(w . LayerNorm(s) + b): the probability of stopping after an iteration."""

    def __init__(self, config: LoopGPTConfig):
        super().__init__()
        self.norm = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.proj = nn.Linear(config.n_embd, 1)

    def forward(self, s):
        return torch.sigmoid(self.proj(self.norm(s)).squeeze(-1).float())


class _LatestEntryCache:
    """The KV rule in front of the real cache (or none): tokens no longer active contribute, per application
    of the iteration, the key/value of their last active iteration."""

    def __init__(self, cache):
        self.cache, self.latest, self.active, self.index = cache, [], None, 0

    def start_iteration(self, active):
        self.active, self.index = active[:, None, :, None], 0

    def update(self, k, v, layer_idx, *args, **kwargs):
        j = self.index
        self.index += 1
        if j < len(self.latest):
            k = torch.where(self.active, k, self.latest[j][0])
            v = torch.where(self.active, v, self.latest[j][1])
            self.latest[j] = (k, v)
        else:
            self.latest.append((k, v))
        return self.cache.update(k, v, layer_idx) if self.cache is not None else (k, v)

    def fill(self, first_slot):
        if self.cache is not None:
            for j, (k, v) in enumerate(self.latest):
                self.cache.update(k, v, first_slot + j)


class LoopGPTPreTrainedModel(PreTrainedModel):
    config_class = LoopGPTConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = False
    _no_split_modules = ["LoopGPTBlock"]
    _skip_keys_device_placement = ["past_key_values"]

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, LoopGPTLoop) and module.gates is not None:
            init.ones_(module.gates)
        if isinstance(module, LoopGPTLinearInjection):
            d = module.weight.shape[0]
            init.copy_(module.weight, torch.cat([torch.eye(d)] * 2, dim=1))
        if isinstance(module, LoopGPTDiagonalInjection):  # A = 1/2, B = 1/2 (as loop_megatron initialises)
            init.constant_(module.delta, 0.5413248546129181)  # log(e - 1): softplus = 1
            init.zeros_(module.rate)
            init.constant_(module.input_gain, 0.5)
        if isinstance(module, LoopGPTExitGate):  # lambda = 1/2 at the start (as loop_megatron initialises)
            init.zeros_(module.proj.weight)
            init.zeros_(module.proj.bias)


class LoopGPTModel(LoopGPTPreTrainedModel):
    def __init__(self, config: LoopGPTConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.prelude = nn.ModuleList([LoopGPTBlock(config) for _ in range(config.prelude_layers)])
        self.loop = LoopGPTLoop(config)
        self.coda = nn.ModuleList([LoopGPTBlock(config) for _ in range(config.coda_layers)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.exit_gate = LoopGPTExitGate(config) if config.exit_gate else None
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, new_embeddings):
        self.wte = new_embeddings

    @staticmethod
    def _mask(attention_mask, batch, T, past, device):
        """'causal' when plain causal attention suffices, else a bool mask [B or 1, 1, T, past + T]."""
        if attention_mask is not None and attention_mask.ndim == 2 and bool(attention_mask.all()):
            attention_mask = None
        if attention_mask is None and past == 0:
            return "causal"
        S = past + T
        if attention_mask is None and T == 1:
            return None
        rows = torch.arange(past, S, device=device)[:, None]
        cols = torch.arange(S, device=device)[None, :]
        mask = (cols <= rows)[None, None]  # [1, 1, T, S]
        if attention_mask is not None:
            if attention_mask.ndim == 4:
                return attention_mask if attention_mask.dtype == torch.bool else attention_mask >= 0
            keep = attention_mask[:, None, None, -S:].to(torch.bool)
            # A padded query would see no key at all (NaN); let it see itself.
            mask = (mask & keep) | (cols == rows)[None, None]
        return mask

    def _initial_state(self, e, state_generator):
        init_kind = self.config.loop_state_init
        if init_kind == "input":
            return e
        if init_kind == "random" and state_generator is not None:
            noise = torch.randn(e.shape, generator=state_generator, device=state_generator.device, dtype=e.dtype)
            return noise.to(e.device) * self.config.loop_state_std
        return torch.zeros_like(e)

    def _iteration(self, x, e, n, mask, cache, slot):
        """One outer iteration s -> s' (the equations in the module docstring)."""
        gates, injection, kind = self.loop.gates, self.loop.injection, self.config.loop_injection
        u = x + e if kind == "add" else injection(x, e) if kind == "linear" else x
        h = u
        for block in self.loop.blocks:
            for _ in range(self.config.inner_loops):
                h = block(h, mask, cache, slot)
                slot += 1
        a = None if gates is None else gates[min(n, gates.shape[0] - 1)]
        if kind == "diagonal":
            return injection(x, e) + (h - u if a is None else a * (h - u))
        return h if a is None else x + a * (h - x)

    def _adaptive(self, x, e, mask, cache, slot, num_loops, criterion, threshold, real=None):
        """The loop with per-token exits; returns the final hidden states (ln_f applied) of each token.
        `real` [B, T] (bool) marks the non-pad tokens; pads count as exited from the start."""
        decodes = criterion in ("kl", "entropy")
        core = len(self.loop.blocks) * self.config.inner_loops
        per_iteration = core + (len(self.coda) if decodes else 0)
        B, T = x.shape[:2]
        if real is None:
            active = torch.ones(B, T, dtype=torch.bool, device=x.device)
        else:
            active = real.to(device=x.device, dtype=torch.bool).clone()
        view = _LatestEntryCache(cache)
        out = prev = None
        survive = torch.ones(B, T, dtype=torch.float32, device=x.device)
        for n in range(num_loops):
            first = slot + n * per_iteration
            view.start_iteration(active)
            x = torch.where(active[..., None], self._iteration(x, e, n, mask, view, first), x)
            if decodes:
                h = x
                for i, block in enumerate(self.coda):
                    h = block(h, mask, view, first + core + i)
                h = self.ln_f(h)
                out = h if out is None else torch.where(active[..., None], h, out)
                log_p = F.log_softmax(F.linear(h, self.wte.weight).float(), dim=-1)
                if criterion == "entropy":
                    stop = -(log_p.exp() * log_p).sum(-1) < threshold
                elif prev is None:
                    stop = torch.zeros_like(active)
                else:
                    stop = (log_p.exp() * (log_p - prev)).sum(-1) < threshold
                prev = log_p
            else:
                survive = survive * (1 - self.exit_gate(x))
                stop = (1 - survive) >= threshold
            if n == num_loops - 1:
                break
            active = active & ~stop
            if not bool(active.any()):
                for later in range(n + 1, num_loops):
                    view.fill(slot + later * per_iteration)
                break
        if decodes:
            return out
        slot += num_loops * per_iteration
        for block in self.coda:
            x = block(x, mask, cache, slot)
            slot += 1
        return self.ln_f(x)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, num_loops: Optional[int] = None,
                state_generator: Optional[torch.Generator] = None, cache=None,
                exit_criterion: Optional[str] = None, exit_threshold: Optional[float] = None, **kwargs):
        past_key_values = cache if cache is not None else past_key_values
        criterion = exit_criterion or self.config.exit_criterion
        threshold = self.config.exit_threshold if exit_threshold is None else float(exit_threshold)
        if criterion not in ("none", "kl", "entropy", "gate"):
            raise ValueError(f"exit_criterion must be 'none', 'kl', 'entropy' or 'gate', got {criterion!r}.")
        if criterion == "gate" and self.exit_gate is None:
            raise ValueError("exit_criterion 'gate' needs a model with an exit gate (config.exit_gate).")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Specify exactly one of input_ids or inputs_embeds.")
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        B, T = inputs_embeds.shape[:2]
        num_loops = num_loops or self.config.num_loops
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if not use_cache:
            past_key_values = None
        if past_key_values is not None:
            needed = self.config.applications(num_loops, criterion)
            layers = getattr(past_key_values, "layers", None)
            if layers is not None and getattr(past_key_values, "layer_class_to_replicate", None) is None:
                while len(layers) < needed:  # more loops than the config's: more applications to cache
                    layers.append(DynamicLayer())
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        padding = attention_mask is not None and attention_mask.ndim == 2 and not bool(attention_mask.all())
        if position_ids is None and padding:  # positions count real tokens only (0 at leading pads)
            seen = attention_mask[:, -(past + T):].long()
            position_ids = (seen.cumsum(-1) - 1).clamp(min=0)[:, -T:].to(inputs_embeds.device)
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=inputs_embeds.device)[None]
        if past + T > self.config.n_positions:
            raise ValueError(f"sequence of {past + T} tokens exceeds n_positions ({self.config.n_positions}).")
        mask = self._mask(attention_mask, B, T, past, inputs_embeds.device)
        x = self.drop(inputs_embeds + self.wpe(position_ids))

        slot = 0
        for block in self.prelude:
            x = block(x, mask, past_key_values, slot)
            slot += 1
        e = x
        x = self._initial_state(e, state_generator)
        if criterion != "none":
            real = attention_mask[:, -T:] if padding else None
            hidden = self._adaptive(x, e, mask, past_key_values, slot, num_loops, criterion, threshold, real)
            return BaseModelOutputWithPast(last_hidden_state=hidden, **{_CACHE_FIELD: past_key_values})
        for n in range(num_loops):
            x = self._iteration(x, e, n, mask, past_key_values, slot)
            slot += len(self.loop.blocks) * self.config.inner_loops
        for block in self.coda:
            x = block(x, mask, past_key_values, slot)
            slot += 1
        return BaseModelOutputWithPast(last_hidden_state=self.ln_f(x), **{_CACHE_FIELD: past_key_values})


class LoopGPTForCausalLM(LoopGPTPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: LoopGPTConfig):
        super().__init__(config)
        self.transformer = LoopGPTModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, new_embeddings):
        self.transformer.wte = new_embeddings

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, num_loops: Optional[int] = None,
                logits_to_keep=0, state_generator: Optional[torch.Generator] = None, cache=None,
                exit_criterion: Optional[str] = None, exit_threshold: Optional[float] = None, **kwargs):
        """`labels` are shifted inside (labels = input_ids for language modelling; -100 is ignored).
        `num_loops` overrides the number of loop iterations for this call (the cap with an exit criterion);
        `exit_criterion`/`exit_threshold` override the config's per-token exit; `state_generator` draws a
        'random' model's first state (default: zeros)."""
        out = self.transformer(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               past_key_values=cache if cache is not None else past_key_values,
                               inputs_embeds=inputs_embeds,
                               use_cache=use_cache, num_loops=num_loops, state_generator=state_generator,
                               exit_criterion=exit_criterion, exit_threshold=exit_threshold)
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1].float()
            shift_labels = labels[:, 1:].to(logits.device)
            loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: getattr(out, _CACHE_FIELD)})


__all__ = ["LoopGPTForCausalLM", "LoopGPTModel", "LoopGPTPreTrainedModel"]
