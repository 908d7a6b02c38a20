"""The training run: checks, DeepSpeed engine, step loop, evaluation, checkpoints, logging.

`pretrain(cfg, opts)` runs one whole training job on this process (one rank). `preflight` first checks
everything that can be checked without building anything (config, data files, DeepSpeed JSON, precision,
the checkpoint to resume), so a bad setting stops before torch.distributed, the model or DeepSpeed
start. Then a `Trainer` runs the job in named phases, each one method, which are also the places new
features thread into:

    setup()                     processes and groups, run folder, data, model, DeepSpeed engine, resume
    train()                     the loop, top to bottom on one screen
    train_step(batch, it)       one optimizer step over the step's micro-batches; settings that vary per
                                iteration (a sampled loop depth, a loop-count schedule) are derived from `it`
    evaluate()                  the loss on every named validation set (today one, "valid")
    save()                      a checkpoint of the current iteration (collective; `loop_megatron.checkpoint`)
    log_step(), log_progress()  per-step records and the periodic progress line
    summary()                   summary.json and what `pretrain` returns
"""
from __future__ import annotations

import collections
import math
import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist

from .. import checkpoint
from ..config import (Config, ConfigError, accumulation_steps, eval_micro_batches, global_batch_size, lr_schedule,
                      resolve_lr_horizons, run_folder, sample_based_train_iters, save_yaml)
from ..errors import LoopMegatronError
from ..model import LoopGPT, load_full_state_dict, model_summary
from ..model.exit import configure_exit_training
from ..model.gpt import IGNORE_INDEX
from ..parallel import (destroy_model_parallel, get_data_parallel_group, get_data_parallel_rank,
                        get_data_parallel_world_size, initialize_model_parallel, set_seed)
from ..utils.distributed import rank, world_size
from ..errors import LoopMegatronError
from ..utils.signals import STOP_REQUEST
from ..utils.watchdog import FAILED
from .arguments import RunOptions
from ..data.bpb import bits_per_byte, bpb_sums
from ..data.tokenizer import HF_TYPE
from .data import (EvalBatchSampler, TrainBatchSampler, build_datasets, build_eval_datasets, byte_length_table,
                   check_data_paths, check_data_tokenizers, check_eval_data_paths, loader)
from ..model.documents import DocumentLayout
from ..model.inputs import prepare_inputs
from .diagnostics import gate_means
from .distributed import device as current_device
from .distributed import RankStopped, env_world_size, init_distributed, rank_report, start_watchdog
from .ds_config import adopt_ds_file_settings, resolve_precision
from .engine import build_engine
from .loop_depth import LoopDepthSampler, depth_is_varied, step_depths, step_flops_per_token
from .monitor import (RunLogger, Throughput, format_eta, peak_flops_per_device, progress_line, wandb_available,
                      wandb_init_kwargs, write_summary)
from .step import NonFiniteStepError, SkipGuard, train_step

PRIMARY_VALID = "valid"  # TensorBoard/metrics name of the primary (first) validation set's loss and bpb


def preflight(cfg: Config, opts: RunOptions) -> Dict[str, Any]:
    """Raise a LoopMegatronError (ConfigError, DataError, ...: one sentence) for anything that cannot work.
    Touches no process group."""
    world = dist.get_world_size() if dist.is_initialized() else env_world_size()
    ds_base = adopt_ds_file_settings(cfg, opts.explicit)
    vocab_note = resolve_vocab_size(cfg, opts)
    schedule_notes = list(opts.notes) + resolve_lr_horizons(cfg, opts.explicit)
    cfg.validate(world)
    precision = resolve_precision(cfg)
    check_data_paths(cfg.data.data_path)
    if cfg.training.wandb_project and not wandb_available():
        raise ConfigError("training.wandb_project is set but the wandb package is not installed; pip install wandb "
                          "(or pip install -e '.[wandb]'), or drop --wandb-project.")
    check_eval_data_paths(cfg)
    # A HuggingFaceTokenizer (chosen on purpose) must fit model.vocab_size; the default GPT-2 tokenizer is
    # only loaded, since small test models read toy corpora of small ids with it and check_data_tokenizers
    # refuses any dataset whose recorded vocabulary or largest id does not fit the model.
    tokenizer = checkpoint.tokenizer_for(cfg, fit_model_vocab=cfg.data.tokenizer_type == HF_TYPE)
    data_notes = check_data_tokenizers(cfg, tokenizer)  # refuses data of another tokenizer / a larger vocab
    if vocab_note:
        data_notes = [vocab_note] + list(data_notes)
    resume = checkpoint.find_resume(cfg, world, precision)  # refuses another shape, tokenizer, batch, layout
    init_from = checkpoint.find_init_from(cfg) if resume is None else None
    continued = resume.meta if resume is not None and resume.mode != "finetune" else None
    samples_note = sample_based_train_iters(cfg, world, opts.explicit, continued)  # train_iters from train_samples
    data_notes = list(data_notes) + schedule_notes + ([samples_note] if samples_note else [])
    return {"world": world, "ds_base": ds_base, "precision": precision, "resume": resume, "init_from": init_from,
            "tokenizer": tokenizer, "data_notes": data_notes}


