"""The engine checkpoint writer: `latest` moves only after a complete save; a write error (disk full, I/O,
permission) stops with one sentence and leaves no partial folder; unfinished saves are pruned."""
import errno
import os
import resource
import signal
import subprocess

import pytest
import torch

from tests.training.helpers import PYTHON, REPO, cli_env, tiny_config, write_corpus


class _FailingEngine:
    """Stands in for a DeepSpeed engine whose save dies half-way (disk full, killed rank, ...)."""

    def __init__(self, module):
        self.module = module
        self.optimizer = torch.optim.AdamW(module.parameters())  # the rest of the save still runs its course
        self.device = torch.device("cpu")

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        with open(os.path.join(save_dir, tag, "mp_rank_00_model_states.pt"), "wb") as f:
            f.write(b"partial")
        raise OSError("No space left on device")


def test_latest_only_after_a_complete_save(tmp_path, monkeypatch):
    from loop_megatron.model import LoopGPT
    from loop_megatron import checkpoint
    from loop_megatron.checkpoint import engine

    monkeypatch.setattr(engine, "DEEPSPEED_SHARDS", True)  # the save of DeepSpeed's shards dies half-way

    prefix = write_corpus(str(tmp_path / "data"))
    ck = str(tmp_path / "ck")
    cfg = tiny_config(prefix, str(tmp_path / "run"), **{"training.save": ck})
    os.makedirs(os.path.join(ck, "iter_0000004"))
    with open(os.path.join(ck, "latest"), "w") as f:
        f.write("iter_0000004\n")
    with open(os.path.join(ck, "iter_0000004", "meta.json"), "w") as f:
        f.write("{}")
    with pytest.raises(checkpoint.CheckpointWriteError) as err:
        checkpoint.save_engine_checkpoint(_FailingEngine(LoopGPT(cfg.model)), cfg, 5, 20)
    assert "No space left on device" in str(err.value) and os.path.join(ck, "iter_0000004") in str(err.value)
    assert open(os.path.join(ck, "latest")).read().strip() == "iter_0000004"
    assert not os.path.exists(os.path.join(ck, "iter_0000005"))
    assert not os.path.exists(os.path.join(ck, "iter_0000005.tmp"))  # the partial folder is removed
    assert checkpoint.list_checkpoints(ck) == [(4, "iter_0000004")]
    # A partial folder left by a killed run is never mistaken for a checkpoint, and the next save cleans it up.
    os.makedirs(os.path.join(ck, "iter_0000005.tmp"))
    checkpoint.prune(ck, keep_last=3, keep="iter_0000006")
    assert sorted(os.listdir(ck)) == ["iter_0000004", "latest"]


def _save_errors(monkeypatch, ck, exc, background_only=False):
    """torch.save raises `exc` for every file under `ck` from now on (what a full disk does to DeepSpeed's
    shards and our files alike); with `background_only`, only in the background writer's thread (the
    ranks' RNG files are written before it starts)."""
    import threading

    real = torch.save

    def save(obj, f, *args, **kwargs):
        if background_only and threading.current_thread() is threading.main_thread():
            return real(obj, f, *args, **kwargs)
        if isinstance(f, str) and os.path.abspath(f).startswith(os.path.abspath(ck)):
            raise exc
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


@pytest.mark.parametrize("exc,background", [(OSError(errno.ENOSPC, "No space left on device"), False),
                                            (RuntimeError("basic_ios::clear: iostream error"), False),
                                            (OSError(errno.ENOSPC, "No space left on device"), True)],
                         ids=["ENOSPC", "torch", "ENOSPC-async-save"])
def test_write_error_at_save_stops_with_one_sentence_and_no_partial_folder(tmp_path, monkeypatch, exc, background):
    """Also with --async-save: the background write's failure stops the run at its end (the save of the last
    iteration), with the same sentence saying it was written in the background."""
    from loop_megatron import checkpoint
    from loop_megatron.training import RunOptions, Trainer, preflight

    prefix = write_corpus(str(tmp_path / "data"))
    ck = str(tmp_path / "ck")
    cfg = tiny_config(prefix, str(tmp_path / "run"), **{"training.save": ck, "training.save_interval": 2,
                                                         "training.async_save": background})
    trainer = Trainer(cfg, RunOptions(), preflight(cfg, RunOptions()))
    real_save = trainer.save

    def save_then_fill_the_disk():
        real_save()
        if trainer.iteration == 2:
            if trainer.writer is not None:
                trainer.writer.join()  # iteration 2's background write completes before the disk fills
            _save_errors(monkeypatch, ck, exc, background_only=background)

    trainer.save = save_then_fill_the_disk
    try:
        trainer.setup()
        with pytest.raises(checkpoint.CheckpointWriteError) as err:
            trainer.train()
    finally:
        trainer.close()
    msg = str(err.value)
    assert msg.startswith(f"could not write the checkpoint of iteration 4{' in the background' * background} ("), msg
    assert os.path.join(ck, "iter_0000004.tmp") in msg and os.path.join(ck, "iter_0000002") in msg, msg
    assert ("No space left on device" if isinstance(exc, OSError) else "basic_ios::clear") in msg
    assert "\n" not in msg
    assert [n for n in sorted(os.listdir(ck)) if not n.startswith(".")] == ["iter_0000002", "latest"]
    assert checkpoint.read_latest(ck) == "iter_0000002"


def test_file_size_limit_in_a_cli_run_gives_one_sentence(tmp_path):
    """A real short write: RLIMIT_FSIZE (SIGXFSZ ignored, so write() fails with EFBIG) in the CLI's process."""
    prefix = write_corpus(str(tmp_path / "data"))
    ck = tmp_path / "ck"

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    cmd = [PYTHON, "-m", "loop_megatron.train", "--preset", "tiny-2l-2loop", "--data-path", prefix,
           "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "16", "--micro-batch-size", "2",
           "--train-iters", "2", "--eval-iters", "0", "--precision", "fp32", "--split", "90,10,0",
           "--run-dir", str(tmp_path / "run"), "--save", str(ck),
           "--override", "model.vocab_size=256", "--override", "model.make_vocab_size_divisible_by=1",
           "--override", "model.max_position_embeddings=32", "--override", f"data.data_cache_path={tmp_path / 'c'}"]
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300, preexec_fn=limit)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: could not write the checkpoint of iteration 2"), \
        proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "basic_ios" not in proc.stderr.replace(errors[0], "")
    assert [n for n in os.listdir(ck) if not n.startswith(".")] == []  # no partial folder, no latest


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_save_folder_gives_one_sentence(tmp_path):
    from loop_megatron import checkpoint
    from loop_megatron.model import LoopGPT

    prefix = write_corpus(str(tmp_path / "data"))
    ck = tmp_path / "ck"
    ck.mkdir()
    cfg = tiny_config(prefix, str(tmp_path / "run"), **{"training.save": str(ck)})
    ck.chmod(0o500)
    try:
        with pytest.raises(checkpoint.CheckpointWriteError) as err:
            checkpoint.save_engine_checkpoint(_FailingEngine(LoopGPT(cfg.model)), cfg, 1, 4)
        assert "Permission denied" in str(err.value)
    finally:
        ck.chmod(0o700)
