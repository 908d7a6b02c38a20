"""Engine checkpoints: collective save, resume, and consolidation of the weights to TP=1 fp32.

`save_engine_checkpoint` is called by every rank. It gathers every parameter's fp32 master and AdamW
moments (universal.py) and writes them, once, into `<save>/iter_XXXXXXX.tmp/universal/`, with model.pt
(the weights in the training dtype), meta.json (with the tokenizer record), the tokenizer file
(checkpoint/tokenizer.py) and each rank's RNG state; then rank 0 renames the folder to its final tag,
points `latest` at it and prunes beyond `keep_last`. A folder named iter_XXXXXXX is therefore always
complete. With a `BackgroundWriter` (training.async_save) the gathering is the only blocking part and
rank 0 writes in a thread (background.py). Why DeepSpeed's own shards are not written: DEEPSPEED_SHARDS
below. The save folder must be shared by all nodes (as DeepSpeed's own checkpointing requires).
`load_engine_checkpoint` restores the engine from DeepSpeed's shards (older checkpoints) and this rank's
RNG. Names and files: `layout.py`.

Write errors (disk full, I/O error, permission). Every write of a save goes through `_Writes.run`, which
records this rank's first OSError (or torch's own write failures: "basic_ios::clear", "unexpected pos",
"PytorchStreamWriter failed") instead of raising it, and skips the save's later writes; DeepSpeed's own
writes are routed through it too where it writes (its checkpoint engine's `save`/`makedirs` and the
recovery-script copy, for the duration of the save). So a rank whose write failed still takes part in every collective of the
save (DeepSpeed's barriers, the gathers of model.pt and universal/), and at three agreement points (after
the folder is made, after the writes, after the rename) one all-reduce of an error flag tells every rank whether any rank failed.
Then rank 0 deletes the temporary folder, `latest` stays on the last good checkpoint, and every rank
raises the same `CheckpointWriteError`: one sentence naming the failed path (and rank), the reason and
the last good checkpoint. (A background write has no agreement point after its writes: its failure
reaches every rank through `wait_for_background`.) Weights that are not finite are refused, and the
temporary folder removed, before model.pt, meta.json or any RNG file is written.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ..config import Config, data_parallel_size, global_batch_size
from ..model import full_state_dict
from ..utils import fs
from ..utils.distributed import barrier, rank, world_size
from .layout import (FORMAT, CheckpointError, latest_path, make_meta, meta_path, model_path, prune, read_latest,
                     rng_path, tag_for, temp_tag, tokenizer_path, write_latest, write_meta)
from .rng import restore_rng, save_rng
from .tokenizer import save_tokenizer, tokenizer_for


class _MasterWeightsView:
    """Presents a module whose state_dict() holds DeepSpeed's fp32 master copies of its parameters, so
    that `full_state_dict` (TP merge) can consolidate them like ordinary weights."""

    def __init__(self, module: torch.nn.Module, masters: Dict[str, torch.Tensor]):
        self.module, self.masters = module, masters

    def named_parameters(self):
        return self.module.named_parameters()

    def state_dict(self):
        sd = self.module.state_dict()
        return {name: self.masters.get(name, value) for name, value in sd.items()}


def consolidated_state_dict(engine, zero_stage: int) -> Dict[str, torch.Tensor]:
    """TP=1 fp32 state dict of engine.module. Collective over all ranks.

    fp32 training: the module's own parameters (gathered first under ZeRO-3). bf16/fp16 training: the
    optimizer's fp32 master weights (deepspeed.utils.safe_get_full_fp32_param), so model.pt is not
    rounded to 16 bits; where DeepSpeed keeps no master mapping (ZeRO-0 fp16) the 16-bit weights are
    upcast.
    """
    module = engine.module
    low_precision = any(p.dtype in (torch.bfloat16, torch.float16) for p in module.parameters())
    if low_precision:
        from deepspeed.utils import safe_get_full_fp32_param

        masters = {}
        needs_gather = []
        for name, p in module.named_parameters():  # same order on every rank: the calls are collective
            hp = safe_get_full_fp32_param(p)
            if hp is None:
                needs_gather.append(name)
            else:
                masters[name] = hp.detach().float()
        if not needs_gather:
            return full_state_dict(_MasterWeightsView(module, masters))
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return full_state_dict(module)
    return full_state_dict(module)


def run_layout(engine, cfg: Config) -> Dict[str, Any]:
    """How this run is laid out over ranks (recorded in meta.json and universal/state.json)."""
    t, tp = cfg.training, cfg.parallel.tensor_model_parallel_size
    dp = data_parallel_size(cfg, world_size())
    dtype = next(engine.module.parameters()).dtype
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
    return {"tensor_model_parallel_size": tp, "data_parallel_size": dp, "world_size": world_size(),
            "zero_stage": t.zero_stage, "cpu_offload": bool(t.cpu_offload), "precision": precision,
            "global_batch_size": global_batch_size(cfg, dp)}


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (disk full, I/O error, permission); its partial folder is gone."""


