"""The training run: checks, DeepSpeed engine, step loop, evaluation, checkpoints, logging.

`pretrain(cfg, opts)` runs one whole training job on this process (one rank). Everything that can be
checked without building anything (config, data files, DeepSpeed JSON, precision, the checkpoint to
resume) is checked first, so a bad setting stops before torch.distributed, the model or DeepSpeed start.
"""
from __future__ import annotations

import collections
import math
import os
import signal
import time
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from ..config import Config, save_yaml
from ..model import LoopGPT, load_full_state_dict, model_summary
from ..parallel import (destroy_model_parallel, get_data_parallel_group, get_data_parallel_rank,
                        get_data_parallel_world_size, initialize_model_parallel, set_seed)
from . import checkpointing
from .arguments import RunOptions
from .data import EvalBatchSampler, TrainBatchSampler, build_datasets, check_data_paths, loader, split_inputs
from .distributed import device as current_device
from .distributed import env_world_size, init_distributed, rank, world_size
from .ds_config import adopt_ds_file_settings, resolve_precision
from .engine import build_engine
from .monitor import RunLogger, Throughput, peak_flops_per_device, progress_line, write_summary
from .optim import lr_at
from .step import train_step


# ----------------------------------------------------------------------------------------------------
# Checks before any heavy work
# ----------------------------------------------------------------------------------------------------
def preflight(cfg: Config, opts: RunOptions) -> Dict[str, Any]:
    """Raise ConfigError (one sentence) for anything that cannot work. Touches no process group."""
    world = dist.get_world_size() if dist.is_initialized() else env_world_size()
    ds_base = adopt_ds_file_settings(cfg, opts.explicit)
    cfg.validate(world)
    precision = resolve_precision(cfg)
    check_data_paths(cfg.data.data_path)
    resume = checkpointing.find_resume(cfg, world)
    init_from = checkpointing.find_init_from(cfg) if resume is None else None
    return {"world": world, "ds_base": ds_base, "precision": precision, "resume": resume, "init_from": init_from}


# ----------------------------------------------------------------------------------------------------
# Pieces of the loop
# ----------------------------------------------------------------------------------------------------
class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop finishes the step, saves and returns. A second signal of
    the same kind gets the default behaviour back (kill)."""

    def __init__(self):
        self.requested = False
        self.signal_name = None
        self._previous = {}

    def _handler(self, signum, frame):
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def install(self) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handler)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            try:
                signal.signal(sig, handler)
            except (ValueError, TypeError):
                pass
        self._previous.clear()


def gate_means(module: torch.nn.Module, zero_stage: int) -> List[float]:
    """Mean of each iteration's gate (collective under ZeRO-3)."""
    gates = getattr(getattr(module, "loop", None), "gates", None)
    if gates is None:
        return []
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([gates], modifier_rank=None):
            return [float(g.float().mean()) for g in gates.detach()]
    return [float(g.float().mean()) for g in gates.detach()]


@torch.no_grad()
def evaluate(engine, valid_ds, cfg: Config, dp: int, dp_rank: int, dev: torch.device) -> float:
    """Mean loss over eval_iters micro-batches of this rank, averaged over the DP group."""
    t = cfg.training
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=dev)
    gen = torch.Generator().manual_seed(0)  # the DataLoader's seed draw must not touch the global RNG
    for tokens in loader(valid_ds, EvalBatchSampler(t.eval_iters, t.micro_batch_size, dp, dp_rank),
                         cfg.data.num_workers, generator=gen):
        x, y = split_inputs(tokens, dev)
        _, loss = engine(x, labels=y)
        total[0] += loss.detach().double()
        total[1] += 1
    engine.train()
    if dist.is_initialized():
        dist.all_reduce(total, group=get_data_parallel_group())
    return float(total[0] / total[1].clamp(min=1))


