"""The topology-free training state written into every checkpoint, and resuming from it on any layout.

Each checkpoint folder holds a `universal/` folder, the checkpoint's one copy of the optimizer state
(checkpoints written before it was also held DeepSpeed's layout-specific shards; engine.DEEPSPEED_SHARDS):

    universal/state.json           iteration, consumed samples, global batch size, optimizer step count,
                                   LR-schedule state, seed, AdamW hyperparameters per group, and the
                                   parameter list (name, full shape) in the model's order
    universal/params/<name>.pt     per full parameter: {"fp32": master weight, "exp_avg", "exp_avg_sq"},
                                   fp32, TP merged (same TP<->full mapping as model.pt), ZeRO gathered

Vocabulary padding rows stay in: the tensors have `model.padded_vocab_size` rows, exactly like model.pt
(the padding depends only on vocab_size and make_vocab_size_divisible_by, both shape fields, never on
the TP size). The loop-depth sampler and the data order are functions of (seed, iteration), so the
iteration is their whole position.

Writing (`save_universal`, collective): for one parameter at a time, in the same order on every rank,
DeepSpeed's tensor-fragment API gathers the full fp32 master and moments over the data-parallel group
(ZeRO-1/2/3, bf16; at ZeRO-0 the torch optimizer's own state is read, for 16-bit weights through the
fp32 copies of DeepSpeed's FP16_(Unfused)Optimizer wrapper, which bf16 ZeRO-0 also uses), the TP shards are merged over
the TP group, and global rank 0 writes one file. Peak extra memory, on every rank (the gathers are
all-reduce/all-gather, so every rank receives the result): the three full fp32 tensors of the one
parameter being written, plus the gather buffers of the tensor being merged (its DP-whole TP shard and
the TP parts: about two more full copies), so at most ~5 x 4 bytes x the largest parameter's elements
(for GPT-2 small's 50304 x 768 embedding: ~0.8 GB); never the whole model. Files go into the checkpoint's temporary folder, which is renamed only when whole.

Reading, on the saved layout or another (TP size, DP/world size, ZeRO stage, CPU offload or precision):
`load_universal_weights` puts each rank's TP shard of the masters into the model before
`deepspeed.initialize` (so DeepSpeed's fp32 masters start exact), and `load_universal_optimizer` then
creates the optimizer state, sets every rank's ZeRO partition of master and moments from the full tensors
(`safe_set_full_*`, or optimizer.state at ZeRO-0), the step count, the LR-schedule position and the
engine counters (and fp16's loss scale), and reseeds the RNGs from (seed, iteration) because per-rank RNG
states do not map across layouts; on the saved layout the trainer then restores each rank's own RNG state,
which makes that resume bit-exact (every value the optimizer holds is set exactly).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch

from ..errors import LoopMegatronError
from ..model import merge_tp_tensor, shard_tp_tensor
from ..utils import fs
from ..utils.distributed import barrier, rank

UNIVERSAL_DIR = "universal"
STATE_FILE = "state.json"
PARAMS_DIR = "params"
FORMAT = "loop_megatron-universal"
VERSION = 1
MASTER = "fp32"
MOMENTS = ("exp_avg", "exp_avg_sq")
KEYS = (MASTER,) + MOMENTS


class UniversalError(LoopMegatronError):
    """The universal state of a checkpoint is missing, incomplete or does not fit the model."""


# ----------------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------------
def universal_dir(folder: str) -> str:
    return os.path.join(folder, UNIVERSAL_DIR)


def state_path(folder: str) -> str:
    return os.path.join(folder, UNIVERSAL_DIR, STATE_FILE)


def param_path(folder: str, name: str) -> str:
    return os.path.join(folder, UNIVERSAL_DIR, PARAMS_DIR, f"{name}.pt")


def has_universal(folder: str) -> bool:
    return os.path.isfile(state_path(folder))


def read_state(folder: str) -> Dict[str, Any]:
    """universal/state.json of a tag folder (UniversalError naming the file when absent or not ours)."""
    import json

    path = state_path(folder)
    if not os.path.isfile(path):
        raise UniversalError(f"{path}: missing; the checkpoint has no universal state.")
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except json.JSONDecodeError as exc:
        raise UniversalError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}).") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UniversalError(f"{path}: not a loop_megatron universal state (format "
                             f"{state.get('format') if isinstance(state, dict) else None!r}).")
    return state


def check_complete(folder: str) -> Dict[str, Any]:
    """The state, after checking every parameter file it lists exists (UniversalError naming the first
    missing one otherwise)."""
    state = read_state(folder)
    for entry in state.get("params", []):
        path = param_path(folder, entry["name"])
        if not os.path.isfile(path):
            raise UniversalError(f"{path}: missing; the universal state is incomplete (parameter "
                                 f"{entry['name']!r} of {len(state['params'])}).")
    return state


def read_param(folder: str, name: str) -> Dict[str, torch.Tensor]:
    """{"fp32", "exp_avg", "exp_avg_sq"} full tensors of one parameter (memory-mapped: only what is used
    is read)."""
    path = param_path(folder, name)
    if not os.path.isfile(path):
        raise UniversalError(f"{path}: missing; the universal state is incomplete (parameter {name!r}).")
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


# ----------------------------------------------------------------------------------------------------
# The optimizer underneath DeepSpeed
# ----------------------------------------------------------------------------------------------------
def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer that owns the AdamW state (inside DeepSpeed's ZeRO/bf16 wrapper, or the
    engine's optimizer itself at ZeRO-0 fp32)."""
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else opt