# torch.save's own messages when the bytes do not reach the disk (it raises RuntimeError, not OSError).
_TORCH_WRITE_FAILURES = ("basic_ios::clear", "iostream error", "unexpected pos", "PytorchStreamWriter failed",
                         "file write failed")


def is_write_error(exc: BaseException) -> bool:
    """An OSError, or torch.save's RuntimeError for a write that did not reach the disk."""
    return isinstance(exc, OSError) or (isinstance(exc, RuntimeError)
                                        and any(m in str(exc) for m in _TORCH_WRITE_FAILURES))


def _reason(path: str, exc: BaseException) -> str:
    """Why a write of `path` failed, in a few words."""
    if isinstance(exc, OSError) and exc.errno is not None:
        text = os.strerror(exc.errno)
    else:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if len(text) > 120:
            text = text[:117] + "..."
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    while folder and not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    try:
        free = shutil.disk_usage(folder or ".").free
    except OSError:
        free = None
    if free is not None and (getattr(exc, "errno", None) in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
                             or not isinstance(exc, OSError)):
        text += f"; {free / 2 ** 20:,.1f} MiB free on that disk"
    return text


class _Writes:
    """This rank's first write error during one save (see the module docstring). After it the save's later
    writes are skipped, but the rank keeps taking part in every collective."""

    def __init__(self):
        self.failed: Optional[Tuple[str, BaseException]] = None

    def run(self, _path: str, _fn: Callable, *args, **kwargs):
        """_fn(*args, **kwargs), the write of `_path`; a write error is recorded, not raised."""
        if self.failed is not None:
            return None
        try:
            return _fn(*args, **kwargs)
        except Exception as exc:
            if not is_write_error(exc):
                raise
            self.failed = (_path, exc)
            return None

    def describe(self) -> Optional[str]:
        if self.failed is None:
            return None
        path, exc = self.failed
        return f"{path}: {_reason(path, exc)}"

    @contextlib.contextmanager
    def around_deepspeed(self, engine):
        """Route DeepSpeed's writes of this save through `run` (its checkpoint engine's save/makedirs and
        the recovery-script copy), restoring the originals afterwards."""
        targets = [(getattr(engine, "checkpoint_engine", None), "save", 1),
                   (getattr(engine, "checkpoint_engine", None), "makedirs", 0),
                   (engine, "_copy_recovery_script", 0)]
        patched = []
        for obj, name, path_arg in targets:
            fn = getattr(obj, name, None) if obj is not None else None
            if fn is None or not callable(fn):
                continue
            had_own = name in getattr(obj, "__dict__", {})

            def wrapper(*args, __fn=fn, __i=path_arg, **kwargs):
                path = str(args[__i]) if len(args) > __i else str(kwargs.get("path", "a DeepSpeed checkpoint file"))
                return self.run(path, __fn, *args, **kwargs)

            setattr(obj, name, wrapper)
            patched.append((obj, name, had_own, fn))
        try:
            yield
        finally:
            for obj, name, had_own, fn in patched:
                if had_own:
                    setattr(obj, name, fn)
                else:
                    delattr(obj, name)


def _comm_device():
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _failures(writes: _Writes) -> List[Tuple[int, str]]:
    """[(rank, "path: reason")] of every rank whose write failed: the same list on every rank (collective)."""
    import torch.distributed as dist

    mine = writes.describe()
    if world_size() == 1:
        return [(0, mine)] if mine else []
    flag = torch.tensor([0.0 if mine is None else 1.0], device=_comm_device())
    dist.all_reduce(flag)
    if float(flag.item()) == 0:
        return []
    messages: List[Optional[str]] = [None] * world_size()
    dist.all_gather_object(messages, mine)
    return [(r, m) for r, m in enumerate(messages) if m]