def resolve_vocab_size(cfg: Config, opts: RunOptions) -> Optional[str]:
    """With a HuggingFaceTokenizer and model.vocab_size not set explicitly (opts.explicit: file, flag or
    --override; a preset's or the default value does not count), set model.vocab_size to the tokenizer's
    vocabulary, or, resuming a checkpoint of the same tokenizer, to the checkpoint's (so a resumed run
    keeps its shape). Returns the line to log, or None when nothing changed. GPT-2's tokenizer is left
    alone: the default 50,257 is its vocabulary, and small test models read toy ids with it."""
    if cfg.data.tokenizer_type != HF_TYPE or "model.vocab_size" in opts.explicit:
        return None
    tokenizer = checkpoint.tokenizer_for(cfg)
    vocab, source = tokenizer.vocab_size, f"the vocabulary of the tokenizer {tokenizer.name}"
    saved = checkpoint.resume_vocab_size(cfg, tokenizer)
    if saved is not None and saved[0] >= vocab:
        vocab, source = saved[0], f"the checkpoint {saved[1]} (same tokenizer)"
    if cfg.model.vocab_size == vocab:
        return None
    before, cfg.model.vocab_size = cfg.model.vocab_size, vocab
    return (f"model.vocab_size {vocab} from {source} (not set explicitly; it was {before}); set "
            "model.vocab_size to choose another.")


@dataclass
class StepResult:
    """What one optimizer step reports (the same on every rank)."""

    loss: float
    """Mean over the step's micro-batches and the data-parallel ranks."""
    lr: float
    grad_norm: Optional[float]
    stop: bool
    """A stop signal arrived on some rank: save and return after this step."""
    loops: Optional[float] = None
    """Mean loop count r the step's micro-batches ran (the sampled / scheduled depth)."""
    flops_per_token: Optional[float] = None
    """Training FLOPs per token of what ran (forward over r, backward over the last k iterations)."""
    finite_norm: bool = True
    """The global gradient norm was finite (on every rank)."""
    skipped: bool = False
    """The step made no update (a non-finite loss/norm with training.skip_nonfinite_steps, or an fp16
    loss-scale overflow)."""
    time_up: bool = False
    """training.exit_duration_in_mins has passed on some rank (the same on every rank)."""

    def nonfinite(self) -> List[str]:
        """What was not finite: 'the loss is nan' and/or 'the gradient norm is inf'."""
        out = [] if math.isfinite(self.loss) else [f"the loss is {self.loss}"]
        if not self.finite_norm:
            out.append(f"the gradient norm is {self.grad_norm}")
        return out