def _has_fragments(p: torch.Tensor) -> bool:
    """DeepSpeed keeps this parameter's master and moments in partitioned flat buffers (ZeRO-1/2/3, bf16)."""
    # A ZeRO-1/2 parameter outside this rank's partition has `_hp_mapping = None`: still managed (the
    # fragment calls contribute nothing for it and take part in the collective).
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


def _zero0_masters(engine) -> Dict[int, Tuple[torch.Tensor, int]]:
    """ZeRO-0 with 16-bit weights: id(module parameter) -> (the fp32 tensor its master lives in and its
    AdamW state is keyed by, element offset). DeepSpeed wraps the torch optimizer in FP16_UnfusedOptimizer
    (bf16 always, fp16 with a non-fused optimizer: one fp32 copy per parameter, `fp32_groups`) or
    FP16_Optimizer (fp16/bf16 with FusedAdam: one flat fp32 master per group, `fp32_groups_flat`, the
    parameters packed in order); both pair them with `fp16_groups`, the module's 16-bit parameters."""
    opt = engine.optimizer
    groups = getattr(opt, "fp16_groups", None)
    out: Dict[int, Tuple[torch.Tensor, int]] = {}
    if not groups:
        return out
    flats = getattr(opt, "fp32_groups_flat", None)
    if flats:
        for params, flat in zip(groups, flats):
            offset = 0
            for q in params:
                out[id(q)] = (flat, offset)
                offset += q.numel()
    elif getattr(opt, "fp32_groups", None):
        for params, masters in zip(groups, opt.fp32_groups):
            for q, m in zip(params, masters):
                out[id(q)] = (m, 0)
    return out


def _view(tensor: torch.Tensor, offset: int, p: torch.Tensor) -> torch.Tensor:
    """The piece of a (possibly flat) fp32 tensor that holds parameter `p`, in p's shape."""
    if tensor.shape == p.shape and offset == 0:
        return tensor
    return tensor.view(-1).narrow(0, offset, p.numel()).view(p.shape)


def unsupported_reason(engine) -> Optional[str]:
    """None when every parameter's fp32 master and moments are reachable: through DeepSpeed's fragment
    API (ZeRO-1/2/3, BF16_Optimizer), as the torch optimizer's own parameters (ZeRO-0 fp32), or through
    the ZeRO-0 16-bit wrapper's fp32 copies (`_zero0_masters`); else one clause saying which parameter
    is not and why."""
    own = {id(q) for g in base_optimizer(engine).param_groups for q in g["params"]}
    masters = _zero0_masters(engine)
    for name, p in engine.module.named_parameters():
        if _has_fragments(p) or id(p) in own or id(p) in masters:
            continue
        if not p.requires_grad:
            return f"parameter {name!r} is frozen, so the optimizer keeps no state for it"
        return (f"parameter {name!r} has no fp32 master that {type(engine.optimizer).__name__} exposes per "
                "parameter")
    return None


def supported(engine) -> bool:
    """Every parameter's master and moments are reachable (see `unsupported_reason`)."""
    return unsupported_reason(engine) is None


