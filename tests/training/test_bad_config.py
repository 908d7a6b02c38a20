"""Bad settings stop before any heavy work with one sentence and exit status 2 (no traceback)."""
import json
import os
import subprocess

import pytest

from tests.training.helpers import PYTHON, REPO, cli_env, write_corpus

TINY = ["--num-layers", "2", "--loops", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", "16", "--override", "model.vocab_size=256", "--micro-batch-size", "2", "--train-iters", "2"]


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    return write_corpus(str(tmp_path_factory.mktemp("badcfg")))


@pytest.fixture
def run_main(monkeypatch, capsys, tmp_path):
    """Run main(argv) in-process; reaching distributed init (heavy work) fails the test."""
    from loop_megatron import train
    from loop_megatron.training import trainer

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)

    def heavy(*args, **kwargs):
        raise AssertionError("heavy work started before the configuration was rejected")

    monkeypatch.setattr(trainer, "init_distributed", heavy)
    monkeypatch.setattr(trainer, "LoopGPT", heavy)

    def run(*argv):
        code = train.main(list(argv) + ["--run-dir", str(tmp_path / "run")])
        err = capsys.readouterr().err.strip()
        assert code == 2
        assert "Traceback" not in err and len(err.splitlines()) == 1, err
        assert err.startswith("error: ")
        return err[len("error: "):]

    return run


def test_missing_data_path(run_main, tmp_path):
    msg = run_main("--data-path", str(tmp_path / "nope_text_document"), *TINY)
    assert msg == (f"data.data_path: {tmp_path / 'nope_text_document'}.bin does not exist (expected the pair "
                   f"{tmp_path / 'nope_text_document'}.bin and {tmp_path / 'nope_text_document'}.idx).")


def test_missing_idx_named(run_main, tmp_path):
    (tmp_path / "half_text_document.bin").write_bytes(b"\0\0")
    msg = run_main("--data-path", str(tmp_path / "half_text_document"), *TINY)
    assert f"{tmp_path / 'half_text_document'}.idx does not exist" in msg


def test_no_data_path(run_main):
    assert "data.data_path is empty" in run_main(*TINY)


def test_global_batch_not_micro_x_accum_x_dp(run_main, prefix):
    msg = run_main("--data-path", prefix, *TINY, "--global-batch-size", "5")
    assert msg == ("training.global_batch_size (5) must equal training.micro_batch_size (2) x gradient "
                   "accumulation x data-parallel size (1).")


def test_unknown_zero_stage(run_main, prefix):
    assert run_main("--data-path", prefix, *TINY, "--zero-stage", "4") == \
        "training.zero_stage must be 0, 1, 2 or 3, got 4."


def test_unknown_zero_stage_in_ds_config(run_main, prefix, tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 5}}))
    msg = run_main("--data-path", prefix, *TINY, "--deepspeed-config", str(path))
    assert msg == (f"training.deepspeed_config: {path} sets zero_optimization.stage to 5, which is not a ZeRO "
                   "stage (0, 1, 2 or 3).")


def test_ds_config_disagreeing_batch_size(run_main, prefix, tmp_path):
    from loop_megatron.config import ConfigError
    from loop_megatron.training.arguments import config_from_args
    from loop_megatron.training.ds_config import build_ds_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2}}))
    cfg, _ = config_from_args(["--data-path", prefix, *TINY, "--deepspeed-config", str(path)])
    with pytest.raises(ConfigError) as info:
        build_ds_config(cfg, 1, "fp32", json.loads(path.read_text()))
    assert str(info.value) == (f"{path} sets train_micro_batch_size_per_gpu to 8 but this run has "
                               "training.micro_batch_size = 2; remove it from the file or make them agree.")
    # ...and the stage from the file is adopted when the command line does not set one, refused when it differs.
    msg = run_main("--data-path", prefix, *TINY, "--deepspeed-config", str(path), "--zero-stage", "1")
    assert msg == f"training.zero_stage is 1 but {path} sets zero_optimization.stage to 2; make them agree or drop one."


def test_ds_config_stage_adopted_and_fills_in():
    from loop_megatron.config import Config
    from loop_megatron.training.ds_config import adopt_ds_file_settings, build_ds_config

    cfg = Config()
    cfg.training.deepspeed_config = os.path.join(REPO, "ds_configs", "zero3_offload.json")
    cfg.training.micro_batch_size, cfg.training.global_batch_size, cfg.training.clip_grad = 2, 8, 0.5
    base = adopt_ds_file_settings(cfg, explicit=set())
    assert cfg.training.zero_stage == 3 and cfg.training.cpu_offload
    ds = build_ds_config(cfg, 2, "fp32", base, cuda=False)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (8, 2, 2)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["optimizer"]["params"]["torch_adam"] is False  # DeepSpeedCPUAdam for offload
    for name in ("zero0", "zero1", "zero2", "zero3"):
        cfg = Config()
        cfg.training.deepspeed_config = os.path.join(REPO, "ds_configs", f"{name}.json")
        build_ds_config(cfg, 1, "fp32", adopt_ds_file_settings(cfg, explicit=set()), cuda=False)
        assert cfg.training.zero_stage == int(name[-1])