class Trainer:
    """One training job on this rank; `pretrain` is setup() -> train() -> close()."""

    def __init__(self, cfg: Config, opts: RunOptions, checks: Dict[str, Any]):
        self.cfg, self.opts, self.checks = cfg, opts, checks
        self.engine = None
        self.clipper = self.compile_timer = None
        self.log: Optional[RunLogger] = None  # set once the run folder exists; close() tears down only then
        self.stop = STOP_REQUEST  # installed in setup(); python -m loop_megatron.train installs it earlier
        self.iteration = self.start_iteration = 0
        self.start_consumed = 0  # samples consumed before start_iteration (resumed)
        self.stopped = False
        self.stop_reason: Optional[str] = None  # exit_reason() of the step the run stopped after
        self.window = Throughput()
        self.window_flops: List[float] = []  # per-step FLOPs/token and loop counts since the last progress line
        self.window_loops: List[float] = []
        self.last_window_losses: collections.deque = collections.deque(maxlen=max(1, cfg.training.log_interval))
        self.step_times: List[float] = []
        self.records: List[Dict[str, Any]] = []
        self.valid_losses: Dict[int, float] = {}
        self.final_valid = float("nan")
        self.final_valid_bpb: Dict[str, float] = {}
        self.last_eval_iteration: Optional[int] = None
        self.last_saved: Optional[int] = None
        self.skipped_steps = 0  # steps that made no update (non-finite, with skip_nonfinite_steps; fp16 overflow)
        self.consecutive_skips = 0  # non-finite steps skipped in a row (training.max_skipped_steps)
        self.skip_guard: Optional[SkipGuard] = None
        self.save_lock: Optional[checkpoint.SaveLock] = None
        # training.async_save: every rank holds one (the collective waits need all); rank 0's runs the writes
        self.writer: Optional[checkpoint.BackgroundWriter] = (
            checkpoint.BackgroundWriter(opts.debug_slow_save) if cfg.training.async_save else None)
        self.reported_write: Optional[str] = None  # the background write whose end was logged
        self.watchdog = None  # utils.watchdog.RankWatchdog of a multi-rank job (setup)
        self.started = time.time()

    # ------------------------------------------------------------------------------------------------
    # The loop
    # ------------------------------------------------------------------------------------------------
    def train(self) -> Dict[str, Any]:
        """Step until train_iters, evaluating and saving on schedule, then a last evaluation and save; or
        until a planned exit or a stop signal (`exit_reason`), then a save. Returns `summary()`."""
        t = self.cfg.training
        batches = self.train_batches()
        while self.iteration < t.train_iters:
            t0 = time.perf_counter()
            step = self.train_step(self.next_batch(batches), self.iteration)
            self.iteration += 1
            self.check_finite(step)
            self.log_step(step, time.perf_counter() - t0)
            self.poll_background_save()
            if step.nonfinite() and not step.skipped:
                self.stop_nonfinite(step)  # raises before anything of this state is saved
            if 0 < t.max_skipped_steps <= self.consecutive_skips:
                self.stop_nonfinite(step, f"the last {self.consecutive_skips} steps were all skipped")
            if self._every(t.eval_interval) and self.iteration < t.train_iters:
                self.evaluate()
            if self._every(t.save_interval):
                self.save()
            self.stop_reason = self.exit_reason(step)
            if self.stop_reason:
                self.log_stop()
                self.stopped = True
                break
        if not self.stopped and self.last_eval_iteration != self.iteration:
            self.evaluate()
        self.save()
        checkpoint.wait_for_background(self.writer)  # the end of training waits for the pending write
        self.poll_background_save()
        return self.summary()

    def train_step(self, micro_batches: Sequence[torch.Tensor], iteration: int) -> StepResult:
        """One optimizer step: forward/backward/step per micro-batch (DeepSpeed applies the update at the
        accumulation boundary), then one all-reduce for the DP-mean loss and the stop flag."""
        # The rate of the update this step makes: the schedule counts applied updates (a skipped step does
        # not advance it, as in DeepSpeed and Megatron-LM), which equals `iteration` until a step is skipped.
        scheduler = getattr(self.engine, "lr_scheduler", None)
        lr = scheduler.lr if scheduler is not None else self.cfg.training.lr
        # The loop depth of each micro-batch: a pure function of (seed, iteration, sample index), so every
        # TP/DP/ZeRO rank agrees without communication and a resumed run replays it (training/loop_depth.py).
        depths = step_depths(self.depth_sampler, iteration, len(micro_batches), self.global_batch,
                             self.cfg.training.micro_batch_size, self.dp_rank, self.dp)
        # One host sync per step: loss, grad norm and the stop flag come back together (training/step.py).
        stats = train_step(self.engine, iter(micro_batches), len(micro_batches), self.device, self.clipper,
                           self._stop_requested, depths=depths, skip_nonfinite=self.cfg.training.skip_nonfinite_steps,
                           skip_guard=self.skip_guard, time_up=self._time_up, layout=self.layout)
        return StepResult(loss=stats.loss, lr=lr, grad_norm=stats.grad_norm, stop=stats.stop,
                          loops=sum(d.num_loops for d in depths) / len(depths),
                          flops_per_token=step_flops_per_token(self.cfg.model, self.seq, depths),
                          finite_norm=stats.finite_norm, time_up=stats.time_up)

    def _time_up(self) -> bool:
        """This rank's clock has passed training.exit_duration_in_mins since the trainer started (read at
        the step's all-reduce, which makes the decision every rank's)."""
        limit = self.cfg.training.exit_duration_in_mins
        return limit > 0 and self.elapsed_minutes() > limit

    def elapsed_minutes(self) -> float:
        """Wall-clock minutes since this trainer was created (training.exit_duration_in_mins counts them)."""
        return (time.time() - self.started) / 60.0

    def exit_reason(self, step: StepResult) -> Optional[str]:
        """Why the run stops after this step short of train_iters, or None: 'signal' (a stop signal on some
        rank), 'exit_duration' (training.exit_duration_in_mins passed on some rank), 'exit_interval' (the
        iteration is a multiple of training.exit_interval). Every input is the same on every rank."""
        t = self.cfg.training
        if step.stop:
            return "signal"
        if self.iteration >= t.train_iters:
            return None  # the run is complete: it finishes (with its last evaluation), whatever else is due
        if step.time_up:
            return "exit_duration"
        if self._every(t.exit_interval):
            return "exit_interval"
        return None

    def check_finite(self, step: StepResult) -> None:
        """Mark a non-finite step skipped where it made no update: with training.skip_nonfinite_steps (the
        step's update was withheld: training/step.py), or in fp16 when only the norm overflowed (DeepSpeed's
        loss scaler skipped it and lowers the scale, as in Megatron-LM). The same on every rank: the loss
        is all-reduced and the norm flag is summed over ranks."""
        bad = step.nonfinite()
        if not bad:
            self.consecutive_skips = 0
            return
        fp16_overflow = self.checks["precision"] == "fp16" and math.isfinite(step.loss)
        if self.cfg.training.skip_nonfinite_steps or fp16_overflow:
            step.skipped = True
            self.skipped_steps += 1
            self.consecutive_skips += 0 if fp16_overflow else 1
            if not fp16_overflow:
                self.log.print(f"iter {self.iteration}: skipped the update ({' and '.join(bad)}); "
                               f"{self.skipped_steps} step(s) skipped so far")

    def stop_nonfinite(self, step: StepResult, skipped: str = "") -> None:
        """Stop the run (every rank) at a step whose loss or gradient norm is not finite, saving nothing;
        `skipped` says why a skipping run (training.skip_nonfinite_steps) stops after all."""
        t = self.cfg.training
        last = checkpoint.last_good_checkpoint(t.save) if t.save else "none (no --save folder)"
        if skipped:
            raise NonFiniteStepError(
                f"iteration {self.iteration}: {' and '.join(step.nonfinite())}, and {skipped} "
                f"(--max-skipped-steps {t.max_skipped_steps}), so the run stopped without saving this state; "
                f"the last good checkpoint is {last} (lower --lr).")
        raise NonFiniteStepError(
            f"iteration {self.iteration}: {' and '.join(step.nonfinite())}, so the run stopped without saving "
            f"this state; the last good checkpoint is {last} (lower --lr, or "
            f"pass --skip-nonfinite-steps to skip such steps instead).")

    def _stop_requested(self) -> bool:
        """Whether this rank got a stop signal; read by train_step right before the step's all-reduce, so a
        signal that arrives during a step stops the run after that very step. --debug-sleep-per-iter (a
        testing aid) sleeps here first: a slow step that a test can signal in the middle of."""
        if self.opts.debug_sleep_per_iter > 0:
            time.sleep(self.opts.debug_sleep_per_iter)
        return self.stop.requested and self.cfg.training.exit_signal_handler

    @property
    def depth_sampler(self) -> LoopDepthSampler:
        """The training loop-depth sampler (training.loop_sampling / loop_schedule / backprop_loops)."""
        if getattr(self, "_depth_sampler", None) is None:
            self._depth_sampler = LoopDepthSampler(self.cfg)
        return self._depth_sampler

    def evaluate(self) -> Dict[str, float]:
        """Mean loss (and bits per byte) on every named validation set at the current iteration, logged and
        remembered; returns name -> loss."""
        if not self.valid_sets or self.cfg.training.eval_iters <= 0:
            return {}
        results = {name: self._eval_loss(dataset) for name, dataset in self.valid_sets.items()}
        self.last_eval_iteration = self.iteration
        for name, (loss, bpb) in results.items():
            self.log_eval(name, loss, bpb)
        return {name: loss for name, (loss, _) in results.items()}

    def save(self) -> None:
        """Checkpoint the current iteration on every rank (skipped without --save, or if just saved/loaded);
        with training.async_save the files are written in the background (checkpoint/background.py)."""
        if self.cfg.training.save and self.last_saved != self.iteration:
            t0 = time.perf_counter()
            path = checkpoint.save_engine_checkpoint(self.engine, self.cfg, self.iteration, self.consumed_samples(),
                                                     writer=self.writer)
            self.last_saved = self.iteration
            blocked = time.perf_counter() - t0
            if self.writer is not None and self.writer.pending:
                self.log.print(f"checkpoint {path}: snapshot taken (training blocked {blocked:.2f}s), writing in "
                               "the background ('latest' moves when it is complete)")
            else:
                self.log.print(f"saved checkpoint {path} ({blocked:.2f}s)")

    def poll_background_save(self) -> None:
        """Rank 0, after each step: a background write that failed stops the run with its sentence; one that
        completed is logged."""
        if self.writer is None or not self.is_rank0:
            return
        failure = self.writer.poll()
        if failure:
            raise checkpoint.CheckpointWriteError(failure)
        label = self.writer.label
        if label and not self.writer.pending and self.writer.finished_s is not None and self.reported_write != label:
            self.reported_write = label
            self.log.print(f"checkpoint {os.path.join(self.cfg.training.save, label)} written in the background "
                           f"({self.writer.finished_s:.2f}s); 'latest' names it")

    # ------------------------------------------------------------------------------------------------
    # Setup
    # ------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Processes and groups, run folder and logger, data, model, DeepSpeed engine, resume."""
        cfg, t = self.cfg, self.cfg.training
        if t.exit_signal_handler:
            self.stop.install()  # from here a signal asks for a stop at the end of the next step's all-reduce
        else:  # training.exit_signal_handler false: SIGTERM/SIGINT keep (or get back) their default action
            self.stop.uninstall()
        minutes = cfg.parallel.distributed_timeout_minutes
        init_distributed(self.opts.local_rank, skip_shm_comm=t.ds_skip_shm_comm, timeout_minutes=minutes)
        self.watchdog = start_watchdog(minutes)  # a dead or hung rank ends the job, named (utils/watchdog.py)
        if world_size() > 1:
            print(rank_report(), flush=True)
        self._lock_save_folder()
        initialize_model_parallel(cfg.parallel.tensor_model_parallel_size, timeout=timedelta(minutes=minutes))
        self.dp, self.dp_rank = get_data_parallel_world_size(), get_data_parallel_rank()
        self.global_batch = global_batch_size(cfg, self.dp)
        self.accum = accumulation_steps(cfg, self.dp)
        self.seq = cfg.data.seq_length
        self.device = current_device()
        set_seed(t.seed)
        self.is_rank0 = rank() == 0
        self._open_run_dir()

        self.train_ds, _ = build_datasets(cfg, self.dp)
        self.valid_sets = build_eval_datasets(cfg, self.dp, "valid")  # name -> dataset; the first is primary
        self.primary_valid = next(iter(self.valid_sets), PRIMARY_VALID)
        self.tokenizer = self.checks["tokenizer"]
        self.byte_lengths = byte_length_table(self.tokenizer, cfg.model.vocab_size, self.device)
        self.layout = DocumentLayout.of(cfg.data, self.tokenizer.eod)  # None: each window is one text
        if self.layout is not None:
            on = [name for name in ("reset_position_ids", "reset_attention_mask", "eod_mask_loss")
                  if getattr(self.layout, name)]
            self.log.print(f"documents: {', '.join(on)} at end-of-document token {self.layout.eod} "
                           "(model/documents.py), in training and evaluation alike")
        for note in self.checks["data_notes"]:
            self.log.print(f"note: {note}")
        masked = [name for name, ds in [("train", self.train_ds), *self.valid_sets.items()]
                  if getattr(ds, "has_loss_mask", False)]
        if masked:
            self.log.print(f"loss mask: the {', '.join(masked)} data is answer-masked (data/loss_mask.py); loss and "
                           "bits per byte average over the targets its mask counts")
        self.model_info = model_summary(cfg.model, self.seq)
        self.engine = self._build_engine()
        if self.clipper is not None and t.skip_nonfinite_steps:  # DeepSpeed steps the torch optimizer directly
            self.skip_guard = SkipGuard(self.engine.optimizer)
        self._resume()
        self.log.print(f"training {self.model_info['params'] / 1e6:.2f}M parameters (effective depth "
                       f"{cfg.model.effective_depth}) on {world_size()} rank(s): TP "
                       f"{cfg.parallel.tensor_model_parallel_size} x DP {self.dp}, micro batch {t.micro_batch_size} "
                       f"x accumulation {self.accum} = global batch {self.global_batch}, ZeRO {t.zero_stage}, "
                       f"{self.checks['precision']}, {self.iteration}/{t.train_iters} steps done")
        self.peak_flops = peak_flops_per_device(t.peak_tflops)
        self.gated = cfg.model.loop_gates != "none"

    def _lock_save_folder(self) -> None:
        """Global rank 0 takes the --save folder's lock (checkpoint/lock.py); a refusal stops every rank."""
        t = self.cfg.training
        if not t.save:
            return
        refused = None
        if rank() == 0:
            try:
                self.save_lock = checkpoint.SaveLock.acquire(t.save, force=t.force_save_lock)
            except checkpoint.SaveFolderBusy as exc:
                refused = exc
        if world_size() > 1:
            flag = torch.tensor([float(refused is not None)], device=current_device())
            dist.all_reduce(flag)
            if refused is None and float(flag.item()) > 0:
                refused = checkpoint.SaveFolderBusy(f"{t.save}: this save folder is in use by another run "
                                                    f"(rank 0 names it).")
        if refused is not None:
            raise refused

    def _open_run_dir(self) -> None:
        t = self.cfg.training
        t.run_dir = run_folder(self.cfg, self.opts.preset)
        self.run_dir = t.run_dir
        tb_dir = t.tensorboard_dir or os.path.join(self.run_dir, "tensorboard")
        if self.is_rank0:
            os.makedirs(self.run_dir, exist_ok=True)
            save_yaml(self.cfg, os.path.join(self.run_dir, "config.yaml"))
        failure = None
        try:
            self.log = RunLogger(self.run_dir, tb_dir, enabled=self.is_rank0,
                                 wandb_kwargs=wandb_init_kwargs(self.cfg))
        except LoopMegatronError as exc:  # W&B could not start (rank 0): every rank stops
            failure, self.log = exc, RunLogger(self.run_dir, tb_dir, enabled=False)
        if world_size() > 1 and self.cfg.training.wandb_project:
            flag = torch.tensor([float(failure is not None)], device=current_device())
            dist.all_reduce(flag)
            if failure is None and float(flag.item()) > 0:
                failure = ConfigError("training.wandb_project: W&B could not start on rank 0 (it names the reason).")
        if failure is not None:
            raise failure

    def _build_engine(self):
        cfg = self.cfg
        model = LoopGPT(cfg.model)
        if self.checks["init_from"]:
            # Before deepspeed.initialize: every rank keeps its TP shard, ZeRO then partitions as usual.
            load_full_state_dict(model, torch.load(self.checks["init_from"], map_location="cpu", weights_only=True))
            self.log.print(f"initialised weights from {self.checks['init_from']}")
        configure_exit_training(model, cfg.training.exit_entropy_beta,
                                cfg.training.train_exit_gate_only)  # freezes before the optimizer is built
        resume = self.checks["resume"]
        if resume is not None and resume.mode == "universal":  # another layout: masters before ZeRO partitions
            checkpoint.load_universal_weights(model, resume.folder)
        elif resume is not None and resume.mode in ("weights", "finetune"):  # --no-load-optim, --finetune
            self.weights_source = checkpoint.load_weights(model, resume.folder)
        engine, self.clipper, self.compile_timer = build_engine(cfg, model, self.dp, self.checks["precision"],
                                                                self.checks["ds_base"], self.log.print)
        return engine

    def _resume(self) -> None:
        t, resume = self.cfg.training, self.checks["resume"]
        if resume is not None:
            folder = resume.folder
            rng = not t.no_load_rng
            if resume.mode == "universal":
                client = checkpoint.load_universal_optimizer(self.engine, folder)  # reseeds the RNG
                if resume.same_layout:
                    how = "universal state, same layout; " + checkpoint.restore_rng_or_reseed(
                        folder, rng, t.seed, int(client["iteration"])) + (" (--no-load-rng)" if not rng else "")
                else:
                    how = "universal state, new layout: " + "; ".join(checkpoint.layout_changes(
                        resume.meta, self.cfg, world_size(), self.checks["precision"]))
            elif resume.mode == "engine":
                client = checkpoint.load_engine_checkpoint(self.engine, resume.save_dir, resume.tag, rng=rng)
                how = "DeepSpeed state, same layout"
                if not rng:
                    checkpoint.restore_rng_or_reseed(folder, False, t.seed, int(client.get("iteration", 0)))
                    how += "; RNG reseeded from (seed, iteration) (--no-load-rng)"
            else:  # "weights" (--no-load-optim) or "finetune": DeepSpeed's shards are not read
                checkpoint.set_master_weights(self.engine, folder)
                if resume.mode == "weights":
                    client = checkpoint.load_position(self.engine, folder, resume.meta, seed=t.seed,
                                                      restore=rng and resume.same_layout)
                    how = (f"--no-load-optim: weights from {self.weights_source} and the run's position, a fresh "
                           f"optimizer state; {client['rng']}"
                           + ("" if resume.same_layout else " (another layout)") + (" (--no-load-rng)" if not rng else ""))
                else:
                    client = {"iteration": 0, "consumed_samples": 0}
                    how = ""
            self.iteration = int(client.get("iteration", 0))
            self.start_consumed = int(client.get("consumed_samples", self.iteration * self.global_batch))
            if resume.mode == "finetune":
                self.log.print(f"finetuning from the weights of {folder} (iteration {resume.meta.get('iteration')} "
                               f"there; {self.weights_source}): --finetune starts at iteration 0 and sample 0 with a "
                               "fresh optimizer, LR schedule and RNG")
            else:
                self.log.print(f"resumed from {folder} at iteration {self.iteration}, sample {self.start_consumed} "
                               f"(save folder {resume.save_dir}, tag {resume.tag}: {resume.how}; {how})")
            for note in resume.notes:
                self.log.print(f"note: {note}")
            if resume.notes and t.override_opt_param_scheduler:
                saved = lr_schedule(Config.from_dict(resume.meta["config"]).training)
                ours, scheduler = lr_schedule(t), self.engine.lr_scheduler
                theirs_at = scheduler.samples if saved.unit == "samples" else scheduler.last_step
                self.log.print(f"note: lr at iteration {self.iteration}: {saved.at(theirs_at):.4g} on the "
                               f"checkpoint's schedule, {ours.at(scheduler.position):.4g} on this run's")
            newer = [tag for it, tag in checkpoint.list_checkpoints(resume.save_dir) if it > self.iteration]
            if newer and t.save and os.path.abspath(t.save) == os.path.abspath(resume.save_dir):
                self.log.print(f"note: {resume.save_dir} also holds newer checkpoints ({', '.join(newer)}); this run "
                               "saves into the same folder, replacing them as it reaches their iterations, and "
                               "'latest' will name this run's newest")
        elif t.load:
            self.log.print(f"no checkpoint in {t.load} yet (an existing folder without a 'latest' file or checkpoint "
                           "tags); starting from scratch")
        self.start_iteration = self.iteration
        same_folder = resume is not None and os.path.abspath(t.save or "") == os.path.abspath(resume.save_dir)
        self.last_saved = self.iteration if same_folder else None  # do not re-save the checkpoint just loaded

    # ------------------------------------------------------------------------------------------------
    # Data
    # ------------------------------------------------------------------------------------------------
    def train_batches(self) -> Iterator[torch.Tensor]:
        """This rank's training micro-batches from the current iteration on (empty when there is nothing
        left to train)."""
        t = self.cfg.training
        if self.train_ds is None or self.iteration >= t.train_iters:
            return iter(())
        gen = torch.Generator().manual_seed(t.seed)  # keeps the DataLoader's seed draw off the global RNG
        sampler = TrainBatchSampler(self.iteration, t.train_iters, self.global_batch, t.micro_batch_size,
                                    self.dp, self.dp_rank, first_sample=self.consumed_samples())
        return iter(loader(self.train_ds, sampler, self.cfg.data.num_workers, generator=gen))

    def next_batch(self, batches: Iterator[torch.Tensor]) -> List[torch.Tensor]:
        """The micro-batches of one optimizer step (gradient accumulation)."""
        return [next(batches) for _ in range(self.accum)]

    @torch.no_grad()
    def _eval_loss(self, dataset):
        """(mean loss, bits per byte) over eval_iters global batches (config.eval_micro_batches micro-batches
        of this rank) and the DP group. The sums
        stay on the device (bpb_sums) and come back in the one all-reduce and host copy at the end."""
        t = self.cfg.training
        self.engine.eval()
        total = torch.zeros(4, dtype=torch.float64, device=self.device)  # nats, targets, text nats, bytes
        gen = torch.Generator().manual_seed(0)  # the DataLoader's seed draw must not touch the global RNG
        for tokens in loader(dataset, EvalBatchSampler(eval_micro_batches(self.cfg, self.dp), t.micro_batch_size,
                                                       self.dp, self.dp_rank),
                             self.cfg.data.num_workers, generator=gen):
            x, y, documents = prepare_inputs(tokens, self.device, self.layout)
            _, token_loss = self.engine(x, labels=y, loss_reduction="none",
                                        depth=self.depth_sampler.eval_loops(), **documents)  # --eval-loops
            token_loss = token_loss.detach().double()
            nats, nbytes = bpb_sums(token_loss, y, self.byte_lengths)
            counted = (y != IGNORE_INDEX).sum().double()  # answer-masked data counts answer targets only
            total += torch.stack([token_loss.sum(), counted, nats, nbytes.double()])
        self.engine.train()
        if dist.is_initialized():
            dist.all_reduce(total, group=get_data_parallel_group())
        nats, count, text_nats, nbytes = total.tolist()
        return nats / max(count, 1.0), bits_per_byte(text_nats, int(nbytes))

    # ------------------------------------------------------------------------------------------------
    # Logging and the summary
    # ------------------------------------------------------------------------------------------------
    def consumed_samples(self) -> int:
        """Training samples consumed before the current iteration (continues a resumed run's count, also
        when --override-global-batch changed the batch size)."""
        return self.start_consumed + (self.iteration - self.start_iteration) * self.global_batch

    def _every(self, interval: int) -> bool:
        return interval > 0 and self.iteration % interval == 0

    def log_step(self, step: StepResult, step_time: float) -> None:
        """Per-step scalars and record; the progress line every log_interval (and at the end or a stop)."""
        t = self.cfg.training
        self.step_times.append(step_time)
        self.window.add(step.loss, step_time, step.grad_norm)
        self.last_window_losses.append(step.loss)
        tokens_seen = self.consumed_samples() * self.seq
        scalars = {"train/loss": step.loss, "train/lr": step.lr, "train/grad_norm": step.grad_norm,
                   "train/tokens_seen": tokens_seen, "train/skipped_steps": self.skipped_steps}
        record = {"iteration": self.iteration, "loss": step.loss, "lr": step.lr, "grad_norm": step.grad_norm,
                  "step_time": step_time, "tokens_seen": tokens_seen}
        if step.skipped:
            record["skipped"] = True
        if step.flops_per_token is not None:
            self.window_flops.append(step.flops_per_token)
            # The FLOPs this step actually ran (sampled or scheduled depth differs per step), so a study can
            # compare runs at equal training compute (studies/looping_pays/report.py).
            record["flops_per_token"] = step.flops_per_token
        if step.loops is not None and depth_is_varied(self.cfg):
            scalars["train/loops"] = record["loops"] = step.loops
            self.window_loops.append(step.loops)
        self.log.scalars(self.iteration, scalars)
        self.records.append(record)
        self.log.record(record)
        if t.log_interval > 0 and (self._every(t.log_interval) or self.iteration == t.train_iters or step.stop
                                   or step.time_up or self._every(t.exit_interval)):  # the last line before an exit
            self.log_progress(step.lr)

    def log_progress(self, lr: float) -> None:
        """Throughput, MFU and gate scalars over the window since the last line, and the console line
        (collective under ZeRO-3: the gates are gathered)."""
        t = self.cfg.training
        mean_time = self.window.mean_step_time()
        tokens_per_sec = self.global_batch * self.seq / mean_time
        # FLOPs of what ran: the window's steps hold equal tokens, so the mean per-token FLOPs over them
        # times tokens/s is the window's FLOP rate (a sampled depth changes it step by step).
        flops = (sum(self.window_flops) / len(self.window_flops) if self.window_flops
                 else self.model_info["flops_per_token"])
        mfu = flops * tokens_per_sec / (self.peak_flops * world_size()) if self.peak_flops else None
        scalars = {"train/tokens_per_sec": tokens_per_sec, "train/step_time": mean_time}
        if mfu is not None:
            scalars["train/mfu"] = mfu
        if self.gated:
            for n, g in enumerate(gate_means(self.engine.module, t.zero_stage), start=1):
                scalars[f"gates/iter_{n}_mean"] = g
        self.log.scalars(self.iteration, scalars)
        eta = (t.train_iters - self.iteration) * self._mean_step_time()
        grad_norms = self.window.grad_norms
        line = progress_line(self.iteration, t.train_iters, self.window.mean_loss(), lr,
                             (sum(grad_norms) / len(grad_norms)) if grad_norms else None,
                             tokens_per_sec, mean_time, mfu, eta)
        if self.window_loops:
            line += f" | loops {sum(self.window_loops) / len(self.window_loops):.2f}"
        if self.skipped_steps:
            line += f" | skipped {self.skipped_steps}"
        self.log.print(line)
        self.log.flush()
        self.window.reset()
        self.window_flops, self.window_loops = [], []

    def log_eval(self, name: str, loss: float, bpb: float = float("nan")) -> None:
        """One validation set's loss and bpb: TensorBoard `valid/<name>/{loss,bpb}` and metrics.jsonl
        `valid_<name>_{loss,bpb}` for a named set; the primary (first) set also as `valid/loss`,
        `valid/bpb` and `valid_loss`, `valid_bpb`."""
        it = self.iteration
        self.final_valid_bpb[name] = bpb
        keys = [PRIMARY_VALID] if name == self.primary_valid else []
        if name != PRIMARY_VALID:
            keys.append(f"{PRIMARY_VALID}/{name}")
        if name == self.primary_valid:
            self.final_valid = loss
            self.valid_losses[it] = loss
        scalars, record = {}, {"iteration": it}
        for key in keys:
            scalars.update({f"{key}/loss": loss, f"{key}/bpb": bpb})
            flat = key.replace("/", "_")
            record.update({f"{flat}_loss": loss, f"{flat}_bpb": bpb})
        self.log.scalars(it, scalars)
        self.log.record(record)
        label = PRIMARY_VALID if name == PRIMARY_VALID else f"{PRIMARY_VALID} {name}"
        self.log.print(f"iter {it}/{self.cfg.training.train_iters} | {label} loss {loss:.4f} | "
                       f"{label} ppl {math.exp(min(loss, 50)):.2f} | {label} bpb {bpb:.4f}")

    def log_stop(self) -> None:
        """One line saying why the run stops here (self.stop_reason) and what happens next."""
        t = self.cfg.training
        then = "saving and exiting" if t.save else "exiting (no --save folder)"
        if self.stop_reason == "exit_interval":
            self.log.print(f"exit interval reached at iteration {self.iteration} (--exit-interval {t.exit_interval}); "
                           f"{then}")
        elif self.stop_reason == "exit_duration":
            self.log.print(f"exit duration reached at iteration {self.iteration}: over --exit-duration-in-mins "
                           f"{t.exit_duration_in_mins:g} since the start ({self.elapsed_minutes():.2f} min here; the "
                           f"first rank past it decides for all); {then}")
        else:
            self.log.print(f"stop requested ({self.stop.signal_name or 'signal on another rank'}) at iteration "
                           f"{self.iteration}; {then}")

    def how_it_ended(self) -> str:
        """'finished', or what stopped it: 'stopped by SIGTERM', 'stopped at --exit-interval 4', ..."""
        t = self.cfg.training
        if not self.stopped:
            return "finished"
        if self.stop_reason == "exit_interval":
            return f"stopped at --exit-interval {t.exit_interval}"
        if self.stop_reason == "exit_duration":
            return f"stopped after --exit-duration-in-mins {t.exit_duration_in_mins:g}"
        return f"stopped by {self.stop.signal_name or 'a signal on another rank'}"

    def _recent_step_times(self) -> List[float]:
        return self.step_times[1:] if len(self.step_times) > 1 else self.step_times  # the first step warms up

    def _mean_step_time(self) -> float:
        recent = self._recent_step_times()
        return sum(recent) / len(recent) if recent else float("nan")

    def summary(self) -> Dict[str, Any]:
        """Write summary.json (rank 0); return it plus the per-step records on every rank."""
        cfg, t = self.cfg, self.cfg.training
        has_steps = bool(self._recent_step_times())
        mean_step = self._mean_step_time()
        tokens_per_step = self.global_batch * self.seq
        last = self.last_window_losses
        summary = {
            "preset": self.opts.preset,
            "params": int(self.model_info["params"]),
            "non_embedding_params": int(self.model_info["non_embedding_params"]),
            "num_layers": cfg.model.num_layers,
            "num_loops": cfg.model.num_loops,
            "inner_loops": cfg.model.inner_loops,
            "effective_depth": cfg.model.effective_depth,
            "iterations": self.iteration,
            "tokens_seen": self.consumed_samples() * self.seq,
            "final_train_loss": (sum(last) / len(last)) if last else None,
            "final_valid_loss": self.final_valid if math.isfinite(self.final_valid) else None,
            "final_valid_bpb": {k: (v if math.isfinite(v) else None) for k, v in self.final_valid_bpb.items()},
            "tokens_per_sec": tokens_per_step / mean_step if has_steps else None,
            "step_time": mean_step if has_steps else None,
            "run_dir": self.run_dir,
            "save": t.save or None,
            "skipped_steps": self.skipped_steps,
            "elapsed_s": round(time.time() - self.started, 3),
            "stop_reason": (self.stop.signal_name or "signal") if self.stop_reason == "signal" else self.stop_reason,
        }
        if self.is_rank0:
            write_summary(os.path.join(self.run_dir, "summary.json"), summary)
            self.log.print(self.end_block(summary))
        return dict(summary, records=self.records, valid_losses=self.valid_losses, stopped=self.stopped,
                    start_iteration=self.start_iteration)

    def end_block(self, summary: Dict[str, Any]) -> str:
        """The few lines printed at the end of a run: how it ended, time, final losses, where things are."""
        t = self.cfg.training
        how = self.how_it_ended()
        elapsed = format_eta(summary["elapsed_s"])
        done = self.iteration - self.start_iteration
        train = summary["final_train_loss"]
        evaluated = self.last_eval_iteration is not None
        valid = self.final_valid if evaluated else None  # nan stays visible here (summary.json has null)
        bpb = self.final_valid_bpb.get(self.primary_valid) if evaluated else None
        losses = f"train {train:.4f}" if train is not None else "train n/a"
        n = len(self.last_window_losses)
        losses += f" (mean of the last {n} step{'s' if n != 1 else ''})" if train is not None else ""
        losses += f", {PRIMARY_VALID} {valid:.4f}" if valid is not None else f", {PRIMARY_VALID} n/a"
        losses += f" (bpb {bpb:.4f})" if bpb is not None else ""
        others = {k: v for k, v in self.final_valid_bpb.items() if k != self.primary_valid}
        tb_dir = t.tensorboard_dir or os.path.join(self.run_dir, "tensorboard")
        if t.save and self.last_saved is not None:
            ckpt = f"{checkpoint.last_good_checkpoint(t.save)} (latest; --load {t.save} resumes it)"
        elif t.save:
            ckpt = f"none written by this run ({t.save})"
        else:
            ckpt = "none (no --save folder)"
        lines = [f"run {how}: iteration {self.iteration}/{t.train_iters} ({done} steps this run) in {elapsed}"
                 + (f", {self.skipped_steps} step(s) skipped (no update)" if self.skipped_steps else ""),
                 f"  final loss   {losses}"]
        if others:
            lines.append("  valid sets   " + ", ".join(f"{k} bpb {v:.4f}" for k, v in others.items()))
        lines += [f"  metrics      {os.path.join(self.run_dir, 'metrics.jsonl')}, "
                  f"{os.path.join(self.run_dir, 'summary.json')}",
                  f"  tensorboard  {tb_dir}",
                  f"  checkpoint   {ckpt}"]
        return "\n".join(lines)

    def explain_failure(self, exc: BaseException) -> Optional[str]:
        """After `exc` ended this rank's run: the sentence naming another rank that died, hung or failed
        first (printed once for the job by the watchdog), or None when the failure is this rank's own."""
        if self.watchdog is None:
            return None
        if isinstance(exc, LoopMegatronError):  # a deliberate one-sentence error of this rank
            self.watchdog.stop(FAILED)
            return None
        return self.watchdog.explain()

    def close(self) -> None:
        """Signal handlers back, logger closed, engine destroyed, groups forgotten (after any failure too);
        the save folder's lock released; the watchdog stopped (marking this rank done)."""
        if self.watchdog is not None:
            self.watchdog.stop()
            self.watchdog = None
        if self.writer is not None:  # a pending background write ends before the lock is released
            self.writer.join()
            failure = self.writer.take_failure()
            if failure:
                print(f"error: {failure}", file=sys.stderr, flush=True)
        if self.save_lock is not None:
            self.save_lock.release()
            self.save_lock = None
        self.stop.uninstall()
        if self.log is None:  # setup stopped before the run folder existed: nothing to tear down
            return
        if self.compile_timer is not None:
            self.compile_timer.close()
        self.log.close()
        if self.engine is not None and hasattr(self.engine, "destroy"):
            try:
                self.engine.destroy()
            except Exception:
                pass
        destroy_model_parallel()


def pretrain(cfg: Config, opts: Optional[RunOptions] = None, return_state_dict: bool = False) -> Dict[str, Any]:
    """Train according to `cfg` on this rank. Returns the summary (plus per-step records on every rank)."""
    opts = opts or RunOptions()
    trainer = Trainer(cfg, opts, preflight(cfg, opts))
    try:
        trainer.setup()
        result = trainer.train()
        if return_state_dict:
            result["state_dict"] = checkpoint.consolidated_state_dict(trainer.engine, cfg.training.zero_stage)
        return result
    except Exception as exc:
        sentence = trainer.explain_failure(exc)
        if sentence:
            raise RankStopped(sentence) from exc
        raise
    finally:
        trainer.close()