def _hp_tensors(engine) -> List[Tuple[Dict[str, Any], torch.Tensor]]:
    """(optimizer group, tensor the AdamW state is keyed by) for every state entry: DeepSpeed's flat fp32
    partitions (ZeRO-3 empties the groups' params between steps, so they are taken from the wrapper), or
    the torch optimizer's own parameters."""
    opt, base = engine.optimizer, base_optimizer(engine)
    flats = getattr(opt, "fp32_partitioned_groups_flat", None)  # ZeRO-3
    if flats is not None:
        return [(base.param_groups[opt.sub_group_to_group_id[i]], hp) for i, hp in enumerate(flats)]
    flats = getattr(opt, "single_partition_of_fp32_groups", None)  # ZeRO-1/2
    if flats is None:
        flats = getattr(opt, "fp32_groups_flat_partition", None)  # bf16 optimizer
    if flats is not None:
        return [(base.param_groups[i], hp) for i, hp in enumerate(flats)]
    return [(g, hp) for g in base.param_groups for hp in g["params"]]


def _state_ready(engine) -> bool:
    base = base_optimizer(engine)
    return all(len(base.state.get(hp, {})) > 0 for _, hp in _hp_tensors(engine))


def _link_fragments(engine) -> None:
    """(Re)point ZeRO-1/2 and bf16 fragments at the current optimizer-state tensors (DeepSpeed links them
    lazily after the first step; a loaded or freshly created state needs the link before get/set)."""
    opt = engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def _step_value(base: torch.optim.Optimizer, group: Dict[str, Any], hp: torch.Tensor, step: int):
    """The step count in the type this optimizer keeps it: a tensor for torch Adam/AdamW (on the device
    when fused/capturable), an int otherwise (DeepSpeedCPUAdam)."""
    if isinstance(base, (torch.optim.Adam, torch.optim.AdamW)):
        device = hp.device if (group.get("fused") or group.get("capturable")) else "cpu"
        return torch.tensor(float(step), dtype=torch.float32, device=device)
    return int(step)


def optimizer_step(engine) -> int:
    """Number of AdamW updates taken (0 before the first step)."""
    base = base_optimizer(engine)
    for g, hp in _hp_tensors(engine):
        st = base.state.get(hp)
        if st and "step" in st:
            return int(float(st["step"]))
        if "step" in g:
            return int(g["step"])
    return 0


def ensure_optimizer_state(engine, step: int) -> None:
    """Create zero moments wherever the optimizer has none yet (it creates them lazily at its first
    step), set every step count to `step`, and link DeepSpeed's fragments to the state."""
    base = base_optimizer(engine)
    for g, hp in _hp_tensors(engine):
        st = base.state[hp]
        for key in MOMENTS:
            if key not in st:
                st[key] = torch.zeros_like(hp, dtype=torch.float32)
        st["step"] = _step_value(base, g, hp, step)
        if "step" in g:
            g["step"] = int(step)
    _link_fragments(engine)


# ----------------------------------------------------------------------------------------------------
# Per-parameter gather and scatter
# ----------------------------------------------------------------------------------------------------
def _local_full(engine, p: torch.Tensor, key: str, ready: bool) -> torch.Tensor:
    """This TP rank's shard of `key` for `p`, whole over the DP group (collective under ZeRO)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if _has_fragments(p):
        if key == MASTER:
            return safe_get_full_fp32_param(p)
        if not ready:
            shape = p.ds_shape if hasattr(p, "ds_id") else p.shape
            return torch.zeros(shape, dtype=torch.float32, device=engine.device)
        return safe_get_full_optimizer_state(p, key)
    hp, offset = _zero0_masters(engine).get(id(p), (p, 0))
    if key == MASTER:
        return _view(hp, offset, p).detach()
    st = base_optimizer(engine).state.get(hp, {})
    return _view(st[key], offset, p) if key in st else torch.zeros_like(p, dtype=torch.float32)


def gather_parameter(engine, p: torch.Tensor) -> Dict[str, torch.Tensor]:
    """{"fp32", "exp_avg", "exp_avg_sq"} of parameter `p` as full TP=1 fp32 CPU tensors, on every rank.
    Collective over all ranks: call for the same parameters in the same order everywhere."""
    ready = _state_ready(engine)
    out = {}
    for key in KEYS:
        local = _local_full(engine, p, key, ready).detach().to(engine.device, torch.float32)
        out[key] = merge_tp_tensor(local, p).cpu().clone()
    return out


def _scatter_parameter(engine, p: torch.Tensor, full: Dict[str, torch.Tensor], name: str, keys: Iterable[str]) -> None:
    """Set this rank's partition of `keys` of `p` from the full TP=1 tensors (local copies, no collective)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    expected = tuple(p.ds_shape) if hasattr(p, "ds_id") else tuple(p.shape)
    for key in keys:
        shard = shard_tp_tensor(full[key], p)
        if tuple(shard.shape) != expected:
            raise UniversalError(f"universal state of {name!r}: shard shape {tuple(shard.shape)} does not match the "
                                 f"model's {expected}.")
        if _has_fragments(p):
            if key == MASTER:
                safe_set_full_fp32_param(p, shard)
            else:
                safe_set_full_optimizer_state(p, shard, key)
        else:
            hp, offset = _zero0_masters(engine).get(id(p), (p, 0))
            if key == MASTER:
                _view(hp, offset, p).copy_(shard)
                if hp is not p:  # ZeRO-0 16-bit: the module's weights are the master rounded
                    p.data.copy_(shard)
            else:
                _view(base_optimizer(engine).state[hp][key], offset, p).copy_(shard)