def test_fp16_on_cpu(run_main, prefix):
    assert run_main("--data-path", prefix, *TINY, "--precision", "fp16") == \
        "training.precision fp16 needs a CUDA GPU (DeepSpeed refuses fp16 on CPU); use bf16 or fp32."


def test_validate_error(run_main, prefix):
    assert run_main("--data-path", prefix, *TINY, "--num-attention-heads", "5") == \
        "model.hidden_size (32) must be divisible by model.num_attention_heads (5)."


def test_cpu_offload_needs_zero(run_main, prefix):
    assert "training.cpu_offload needs training.zero_stage 1, 2 or 3" in \
        run_main("--data-path", prefix, *TINY, "--cpu-offload")


def _fake_checkpoint(directory, **model):
    from loop_megatron.config import load_config

    cfg = load_config(overrides=["model.num_layers=2", "model.num_loops=2", "model.hidden_size=32",
                                 "model.num_attention_heads=4", "model.vocab_size=256"])
    for key, value in model.items():
        setattr(cfg.model, key, value)
    os.makedirs(os.path.join(directory, "iter_0000002"))
    meta = {"format": "loop_megatron", "version": 1, "iteration": 2, "consumed_samples": 4,
            "tensor_model_parallel_size": 1, "zero_stage": 0, "world_size": 1, "config": cfg.to_dict()}
    with open(os.path.join(directory, "iter_0000002", "meta.json"), "w") as f:
        json.dump(meta, f)
    with open(os.path.join(directory, "latest"), "w") as f:
        f.write("iter_0000002\n")


def test_checkpoint_shape_mismatch(run_main, prefix, tmp_path):
    ck = str(tmp_path / "ck")
    _fake_checkpoint(ck, num_loops=3, loop_gates="scalar")
    msg = run_main("--data-path", prefix, *TINY, "--load", ck)
    assert msg == (f"checkpoint {os.path.join(ck, 'iter_0000002')} has a different model shape (model.num_loops 3 "
                   "there vs 2 here, model.loop_gates scalar there vs vector here); refusing to load it.")


def test_cli_subprocess_help_and_error():
    env = cli_env()
    helped = subprocess.run([PYTHON, "-m", "loop_megatron.train", "--help"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0
    for flag in ("--data-path", "--split", "--seq-length", "--micro-batch-size", "--global-batch-size",
                 "--train-iters", "--lr", "--min-lr", "--lr-warmup-iters", "--lr-decay-iters", "--weight-decay",
                 "--clip-grad", "--save", "--load", "--save-interval", "--eval-interval", "--eval-iters",
                 "--log-interval", "--tensorboard-dir", "--tensor-model-parallel-size", "--seed", "--preset",
                 "--config", "--zero-stage", "--cpu-offload", "--deepspeed-config", "--loops", "--inner-loops",
                 "--num-layers", "--hidden-size", "--num-attention-heads", "--loop-gates",
                 "--activation-checkpointing", "--precision", "--run-dir", "--keep-last", "--override",
                 "--local_rank"):
        assert flag in helped.stdout, flag
    bad = subprocess.run([PYTHON, "-m", "loop_megatron.train", "--data-path", "/nonexistent/x", "--local_rank=0"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip() == ("error: data.data_path: /nonexistent/x.bin does not exist "
                                                   "(expected the pair /nonexistent/x.bin and /nonexistent/x.idx).")
    assert "Traceback" not in bad.stderr


def test_no_prefix_abbreviations_and_unknown_flags_name_the_nearest(run_main, prefix):
    # argparse's default would take --hidden for --hidden-size and train a model of width 64.
    assert run_main("--data-path", prefix, *TINY, "--hidden", "64") == "unknown flag --hidden; did you mean --hidden-size?"
    assert run_main("--data-path", prefix, *TINY, "--hiden-size", "64") == \
        "unknown flag --hiden-size; did you mean --hidden-size?"
    # a config field written as a flag: its flag where it has one, else the --override item
    assert run_main("--data-path", prefix, *TINY, "--num-loops", "3") == \
        "unknown flag --num-loops; did you mean --loops (sets model.num_loops)?"
    assert run_main("--data-path", prefix, *TINY, "--gate-init", "0.5") == \
        ("unknown flag --gate-init; model.gate_init has no flag of its own: use "
         "--override model.gate_init=VALUE.")
    # argparse's own errors are one sentence too (no usage text)
    assert run_main("--data-path", prefix, *TINY, "--lr", "fast") == \
        "argument --lr: invalid float value: 'fast' (python -m loop_megatron.train --help lists the flags)."
