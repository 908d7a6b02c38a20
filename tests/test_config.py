"""Config presets, loading and validate()'s one-sentence rejections."""
import json

import pytest

from loop_megatron.config import PRESETS, Config, ConfigError, describe_fields, load_config, preset


def rejected(cfg: Config, world_size=None) -> str:
    with pytest.raises(ConfigError) as info:
        cfg.validate(world_size)
    return str(info.value)


def test_every_preset_validates():
    for name in PRESETS:
        preset(name).validate()


def test_paper_variant_shapes():
    assert preset("loop-67m").model.effective_depth == 48
    assert preset("loop-81m").model.effective_depth == 36
    assert preset("gpt2-124m").model.loop_gates == "none"


def test_heads_not_divisible_by_tp_names_the_fields():
    cfg = preset("tiny-2l-2loop")
    cfg.parallel.tensor_model_parallel_size = 3
    msg = rejected(cfg)
    assert "model.num_attention_heads" in msg and "tensor_model_parallel_size" in msg


def test_vocab_not_divisible_by_tp_names_the_field():
    cfg = preset("tiny-2l-2loop")
    cfg.model.make_vocab_size_divisible_by = 1  # 50257 is odd
    cfg.parallel.tensor_model_parallel_size = 2
    msg = rejected(cfg)
    assert "model.vocab_size" in msg and "tensor_model_parallel_size" in msg


@pytest.mark.parametrize("field", ["num_loops", "inner_loops"])
def test_loops_below_one_name_the_field(field):
    cfg = preset("tiny-2l-2loop")
    setattr(cfg.model, field, 0)
    assert f"model.{field}" in rejected(cfg)


def test_sequence_longer_than_position_table():
    cfg = preset("tiny-2l-2loop")
    cfg.data.seq_length = cfg.model.max_position_embeddings + 1
    msg = rejected(cfg)
    assert "data.seq_length" in msg and "model.max_position_embeddings" in msg


def test_unknown_preset_names_it():
    with pytest.raises(ConfigError, match="preset: unknown preset 'loop-9000m'"):
        preset("loop-9000m")


def test_unknown_field_names_it(tmp_path):
    with pytest.raises(ConfigError, match="model.num_loopz: unknown field"):
        load_config("tiny-1l", overrides=["model.num_loopz=3"])
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"training": {"lrr": 1.0}}))
    with pytest.raises(ConfigError, match=r"training.lrr: unknown field \(from .*c.json\)"):
        load_config(path=str(path))


def test_bad_enum_and_type_name_the_field():
    cfg = preset("tiny-1l")
    cfg.model.loop_gates = "matrix"
    assert "model.loop_gates" in rejected(cfg)
    with pytest.raises(ConfigError, match="model.num_loops: expected an integer"):
        load_config("tiny-1l", overrides=["model.num_loops=many"])


def test_batch_arithmetic_checked_against_world_size():
    cfg = preset("tiny-1l")
    cfg.training.micro_batch_size, cfg.training.global_batch_size = 4, 10
    msg = rejected(cfg, world_size=2)
    assert "training.global_batch_size" in msg and "training.micro_batch_size" in msg


def test_sequence_parallel_refusals_name_the_field():
    cfg = load_config("tiny-1l", overrides=["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true",
                                            "data.seq_length=63", "model.max_position_embeddings=64"])
    msg = rejected(cfg)
    assert "parallel.sequence_parallel" in msg and "data.seq_length (63)" in msg
    cfg.data.seq_length = 64
    cfg.validate()
    cfg.model.exit_gate = True
    assert "model.exit_gate" in rejected(cfg) and "parallel.sequence_parallel" in rejected(cfg)
    cfg.parallel.tensor_model_parallel_size = 1  # a no-op at TP=1 (the trainer notes it): nothing to refuse
    cfg.data.seq_length = 63
    cfg.validate()


def test_yaml_file_with_preset_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: tiny-2l-2loop\nmodel:\n  num_loops: 5\ntraining:\n  lr: 0.001\n")
    cfg = load_config(path=str(path), overrides=["model.loop_gates=scalar", "train_iters=7"])
    assert (cfg.model.num_layers, cfg.model.num_loops, cfg.model.loop_gates) == (2, 5, "scalar")
    assert cfg.training.lr == 0.001 and cfg.training.train_iters == 7
    cfg.validate()


def test_every_field_has_a_docstring():
    reference = describe_fields()
    for line in reference.splitlines():
        if line.startswith("| `"):
            assert not line.rstrip().endswith("|  |"), line


