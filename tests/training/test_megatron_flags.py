"""Megatron-LM's flag names and spellings: what each sets, the values refused in one sentence naming the flag,
the table of known-but-unsupported Megatron flags, and --eval-iters in Megatron's unit (global batches)."""
import pytest

from loop_megatron.config import ConfigError, eval_micro_batches, eval_samples, preset
from loop_megatron.training.arguments import build_parser, config_from_args
from loop_megatron.training.megatron_flags import RECOMPUTE_FLAGS, SPELLINGS, UNSUPPORTED


def parsed(*argv):
    cfg, opts = config_from_args(list(argv))
    return cfg, opts


def refused(*argv) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_args(list(argv))
    return str(info.value)


@pytest.mark.parametrize("argv,key,value", [
    (["--bf16"], "training.precision", "bf16"),
    (["--fp16"], "training.precision", "fp16"),
    (["--use-flash-attn"], "model.attention_backend", "flash"),
    (["--attention-backend", "auto"], "model.attention_backend", "auto"),
    (["--attention-backend", "flash"], "model.attention_backend", "flash"),
    (["--attention-backend", "fused"], "model.attention_backend", "sdpa"),
    (["--recompute-activations"], "model.activation_checkpointing", "none"),
    (["--recompute-granularity", "selective"], "model.activation_checkpointing", "none"),
    (["--recompute-granularity", "full"], "model.activation_checkpointing", "per-block"),
    (["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"],
     "model.activation_checkpointing", "per-block"),
    (["--num-layers", "4", "--recompute-granularity", "full", "--recompute-method", "uniform",
      "--recompute-num-layers", "4"], "model.activation_checkpointing", "per-iteration"),
    (["--num-layers", "4", "--recompute-granularity", "full", "--recompute-method", "block"],
     "model.activation_checkpointing", "per-block"),
    (["--deepspeed", "--deepspeed_config", "ds_configs/zero2.json"], "training.deepspeed_config",
     "ds_configs/zero2.json"),
    (["--max-position-embeddings", "64"], "model.max_position_embeddings", 64),
    (["--ffn-hidden-size", "96"], "model.ffn_hidden_size", 96),
    (["--init-method-std", "0.006"], "model.init_method_std", 0.006),
    (["--hidden-dropout", "0.1"], "model.hidden_dropout", 0.1),
    (["--attention-dropout", "0.2"], "model.attention_dropout", 0.2),
    (["--adam-beta1", "0.8"], "training.adam_beta1", 0.8),
    (["--adam-beta2", "0.999"], "training.adam_beta2", 0.999),
    (["--adam-eps", "1e-6"], "training.adam_eps", 1e-6),
    (["--make-vocab-size-divisible-by", "64"], "model.make_vocab_size_divisible_by", 64),
    (["--vocab-size", "1000"], "model.vocab_size", 1000),
    (["--num-workers", "2"], "data.num_workers", 2),
    (["--vocab-file", "v.json", "--merge-file", "m.txt"], "data.vocab_file", "v.json"),
    (["--wandb-project", "p", "--wandb-exp-name", "e", "--wandb-save-dir", "w"], "training.wandb_project", "p"),
])
def test_megatron_flag_sets_the_field(argv, key, value):
    cfg, opts = parsed(*argv)
    section, name = key.split(".")
    assert getattr(getattr(cfg, section), name) == value
    assert key in opts.explicit


def test_accepted_flags_that_change_nothing():
    base, _ = parsed()
    for argv in (["--deepspeed"], ["--pipeline-model-parallel-size", "1"], ["--use-mcore-models"],
                 ["--distributed-backend", "nccl"], ["--distributed-backend", "gloo"],
                 ["--no-masked-softmax-fusion", "--no-bias-gelu-fusion", "--no-bias-dropout-fusion",
                  "--no-gradient-accumulation-fusion"]):
        assert parsed(*argv)[0] == base, argv