def last_good_checkpoint(save: str) -> str:
    """The folder `latest` names in `save`, or a few words saying there is none."""
    tag = read_latest(save) if os.path.isdir(save) else None
    if tag and os.path.isfile(meta_path(os.path.join(save, tag))):
        return os.path.join(save, tag)
    return f"none ({save} holds no complete checkpoint)"


def nonfinite_tensors(state: Dict[str, torch.Tensor]) -> List[str]:
    """Names of the floating-point tensors of `state` holding NaN or inf."""
    return [name for name, t in state.items()
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())]


# Which files are the one copy of the training state (format 2). universal/ holds the only copy of the
# fp32 masters and AdamW moments (one file per full TP=1 parameter), model.pt the weights in the training
# dtype (what tools, --init-from and the Hugging Face export read), rng/ each rank's RNG, meta.json the
# rest (schedule, counters, config). DeepSpeed's own shards are not written: a same-layout resume loads
# universal/ exactly as another layout does (masters and moments are set bit for bit, the per-rank RNG is
# restored) and is bit-exact, so the shards would only be a second copy of the optimizer state and the
# weights. The other way round (keep DeepSpeed's shards, derive universal/ on load from another layout)
# would need the shards of the saved layout read and re-partitioned offline, and the save would still hold
# DeepSpeed's module file as a second copy of the weights. Where universal/ cannot be written (its
# `unsupported_reason`: a frozen parameter, an optimizer without per-parameter masters) the save falls
# back to DeepSpeed's shards, resumable on the saved layout only. Old checkpoints (DeepSpeed's shards plus
# universal/) still load: their shards on the saved layout, universal/ on another.
DEEPSPEED_SHARDS: Optional[bool] = None
"""Write DeepSpeed's shards? None (default): only where universal/ cannot be written. True: beside
universal/ as every save before format 2 did (bench/checkpoint_bench.py's "before", tests of old checkpoints)."""


def wait_for_background(writer) -> None:
    """Collective: rank 0 waits for its pending background write (checkpoint/background.py); when that
    failed, every rank raises its CheckpointWriteError sentence. A no-op without a writer."""
    if writer is None:
        return
    writer.join()
    message = writer.take_failure()
    if world_size() > 1:
        import torch.distributed as dist

        box = [message]
        dist.broadcast_object_list(box, src=0, device=_comm_device())
        message = box[0]
    if message:
        raise CheckpointWriteError(message)


def _write_failure(iteration: int, where: str, tmp_dir: str, save: str, background: bool = False) -> str:
    return (f"could not write the checkpoint of iteration {iteration}{' in the background' if background else ''} "
            f"({where}); its partial folder {tmp_dir} was removed and the last good checkpoint is "
            f"{last_good_checkpoint(save)}.")


def _training_meta(engine, cfg: Config, iteration: int, consumed_samples: int, layout: Dict[str, Any],
                   universal: bool) -> Dict[str, Any]:
    """meta.json of this save (a snapshot of the engine's counters and schedule now)."""
    import copy

    meta = make_meta(cfg.to_dict(), iteration, consumed_samples, cfg.parallel.tensor_model_parallel_size,
                     cfg.training.zero_stage, world_size())
    meta.update({k: layout[k] for k in ("global_batch_size", "cpu_offload", "precision")}, universal=universal)
    scheduler = getattr(engine, "lr_scheduler", None)
    if scheduler is not None:  # the schedule's position, for a resume that skips the optimizer state
        meta["lr_scheduler"] = copy.deepcopy(scheduler.state_dict())
    return meta


def _refuse_nonfinite(bad: List[str], total: int, iteration: int, save: str) -> None:
    if bad:
        raise CheckpointError(
            f"iteration {iteration}: the weights hold NaN/inf values ({len(bad)} of {total} tensors, "
            f"e.g. {bad[0]}), so no checkpoint was written to {save}; the last good checkpoint is "
            f"{last_good_checkpoint(save)}.")


