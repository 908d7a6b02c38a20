"""Hugging Face model of a Loop-Residual GPT (Ng & Wang, arXiv 2409.14199), for trust_remote_code.

This file is an adapter, not a model: `LoopGPTForCausalLM` wraps loop_megatron's own `LoopGPT` (model/gpt.py:
embeddings, prelude, the shared loop with its gates, injection, initial state and per-token exits, coda, the
tied head) and adds only what transformers needs around it:
  * config translation: the `LoopGPTConfig` fields become the package's `ModelConfig` (configuration_loop_gpt);
  * a cache adapter: transformers' `Cache` behind the package's KVCache interface, block application j of a
    forward being the cache's layer j (the shared blocks see a different state at every application, so each
    application keeps its own keys/values; more loops than the config's add layers);
  * the loss: labels shifted inside, as transformers' causal LMs do (-100 ignored).
The exporter (hf/remote_code.py) copies this file, configuration_loop_gpt.py and every package module they
import into the model folder, with the import lines flattened, so the folder loads with torch, numpy and
transformers alone. See the package README ("Hugging Face") for the equations and the exit rules.

forward()/generate() keyword arguments beyond transformers' own: `num_loops` (iterations; the cap with an
exit criterion), `exit_criterion` ('none', 'kl', 'entropy', 'gate', 'delta') and `exit_threshold` (default: the
config's), `state_generator` (a torch.Generator for a 'random' model's first state; without one that state is
0 at inference). Positions are always those the model derives from `attention_mask` (each token's count of
real tokens before it; generate() passes the same `position_ids`, and others are refused).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..model.depth import LoopDepth
from ..model.exit import ExitRule
from ..model.gpt import LoopGPT
from .configuration_loop_gpt import LoopGPTConfig

# transformers >= 5.2x names the cache `cache` (kwarg and output field; `past_key_values` is a deprecated
# alias); earlier 5.x used `past_key_values`. Accept both on the way in, write the current name on the way out.
_CACHE_FIELD = "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


class _ApplicationCache:
    """The package's KVCache interface (model/kv_cache.py) over a transformers Cache: the slots a forward
    writes take the cache's layers 0, 1, ... in the order it first writes them, which is the same order every
    forward (each slot is written once per forward with the default `kv_share` 'all', all the adapter offers)."""

    def __init__(self, cache: Cache, applications: int):
        layers = getattr(cache, "layers", None)
        if layers is not None and getattr(cache, "layer_class_to_replicate", None) is None:
            while len(layers) < applications:  # more loops than the config's: more applications to cache
                layers.append(DynamicLayer())
        self.cache = cache
        self.seq_len = cache.get_seq_length()
        self.cursor = 0
        self.layers = {}  # slot key -> layer index

    def begin(self) -> None:
        self.cursor = 0

    def update(self, k: torch.Tensor, v: torch.Tensor):
        key = self.cursor
        self.cursor += 1
        return self.write(key, k, v)

    def write(self, key, k: torch.Tensor, v: torch.Tensor):
        if key in self.layers:
            raise ValueError("the Hugging Face cache holds one entry per slot and forward (kv_share 'all').")
        self.layers[key] = len(self.layers)
        return self.cache.update(k, v, self.layers[key])

    def end(self, new_tokens: int) -> None:
        self.seq_len += new_tokens


def _expected_positions(attention_mask: Optional[torch.Tensor], past: int, T: int, device) -> torch.Tensor:
    """The positions LoopGPT gives the T new tokens (model/gpt.py `padding_masks`)."""
    if attention_mask is None or bool(attention_mask.all()):
        return torch.arange(past, past + T, device=device)[None]
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:].to(device)


class LoopGPTPreTrainedModel(PreTrainedModel):
    config_class = LoopGPTConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = False
    _no_split_modules = ["Block"]
    _skip_keys_device_placement = ["past_key_values"]
    # Exports made before the adapter stored the tied head separately; it is wte.
    _keys_to_ignore_on_load_unexpected = [r"lm_head\.weight"]

    @torch.no_grad()
    def _init_weights(self, module):
        """Nothing: LoopGPT initialises its own parameters (GPT-2's scaled init, gates at model.gate_init,
        injections and the exit gate at their operating points) when it is built."""


class LoopGPTForCausalLM(LoopGPTPreTrainedModel, GenerationMixin):
    """transformers' causal-LM interface over the package's LoopGPT (`self.transformer`)."""

    def __init__(self, config: LoopGPTConfig):
        super().__init__(config)
        self.transformer = LoopGPT(config.model_config())
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, new_embeddings):
        self.transformer.wte = new_embeddings

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, num_loops: Optional[int] = None,
                logits_to_keep=0, state_generator: Optional[torch.Generator] = None, cache=None,
                exit_criterion: Optional[str] = None, exit_threshold: Optional[float] = None, **kwargs):
        """`labels` are shifted inside (labels = input_ids for language modelling; -100 is ignored).
        `num_loops` overrides the number of loop iterations for this call (the cap with an exit criterion);
        `exit_criterion`/`exit_threshold` override the config's per-token exit; `state_generator` draws a
        'random' model's first state (default: zeros)."""
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("LoopGPT reads token ids: pass input_ids (inputs_embeds is not supported).")
        if attention_mask is not None and attention_mask.ndim != 2:
            raise ValueError(f"attention_mask must be [batch, keys] (1 = real token), got {attention_mask.ndim} "
                             f"dimensions.")
        criterion = exit_criterion or self.config.exit_criterion
        threshold = self.config.exit_threshold if exit_threshold is None else float(exit_threshold)
        num_loops = num_loops or self.config.num_loops
        past_key_values = cache if cache is not None else past_key_values
        if not (use_cache if use_cache is not None else self.config.use_cache):
            past_key_values = None
        elif past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        kv = None
        if past_key_values is not None:
            kv = _ApplicationCache(past_key_values, self.config.applications(num_loops, criterion))
        past, T = (kv.seq_len if kv is not None else 0), input_ids.shape[1]
        if attention_mask is not None and attention_mask.shape[1] > past + T:
            attention_mask = attention_mask[:, -(past + T):]
        if position_ids is not None:
            expected = _expected_positions(attention_mask, past, T, input_ids.device)
            real = torch.ones_like(position_ids, dtype=torch.bool) if attention_mask is None else \
                attention_mask[:, -T:].to(torch.bool)
            if not bool(((position_ids == expected) | ~real).all()):
                raise ValueError("position_ids differ from the positions LoopGPT derives from attention_mask "
                                 "(the count of real tokens before each one); pass attention_mask instead.")
        logits, _ = self.transformer(input_ids, depth=LoopDepth(num_loops, state_generator=state_generator),
                                     exit_rule=ExitRule(criterion, threshold), kv_cache=kv,
                                     attention_mask=attention_mask, return_logits=True)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            logits = logits[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            logits = logits[:, logits_to_keep]
        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1].float()
            shift_labels = labels[:, 1:].to(logits.device)
            loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: past_key_values})


__all__ = ["LoopGPTForCausalLM", "LoopGPTPreTrainedModel"]