# ----------------------------------------------------------------------------------------------------
# Save and load
# ----------------------------------------------------------------------------------------------------
def _group_records(engine) -> List[Dict[str, Any]]:
    """AdamW hyperparameters of each optimizer group (decayed weights, then the no-decay names) for the
    record; a resumed run takes them from its own config."""
    groups = engine.optimizer.param_groups if hasattr(engine.optimizer, "param_groups") else []
    return [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()
             if k in ("lr", "weight_decay", "betas", "eps")} for g in groups]


def gather_universal(engine) -> Iterator[Tuple[str, Dict[str, torch.Tensor]]]:
    """(name, {"fp32", "exp_avg", "exp_avg_sq"} full TP=1 fp32 CPU tensors) of every parameter, one at a
    time in the model's order. Collective over all ranks (every rank receives every tensor): iterate it
    to the end on every rank. The caller must have checked `supported(engine)`."""
    _link_fragments(engine)
    for name, p in engine.module.named_parameters():  # one parameter at a time: bounded memory
        yield name, gather_parameter(engine, p)


LOSS_SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def loss_scaler_state(engine) -> Optional[Dict[str, Any]]:
    """fp16's dynamic loss scaler position (scale, iterations since the last overflow, hysteresis), which
    DeepSpeed's own optimizer file would otherwise carry; None without a loss scaler (fp32, bf16)."""
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if scaler is None:
        return None
    state = {}
    for key in LOSS_SCALER_FIELDS:
        value = getattr(scaler, key, None)
        if isinstance(value, torch.Tensor):
            value = value.item()
        if isinstance(value, (int, float)):
            state[key] = value
    return state or None


def _restore_loss_scaler(engine, state: Optional[Dict[str, Any]]) -> None:
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if scaler is None or not state:
        return
    for key, value in state.items():
        if key in LOSS_SCALER_FIELDS and hasattr(scaler, key):
            old = getattr(scaler, key)
            setattr(scaler, key, torch.tensor(value, dtype=old.dtype, device=old.device)
                    if isinstance(old, torch.Tensor) else type(old)(value))


def universal_state(engine, *, iteration: int, consumed_samples: int, global_batch_size: int, seed: int,
                    layout: Dict[str, Any], params: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The universal/state.json record of the engine's state now (a snapshot: later steps do not change
    it). `params` is [{"name", "shape"}] in the model's order."""
    import copy

    scheduler = getattr(engine, "lr_scheduler", None)
    return {
        "format": FORMAT, "version": VERSION, "iteration": int(iteration),
        "consumed_samples": int(consumed_samples), "global_batch_size": int(global_batch_size),
        "optimizer_step": optimizer_step(engine),
        "lr_scheduler": copy.deepcopy(scheduler.state_dict()) if scheduler is not None else None,
        "loss_scaler": loss_scaler_state(engine),
        "skipped_steps": int(getattr(engine, "skipped_steps", 0) or 0),
        "seed": int(seed),
        "data_position": "sample index = consumed_samples; the loop-depth sampler is a function of "
                         "(seed, iteration)",
        "vocab_padding": "kept (tensors have model.padded_vocab_size rows, as in model.pt)",
        "source_layout": layout,
        "param_groups": _group_records(engine),
        "params": params,
    }