def save_engine_checkpoint(engine, cfg: Config, iteration: int, consumed_samples: int, writer=None) -> str:
    """Save on every rank (collective). Returns the final checkpoint folder.

    With `writer` (a checkpoint.background.BackgroundWriter on every rank, training.async_save) only the
    snapshot is taken here and rank 0's writes finish in the background: the folder is the final one
    once they complete. The previous background write is waited for first.

    Raises CheckpointWriteError (every rank, the same sentence) when a write failed on any rank (or the
    previous background write failed), and CheckpointError when the weights are not finite (nothing
    kept then)."""
    from . import universal as uni

    save = cfg.training.save
    tag = tag_for(iteration)
    tmp_tag = temp_tag(tag)
    final_dir, tmp_dir = os.path.join(save, tag), os.path.join(save, tmp_tag)
    wait_for_background(writer)  # before this save's temporary folder exists: the last job prunes stale ones
    shards = DEEPSPEED_SHARDS if DEEPSPEED_SHARDS is not None else not uni.supported(engine)
    writes = _Writes()
    failed: List[Tuple[int, str]] = []
    if rank() == 0:
        writes.run(save, os.makedirs, save, exist_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)
        writes.run(tmp_dir, os.makedirs, tmp_dir, exist_ok=True)
    failed = _failures(writes)
    job = None
    if not failed and shards:
        _save_with_deepspeed_shards(engine, cfg, iteration, consumed_samples, writes, save, tmp_dir, tmp_tag)
        failed = _failures(writes)  # in place of a barrier: every rank learns whether any rank failed
    elif not failed:
        job = _snapshot(engine, cfg, iteration, consumed_samples, writes, save, tmp_dir,
                        background=writer is not None)
        failed = _failures(writes)
    if not failed:
        background = writer is not None and not shards  # the same on every rank
        if rank() == 0:
            if background:
                writer.submit(tag, lambda: job(writes, writer))
            elif job is not None:
                job(writes, None)
            else:
                _finish(writes, save, tag, tmp_dir, final_dir, cfg.training.keep_last)
        if background:
            return final_dir
        failed = _failures(writes)
    if failed:
        if rank() == 0:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        barrier()
        where = "; ".join(m if world_size() == 1 else f"rank {r}: {m}" for r, m in failed[:3])
        more = f" (and {len(failed) - 3} more ranks)" if len(failed) > 3 else ""
        raise CheckpointWriteError(_write_failure(iteration, where + more, tmp_dir, save))
    return final_dir


def _finish(writes: _Writes, save: str, tag: str, tmp_dir: str, final_dir: str, keep_last: int) -> None:
    """Rank 0, after every file of the save is written: rename the folder to its tag, point `latest` at it
    (fsynced), prune."""
    writes.run(final_dir, fs.replace_dir, tmp_dir, final_dir)
    writes.run(save, fs.fsync_path, save)  # the rename itself on disk before `latest` names it
    writes.run(latest_path(save), write_latest, save, tag, fsync=True)
    if writes.failed is None:
        prune(save, keep_last, keep=tag)


def _save_with_deepspeed_shards(engine, cfg: Config, iteration: int, consumed_samples: int, writes: _Writes,
                                save: str, tmp_dir: str, tmp_tag: str) -> None:
    """The save of DeepSpeed's own shards (see DEEPSPEED_SHARDS): model.pt in fp32, DeepSpeed's files, and
    universal/ where it can be written. Every rank; blocking."""
    from .universal import save_universal

    # Weights first (collective), so a non-finite state is refused before anything is written.
    state = consolidated_state_dict(engine, cfg.training.zero_stage)
    _refuse_nonfinite(nonfinite_tensors(state), len(state), iteration, save)  # same full state everywhere
    client_state = {"iteration": iteration, "consumed_samples": consumed_samples, "format": FORMAT}
    with writes.around_deepspeed(engine):
        writes.run(tmp_dir, engine.save_checkpoint, save, tag=tmp_tag, client_state=client_state,
                   save_latest=False)
    writes.run(rng_path(tmp_dir, rank()), save_rng, tmp_dir, rank())
    if rank() == 0:
        writes.run(model_path(tmp_dir), fs.torch_save, state, model_path(tmp_dir))
    del state
    layout = run_layout(engine, cfg)
    universal = save_universal(engine, tmp_dir, iteration=iteration, consumed_samples=consumed_samples,
                               global_batch_size=layout["global_batch_size"], seed=cfg.training.seed,
                               layout=layout, run_write=writes.run)
    if rank() == 0:
        meta = _training_meta(engine, cfg, iteration, consumed_samples, layout, universal)
        meta["tokenizer"] = writes.run(tokenizer_path(tmp_dir), save_tokenizer, tmp_dir, tokenizer_for(cfg),
                                       fsync=True)
        writes.run(meta_path(tmp_dir), write_meta, tmp_dir, meta, fsync=True, trailing_newline=True)