# ----------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------
def pretrain(cfg: Config, opts: Optional[RunOptions] = None, return_state_dict: bool = False) -> Dict[str, Any]:
    """Train according to `cfg` on this rank. Returns the summary (plus per-step records on every rank)."""
    opts = opts or RunOptions()
    checks = preflight(cfg, opts)
    import deepspeed  # after the checks: importing it is the first heavy step
    t, tp = cfg.training, cfg.parallel.tensor_model_parallel_size

    # ---- processes and groups -----------------------------------------------------------------------
    init_distributed(opts.local_rank, skip_shm_comm=t.ds_skip_shm_comm)
    initialize_model_parallel(tp)
    dp, dp_rank = get_data_parallel_world_size(), get_data_parallel_rank()
    gbs = t.global_batch_size or t.micro_batch_size * dp
    accum = gbs // (t.micro_batch_size * dp)
    seq = cfg.data.seq_length
    dev = current_device()
    set_seed(t.seed)
    is_rank0 = rank() == 0

    if not t.run_dir:
        t.run_dir = os.path.join("runs", opts.preset or "custom")
    run_dir = t.run_dir
    tb_dir = t.tensorboard_dir or os.path.join(run_dir, "tensorboard")
    if is_rank0:
        os.makedirs(run_dir, exist_ok=True)
        save_yaml(cfg, os.path.join(run_dir, "config.yaml"))
    log = RunLogger(run_dir, tb_dir, enabled=is_rank0)
    engine = compile_timer = None
    stop = StopRequest()
    try:
        # ---- data, model, engine --------------------------------------------------------------------
        train_ds, valid_ds = build_datasets(cfg, dp)
        summary_info = model_summary(cfg.model, seq)
        model = LoopGPT(cfg.model)
        if checks["init_from"]:
            # Before deepspeed.initialize: every rank keeps its TP shard, ZeRO then partitions as usual.
            load_full_state_dict(model, torch.load(checks["init_from"], map_location="cpu", weights_only=True))
            log.print(f"initialised weights from {checks['init_from']}")
        engine, clipper, compile_timer = build_engine(cfg, model, dp, checks["precision"], checks["ds_base"],
                                                      log.print)
        del model
        iteration = 0
        if checks["resume"] is not None:
            tag, _ = checks["resume"]
            client = checkpointing.load_checkpoint(engine, t.load, tag)
            iteration = int(client.get("iteration", 0))
            log.print(f"resumed from {os.path.join(t.load, tag)} at iteration {iteration}")
        elif t.load:
            log.print(f"no checkpoint in {t.load} (no 'latest' file); starting from scratch")
        start_iteration = iteration
        log.print(f"training {summary_info['params'] / 1e6:.2f}M parameters (effective depth "
                  f"{cfg.model.effective_depth}) on {world_size()} rank(s): TP {tp} x DP {dp}, micro batch "
                  f"{t.micro_batch_size} x accumulation {accum} = global batch {gbs}, ZeRO {t.zero_stage}, "
                  f"{checks['precision']}, {iteration}/{t.train_iters} steps done")

        flops_per_token = summary_info["flops_per_token"]
        peak = peak_flops_per_device(t.peak_tflops)
        gated = cfg.model.loop_gates != "none"
        window = Throughput()
        last_window_losses: collections.deque = collections.deque(maxlen=max(1, t.log_interval))
        step_times: List[float] = []
        records: List[Dict[str, Any]] = []
        valid_losses: Dict[int, float] = {}
        same_folder = checks["resume"] is not None and os.path.abspath(t.save or "") == os.path.abspath(t.load)
        last_saved = iteration if same_folder else None  # do not re-save the checkpoint just loaded
        last_eval_iteration = None
        final_valid = float("nan")

        def run_eval(it: int) -> None:
            nonlocal final_valid, last_eval_iteration
            if valid_ds is None or t.eval_iters <= 0:
                return
            v = evaluate(engine, valid_ds, cfg, dp, dp_rank, dev)
            final_valid, last_eval_iteration = v, it
            valid_losses[it] = v
            log.scalars(it, {"valid/loss": v})
            log.record({"iteration": it, "valid_loss": v})
            log.print(f"iter {it}/{t.train_iters} | valid loss {v:.4f} | valid ppl {math.exp(min(v, 50)):.2f}")

        def save(it: int) -> None:
            nonlocal last_saved
            if t.save and last_saved != it:
                path = checkpointing.save_checkpoint(engine, cfg, it, it * gbs)
                last_saved = it
                log.print(f"saved checkpoint {path}")

        stop.install()
        gen = torch.Generator().manual_seed(t.seed)  # keeps the DataLoader's seed draw off the global RNG
        batches = iter(loader(train_ds, TrainBatchSampler(iteration, t.train_iters, gbs, t.micro_batch_size,
                                                          dp, dp_rank), cfg.data.num_workers, generator=gen)) \
            if train_ds is not None and iteration < t.train_iters else iter(())
        stopped = False
        while iteration < t.train_iters:
            t0 = time.perf_counter()
            lr = lr_at(iteration, t)
            # One host sync per step: loss, grad norm and the stop flag come back together (training/step.py).
            step_loss, grad_norm, stop_now = train_step(engine, batches, accum, dev, clipper, stop.requested)
            iteration += 1
            step_time = time.perf_counter() - t0
            step_times.append(step_time)
            window.add(step_loss, step_time, grad_norm)
            last_window_losses.append(step_loss)
            tokens_seen = iteration * gbs * seq
            log.scalars(iteration, {"train/loss": step_loss, "train/lr": lr, "train/grad_norm": grad_norm,
                                    "train/tokens_seen": tokens_seen})
            record = {"iteration": iteration, "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                      "step_time": step_time, "tokens_seen": tokens_seen}
            records.append(record)
            log.record(record)

            if t.log_interval > 0 and (iteration % t.log_interval == 0 or iteration == t.train_iters or stop_now):
                mean_time = window.mean_step_time()
                tokens_per_sec = gbs * seq / mean_time
                mfu = flops_per_token * tokens_per_sec / (peak * world_size()) if peak else None
                scalars = {"train/tokens_per_sec": tokens_per_sec, "train/step_time": mean_time}
                if mfu is not None:
                    scalars["train/mfu"] = mfu
                if gated:
                    for n, g in enumerate(gate_means(engine.module, t.zero_stage), start=1):
                        scalars[f"gates/iter_{n}_mean"] = g
                log.scalars(iteration, scalars)
                recent = step_times[1:] if len(step_times) > 1 else step_times
                eta = (t.train_iters - iteration) * (sum(recent) / len(recent))
                log.print(progress_line(iteration, t.train_iters, window.mean_loss(), lr,
                                        (sum(window.grad_norms) / len(window.grad_norms)) if window.grad_norms
                                        else None, tokens_per_sec, mean_time, mfu, eta))
                log.flush()
                window.reset()

            if opts.debug_sleep_per_iter > 0:
                time.sleep(opts.debug_sleep_per_iter)
            if t.eval_interval > 0 and iteration % t.eval_interval == 0 and iteration < t.train_iters:
                run_eval(iteration)
            if t.save_interval > 0 and iteration % t.save_interval == 0:
                save(iteration)
            if stop_now:
                log.print(f"stop requested ({stop.signal_name or 'signal on another rank'}) at iteration "
                          f"{iteration}; {'saving and exiting' if t.save else 'exiting (no --save folder)'}")
                stopped = True
                break

        if not stopped and last_eval_iteration != iteration:
            run_eval(iteration)
        save(iteration)

        recent = step_times[1:] if len(step_times) > 1 else step_times
        mean_step = sum(recent) / len(recent) if recent else float("nan")
        summary = {
            "preset": opts.preset,
            "params": int(summary_info["params"]),
            "non_embedding_params": int(summary_info["non_embedding_params"]),
            "num_layers": cfg.model.num_layers,
            "num_loops": cfg.model.num_loops,
            "inner_loops": cfg.model.inner_loops,
            "effective_depth": cfg.model.effective_depth,
            "iterations": iteration,
            "tokens_seen": iteration * gbs * seq,
            "final_train_loss": (sum(last_window_losses) / len(last_window_losses)) if last_window_losses else None,
            "final_valid_loss": final_valid if math.isfinite(final_valid) else None,
            "tokens_per_sec": gbs * seq / mean_step if recent else None,
            "step_time": mean_step if recent else None,
            "run_dir": run_dir,
            "save": t.save or None,
        }
        if is_rank0:
            write_summary(os.path.join(run_dir, "summary.json"), summary)
        result = dict(summary, records=records, valid_losses=valid_losses, stopped=stopped,
                      start_iteration=start_iteration)
        if return_state_dict:
            result["state_dict"] = checkpointing.consolidated_state_dict(engine, t.zero_stage)
        return result
    finally:
        stop.uninstall()
        if compile_timer is not None:
            compile_timer.close()
        log.close()
        if engine is not None and hasattr(engine, "destroy"):
            try:
                engine.destroy()
            except Exception:
                pass
        destroy_model_parallel()