def test_configuration_reference_is_up_to_date():
    import subprocess
    import sys

    from tests.conftest import ROOT

    proc = subprocess.run([sys.executable, "tools/config_reference.py", "--check"], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr


# ----------------------------------------------------------------------------------------------------
# Recurrent-depth recipe fields
# ----------------------------------------------------------------------------------------------------
def test_recurrent_presets():
    tiny = preset("tiny-recurrent").validate()
    m, t = tiny.model, tiny.training
    assert (m.hidden_size, m.prelude_layers, m.num_layers, m.coda_layers) == (128, 1, 2, 1)
    assert (m.loop_injection, m.loop_state_init, m.vocab_size) == ("linear", "random", 50257)
    assert (t.loop_sampling, t.mean_loops, t.max_loops, t.backprop_loops) == ("poisson-lognormal", 4, 8, 2)
    big = preset("recurrent-97m").validate()
    assert (big.model.hidden_size, big.model.num_attention_heads, big.training.max_loops) == (768, 12, 16)
    # the defaults leave every other preset the Loop-Residual model it was
    for name in ("tiny-2l-2loop", "loop-81m", "gpt2-124m"):
        c = preset(name)
        assert (c.model.loop_injection, c.model.loop_state_init, c.training.loop_sampling) == ("none", "input", "fixed")
        assert (c.training.backprop_loops, c.training.loop_schedule) == (0, "")


def _recipe(**fields):
    cfg = preset("tiny-recurrent")
    for key, value in fields.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


@pytest.mark.parametrize("fields,named", [
    (dict(training__backprop_loops=9), "training.backprop_loops"),
    (dict(model__loop_injection="none"), "model.loop_state_init"),
    (dict(model__loop_injection="none", model__loop_state_init="zeros"), "model.loop_injection"),
    (dict(model__loop_injection="concat"), "model.loop_injection"),
    (dict(model__loop_state_init="noise"), "model.loop_state_init"),
    (dict(model__loop_state_std=0.0), "model.loop_state_std"),
    (dict(training__max_loops=3), "training.max_loops"),
    (dict(training__max_loops=0), "training.max_loops"),
    (dict(training__loop_sampling="geometric"), "training.loop_sampling"),
    (dict(training__loop_schedule="0:1;0.5:4"), "training.loop_schedule"),
    (dict(training__loop_schedule="0.1:1,0.5:4"), "training.loop_schedule"),
    (dict(training__loop_schedule="0:1,0.5:12"), "training.loop_schedule"),
    (dict(training__loop_sampling="fixed", training__loop_sampling_per_sequence=True), "loop_sampling_per_sequence"),
    (dict(training__mean_loops=0.5), "training.mean_loops"),
    (dict(training__eval_loops=-1), "training.eval_loops"),
    (dict(model__loop_gates="vector"), "model.loop_gate_count"),
    (dict(model__loop_gate_count=-1), "model.loop_gate_count"),
])
def test_recipe_refusals_name_the_field(fields, named):
    assert named in rejected(_recipe(**fields))


def test_recipe_combinations_that_work():
    _recipe(model__loop_gates="vector", model__loop_gate_count=8).validate()  # a gate per trainable depth
    _recipe(training__loop_schedule="linear:0:1,0.5:4").validate()
    _recipe(training__loop_sampling="uniform", training__loop_sampling_per_sequence=True).validate()
    cfg = preset("tiny-2l-2loop")  # the old model with a switched-on-later loop and truncation
    cfg.model.loop_gates, cfg.training.loop_schedule, cfg.training.backprop_loops = "none", "0:1,0.35:3", 2
    cfg.validate()
    cfg.model.loop_gates = "vector"  # 3 loops from the schedule but gates for 2
    assert "model.loop_gate_count" in rejected(cfg)
    cfg.training.backprop_loops = 4
    assert "training.backprop_loops" in rejected(cfg)


@pytest.mark.parametrize("overrides,match", [
    (["model.exit_criterion=halt"], "model.exit_criterion must be one of"),
    (["model.exit_criterion=gate", "model.exit_threshold=0.5"], "model.exit_criterion 'gate' needs model.exit_gate"),
    (["model.exit_gate=true", "model.exit_criterion=gate", "model.exit_threshold=1.5"], "model.exit_threshold must be a probability"),
    (["model.exit_threshold=-1"], "model.exit_threshold must be >= 0"),
    (["training.exit_entropy_beta=-0.1"], "training.exit_entropy_beta must be >= 0"),
    (["training.train_exit_gate_only=true"], "training.train_exit_gate_only needs model.exit_gate"),
])
def test_exit_settings_are_checked(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config("tiny-recurrent", overrides=overrides).validate()
    ok = load_config("tiny-recurrent", overrides=["model.exit_gate=true", "model.exit_criterion=gate",
                                                  "model.exit_threshold=0.9", "training.train_exit_gate_only=true",
                                                  "training.exit_entropy_beta=0.05"])
    ok.validate()


# ----------------------------------------------------------------------------------------------------
# One recipe source, one flag source, one definition of each derived quantity
# ----------------------------------------------------------------------------------------------------
def test_presets_carry_the_whole_recipe_and_each_has_a_wrapper():
    import os

    from loop_megatron.config import BUNDLED_DATA, PAPER_DATA, PRESET_RECIPES
    from tests.conftest import ROOT

    folder = os.path.join(ROOT, "launch", "presets")
    assert sorted(f[:-3] for f in os.listdir(folder) if f.endswith(".sh")) == sorted(PRESETS)
    for name in PRESETS:
        cfg = preset(name)
        t = cfg.training
        assert cfg.data.data_path == [BUNDLED_DATA if PRESET_RECIPES[name] == "cpu" else PAPER_DATA], name
        assert (t.save, t.run_dir) == (f"checkpoints/{name}", f"runs/{name}"), name
        assert preset(name) is not cfg and preset(name) == cfg  # a fresh, equal Config each call
        with open(os.path.join(folder, f"{name}.sh")) as f:
            commands = [line for line in f.read().splitlines() if line and not line.startswith("#")]
        assert commands == [f'exec "$(dirname "${{BASH_SOURCE[0]}}")/../train.sh" --preset {name} "$@"']
    paper, tiny = preset("loop-81m").training, preset("tiny-1l").training
    assert (paper.micro_batch_size, paper.global_batch_size, paper.train_iters, paper.precision, paper.zero_stage,
            paper.load) == (12, 480, 600000, "bf16", 1, "checkpoints/loop-81m")
    assert (tiny.train_iters, tiny.lr, tiny.min_lr, tiny.lr_warmup_iters, tiny.eval_interval, tiny.load) == \
        (200, 1e-3, 1e-4, 20, 50, "")


def test_trainer_flags_are_generated_from_the_field_docstrings():
    from loop_megatron.config import SECTIONS, field_docs
    from loop_megatron.training.arguments import CONFIG_FLAGS, build_parser, config_from_args, flag_table

    actions = {a.option_strings[0]: a for a in build_parser()._actions if a.option_strings}
    for flag, key in CONFIG_FLAGS:
        section, name = key.split(".")
        doc = " ".join(field_docs(SECTIONS[section])[name].split())
        assert actions[flag].help.replace("%%", "%") == f"{doc} [{key}]", flag
    # 54 + the two schedule-on-resume flags + skip-nonfinite-steps, max-skipped-steps and force-save-lock + 13 Megatron names of
    # existing fields (issue 24: model shape, init, dropouts, Adam, vocab, workers, GPT-2 files) + 3 W&B flags + 15 of
    # issue 24's schedules, planned exits and partial loading + --sequence-parallel + --distributed-timeout-minutes
    # (issue 25)
    assert len(flag_table()) == len(CONFIG_FLAGS) == 96
    cfg, opts = config_from_args(["--loops", "3", "--data-path", "a", "b", "--compile", "--lr", "2e-4",
                                  "--loop-schedule", "0:1,0.35:2"])
    assert (cfg.model.num_loops, cfg.data.data_path, cfg.training.compile, cfg.training.lr) == (3, ["a", "b"], True, 2e-4)
    assert {"model.num_loops", "data.data_path", "training.compile", "training.lr"} <= opts.explicit
    assert cfg.training.run_dir == "runs/custom" and opts.preset is None


def test_config_file_is_read_once(tmp_path, monkeypatch):
    import loop_megatron.training.arguments as arguments

    path = tmp_path / "run.yaml"
    path.write_text("preset: tiny-1l\ntraining:\n  lr: 0.002\n")
    calls = []
    real = arguments.read_config_file
    monkeypatch.setattr(arguments, "read_config_file", lambda p: calls.append(p) or real(p))
    cfg, opts = arguments.config_from_args(["--config", str(path)])
    assert calls == [str(path)]
    assert opts.preset == "tiny-1l" and cfg.training.run_dir == "runs/tiny-1l" and cfg.training.lr == 0.002
    assert "training.lr" in opts.explicit and "training.train_iters" not in opts.explicit


def test_derived_quantities():
    from loop_megatron.config import accumulation_steps, data_parallel_size, global_batch_size, run_folder

    cfg = preset("tiny-1l")
    cfg.parallel.tensor_model_parallel_size = 2
    assert data_parallel_size(cfg, 8) == 4 and data_parallel_size(cfg, 1) == 1
    assert (global_batch_size(cfg, 4), accumulation_steps(cfg, 4)) == (32, 1)
    cfg.training.global_batch_size = 96
    assert (global_batch_size(cfg, 4), accumulation_steps(cfg, 4)) == (96, 3)
    assert run_folder(cfg, "tiny-1l") == "runs/tiny-1l"
    cfg.training.run_dir = ""
    assert run_folder(cfg, "x") == "runs/x" and run_folder(cfg) == "runs/custom"