@pytest.mark.parametrize("argv,message", [
    (["--pipeline-model-parallel-size", "2"], "--pipeline-model-parallel-size 2: this trainer has no pipeline "
                                              "parallelism"),
    (["--attention-backend", "unfused"], "--attention-backend unfused: this trainer has no unfused"),
    (["--attention-backend", "local"], "--attention-backend local: this trainer has no unfused"),
    (["--attention-backend", "triton"], "--attention-backend must be one of auto, flash, fused, sdpa"),
    (["--distributed-backend", "mpi"], "--distributed-backend must be one of nccl, gloo"),
    (["--recompute-granularity", "everything"], "--recompute-granularity must be full or selective"),
    (["--recompute-method", "uniform"], "--recompute-method needs --recompute-granularity full"),
    (["--recompute-num-layers", "2"], "--recompute-num-layers needs --recompute-granularity full"),
    (["--recompute-granularity", "selective", "--recompute-method", "block"],
     "--recompute-method applies to --recompute-granularity full only"),
    (["--num-layers", "4", "--recompute-granularity", "full", "--recompute-num-layers", "2"],
     "--recompute-num-layers 2 with --recompute-method uniform"),
    (["--num-layers", "4", "--recompute-granularity", "full", "--recompute-method", "block",
      "--recompute-num-layers", "2"], "--recompute-num-layers 2 with --recompute-method block"),
    (["--recompute-activations", "--recompute-granularity", "full"], "--recompute-activations means"),
    (["--bf16", "--precision", "fp32"], "--bf16 sets training.precision=bf16 but --precision sets it to fp32"),
    (["--bf16", "--fp16"], "--fp16 sets training.precision=fp16 but --bf16 sets it to bf16"),
    (["--recompute-granularity", "full", "--activation-checkpointing", "none"],
     "--recompute-granularity sets model.activation_checkpointing=per-block but --activation-checkpointing sets "
     "it to none"),
    (["--recompute-activations", "--activation-checkpointing", "per-block"],
     "--recompute-activations sets model.activation_checkpointing=none but --activation-checkpointing sets it to "
     "per-block"),
    (["--context-parallel-size", "2"], "--context-parallel-size (Megatron-LM) is not supported here: context "
                                       "parallelism is not implemented"),
    (["--rampup-batch-size", "16", "16", "1000"], "--rampup-batch-size (Megatron-LM) is not supported here: "
                                                 "batch-size ramp-up"),
    (["--use-distributed-optimizer"], "use --zero-stage 1"),
])
def test_refusals_are_one_sentence_naming_the_flag(argv, message):
    msg = refused(*argv)
    assert message in msg, msg
    assert msg.endswith(".") and "\n" not in msg


def test_every_unsupported_flag_is_refused_with_its_reason():
    flags = {o for a in build_parser()._actions for o in a.option_strings}
    for flag, reason in UNSUPPORTED.items():
        assert flag not in flags, f"{flag} is both a flag and in UNSUPPORTED"
        assert refused(flag, "1") == f"{flag} (Megatron-LM) is not supported here: {reason}."


def test_megatron_spellings_have_help_lines():
    helps = {o: a.help for a in build_parser()._actions for o in a.option_strings}
    for spelling in SPELLINGS:
        assert helps[spelling.flag], spelling.flag
    for flag, text in RECOMPUTE_FLAGS.items():
        assert helps[flag] == text


def test_vocab_and_merge_files_build_the_gpt2_tokenizer(tmp_path):
    from loop_megatron.checkpoint import tokenizer_for
    from loop_megatron.data.tokenizer import default_vocab_files

    merges, vocab = default_vocab_files()
    cfg, _ = parsed("--vocab-file", vocab, "--merge-file", merges)
    tok = tokenizer_for(cfg)
    assert (tok.vocab_file, tok.merge_file, tok.vocab_size) == (vocab, merges, 50257)
    assert tok.decode(tok.encode("Megatron-LM runs as-is")) == "Megatron-LM runs as-is"
    bad = tmp_path / "encoder.json"
    bad.write_text("{}")
    cfg, _ = parsed("--vocab-file", str(bad), "--merge-file", merges)
    with pytest.raises(ConfigError, match=r"^data.vocab_file / data.merge_file: .*not the GPT-2 vocabulary files"):
        tokenizer_for(cfg)
    cfg, _ = parsed("--vocab-file", vocab, "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "t.json")
    with pytest.raises(ConfigError, match="data.vocab_file and data.merge_file are GPT2BPETokenizer's files"):
        cfg.validate()


def test_eval_iters_counts_global_batches():
    cfg = preset("tiny-1l")
    cfg.training.micro_batch_size, cfg.training.global_batch_size, cfg.training.eval_iters = 2, 8, 3
    # DP 2: accumulation 2, so each rank reads 3 x 2 micro-batches and the evaluation 3 x 8 samples
    assert (eval_micro_batches(cfg, 2), eval_samples(cfg, 2)) == (6, 24)
    assert (eval_micro_batches(cfg, 4), eval_samples(cfg, 4)) == (3, 24)
    from loop_megatron.training.data import EvalBatchSampler

    seen = sorted(i for rank in range(2) for batch in EvalBatchSampler(6, 2, 2, rank) for i in batch)
    assert seen == list(range(24))  # every sample of the 3 global batches, each read by one rank


def test_eval_set_holds_eval_iters_global_batches(tmp_path):
    from loop_megatron.training.data import build_eval_datasets
    from tests.training.helpers import tiny_config, write_corpus

    cfg = tiny_config(write_corpus(str(tmp_path / "data")), str(tmp_path / "run"), **{
        "training.micro_batch_size": 2, "training.global_batch_size": 8, "training.eval_iters": 3})
    sets = build_eval_datasets(cfg, dp_size=2)
    assert list(sets) == ["valid"] and len(sets["valid"]) == 3 * 8


def test_readme_training_section_lists_every_megatron_spelling():
    import os

    from tests.conftest import ROOT

    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    training = text[text.index("\n## Training\n"):]
    training = training[:training.index("\n## ", 1)]
    for flag in [s.flag for s in SPELLINGS] + list(RECOMPUTE_FLAGS):
        assert f"`{flag}" in training, flag