def write_param(folder: str, name: str, full: Dict[str, torch.Tensor], fsync: bool = False) -> str:
    """universal/params/<name>.pt of one parameter (its folder made when missing)."""
    path = param_path(folder, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return fs.torch_save(full, path, fsync=fsync)


def write_state(folder: str, state: Dict[str, Any], fsync: bool = False) -> str:
    """universal/state.json."""
    return fs.write_json(state_path(folder), state, indent=1, trailing_newline=True, fsync=fsync)


def save_universal(engine, folder: str, *, iteration: int, consumed_samples: int, global_batch_size: int,
                   seed: int, layout: Dict[str, Any], run_write: Optional[Callable] = None) -> bool:
    """Write `folder/universal/` (collective; global rank 0 writes). False, and nothing written, when
    this engine's optimizer state cannot be reached per parameter (`unsupported_reason`). `run_write(path, fn,
    *args)` performs each write (the checkpoint writer passes one that records a write error instead of
    raising it, so rank 0 keeps joining the gathers; checkpoint/engine.py)."""
    if not supported(engine):
        return False
    run_write = run_write or (lambda _path, _fn, *args, **kwargs: _fn(*args, **kwargs))
    is_writer = rank() == 0
    entries = []
    for name, full in gather_universal(engine):
        entries.append({"name": name, "shape": list(full[MASTER].shape)})
        if is_writer:
            run_write(param_path(folder, name), write_param, folder, name, full)
        del full
    if is_writer:
        state = universal_state(engine, iteration=iteration, consumed_samples=consumed_samples,
                                global_batch_size=global_batch_size, seed=seed, layout=layout, params=entries)
        run_write(state_path(folder), write_state, folder, state)
    barrier()
    return True


def load_universal_weights(model: torch.nn.Module, folder: str) -> None:
    """Before deepspeed.initialize: copy this rank's TP shard of every fp32 master into `model`, one
    parameter at a time (every rank reads the files; nothing is communicated)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            full = read_param(folder, name)
            shard = shard_tp_tensor(full[MASTER], p)
            if tuple(shard.shape) != tuple(p.shape):
                raise UniversalError(f"{param_path(folder, name)}: shape {tuple(full[MASTER].shape)} does not fit "
                                     f"the model's parameter {name!r} (shard {tuple(p.shape)}).")
            p.copy_(shard)
            del full


def load_universal_optimizer(engine, folder: str) -> Dict[str, Any]:
    """After deepspeed.initialize: masters, moments, step count, LR-schedule position and engine counters
    from the universal state; RNGs reseeded from (seed, iteration). Returns {"iteration",
    "consumed_samples", ...} like DeepSpeed's client state. Every rank; no collective except a barrier."""
    from .rng import reseed

    state = read_state(folder)
    reason = unsupported_reason(engine)
    if reason is not None:
        raise UniversalError(f"{folder}: the universal state cannot be loaded into this run's optimizer "
                             f"({reason}).")
    ensure_optimizer_state(engine, int(state["optimizer_step"]))
    with torch.no_grad():
        for name, p in engine.module.named_parameters():
            full = read_param(folder, name)
            _scatter_parameter(engine, p, full, name, KEYS)
            del full
    scheduler = getattr(engine, "lr_scheduler", None)
    if scheduler is not None and state.get("lr_scheduler") is not None:
        scheduler.load_state_dict(state["lr_scheduler"])
    _restore_loss_scaler(engine, state.get("loss_scaler"))
    if "skipped_steps" in state and hasattr(engine, "skipped_steps"):
        engine.skipped_steps = int(state["skipped_steps"])
    engine.global_steps = int(state["iteration"])
    engine.global_samples = int(state["consumed_samples"])
    reseed(int(state["seed"]), int(state["iteration"]))
    barrier()
    return {"iteration": int(state["iteration"]), "consumed_samples": int(state["consumed_samples"]),
            "global_batch_size": int(state["global_batch_size"])}


def read_full_state(folder: str) -> Tuple[Dict[str, Any], Dict[str, Dict[str, torch.Tensor]]]:
    """(state.json, {name: {"fp32", "exp_avg", "exp_avg_sq"}}) of a whole universal folder, for tests and
    tools on small models (loads everything)."""
    state = check_complete(folder)
    return state, {e["name"]: {k: v.clone() for k, v in read_param(folder, e["name"]).items()}
                   for e in state["params"]}