def _snapshot(engine, cfg: Config, iteration: int, consumed_samples: int, writes: _Writes, save: str,
              tmp_dir: str, background: bool) -> Optional[Callable]:
    """The save of format 2 (see DEEPSPEED_SHARDS), every rank: gather masters and moments (collective) and
    write this rank's RNG file. Blocking (`background` False): rank 0 writes each parameter's file as it
    is gathered (memory: one parameter). Background: rank 0 keeps them all in CPU memory (12 bytes per
    parameter, plus model.pt's weights) for the job. Returns rank 0's job(writes, writer) that writes the
    rest and finishes the folder (None on other ranks); the job returns a failure sentence or None."""
    from . import universal as uni

    module = engine.module
    dtype = next(module.parameters()).dtype  # the training dtype: model.pt holds the weights as trained
    is_writer = rank() == 0
    layout = run_layout(engine, cfg)
    entries, bad, kept, weights = [], [], [], {}
    for name, full in uni.gather_universal(engine):
        entries.append({"name": name, "shape": list(full[uni.MASTER].shape)})
        if not bool(torch.isfinite(full[uni.MASTER]).all()):  # every rank holds the full tensor: all agree
            bad.append(name)
        if is_writer and not bad:
            weights[name] = full[uni.MASTER].to(dtype)
            if background:
                kept.append((name, full))
            else:
                writes.run(uni.param_path(tmp_dir, name), uni.write_param, tmp_dir, name, full, fsync=True)
        del full
    if bad:
        if is_writer:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        _refuse_nonfinite(bad, len(entries), iteration, save)
    writes.run(rng_path(tmp_dir, rank()), save_rng, tmp_dir, rank(), fsync=True)
    if not is_writer:
        return None
    for name, tensor in module.state_dict().items():  # buffers, if any (neither sharded nor partitioned)
        if name not in weights:
            weights[name] = tensor.detach().cpu().clone()
    weights = {name: weights[name] for name in module.state_dict()}  # the module's order
    state = uni.universal_state(engine, iteration=iteration, consumed_samples=consumed_samples,
                                global_batch_size=layout["global_batch_size"], seed=cfg.training.seed,
                                layout=layout, params=entries)
    meta = _training_meta(engine, cfg, iteration, consumed_samples, layout, True)
    meta["weights_dtype"] = str(dtype).replace("torch.", "")
    tokenizer = tokenizer_for(cfg)
    tag, keep_last = os.path.basename(tmp_dir)[:-len(".tmp")], cfg.training.keep_last
    final_dir = os.path.join(save, tag)

    def job(writes: _Writes, writer) -> Optional[str]:
        def run(path, fn, *args, **kwargs):
            if writer is not None:
                writer.sleep()
            return writes.run(path, fn, *args, **kwargs)

        while kept:
            name, full = kept.pop(0)  # freed as written
            run(uni.param_path(tmp_dir, name), uni.write_param, tmp_dir, name, full, fsync=True)
        run(model_path(tmp_dir), fs.torch_save, weights, model_path(tmp_dir), fsync=True)
        run(uni.state_path(tmp_dir), uni.write_state, tmp_dir, state, fsync=True)
        meta["tokenizer"] = run(tokenizer_path(tmp_dir), save_tokenizer, tmp_dir, tokenizer, fsync=True)
        run(meta_path(tmp_dir), write_meta, tmp_dir, meta, fsync=True, trailing_newline=True)
        if writes.failed is None:
            _finish(writes, save, tag, tmp_dir, final_dir, keep_last)
        if writes.failed is None:
            return None
        shutil.rmtree(tmp_dir, ignore_errors=True)
        return _write_failure(iteration, writes.describe(), tmp_dir, save, background=writer is not None)

    return job


def load_engine_checkpoint(engine, load: str, tag: str, rng: bool = True) -> Dict[str, Any]:
    """Restore engine (weights, optimizer, LR schedule) and, with `rng`, this rank's RNG; return the client
    state."""
    path, client_state = engine.load_checkpoint(load, tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {os.path.join(load, tag)}.")
    if rng:
        restore_rng(os.path.join(load, tag), rank())
    barrier()
    return client_state or {}
