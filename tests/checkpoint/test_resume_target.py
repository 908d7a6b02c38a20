"""What --load names and which LR schedule a resume follows (one process, a 4-step tiny run saved at 2 and 4).

--load takes the save folder (its `latest`), a tag folder or the `latest` file; a path that does not
exist is refused, an existing folder without checkpoints starts fresh (the first `--save X --load X`
run). A resume whose LR schedule differs from the checkpoint's is refused unless
--override-opt_param-scheduler or --use-checkpoint-opt_param-scheduler says which wins.
"""
import os
import shutil

import pytest

from tests.training.helpers import pretrain_in_process, tiny_config, write_corpus

BASE = {"training.global_batch_size": 2, "training.lr_warmup_iters": 1, "training.eval_iters": 0,
        "model.num_layers": 1}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("resume_target"))
    prefix = write_corpus(os.path.join(root, "data"))
    ck = os.path.join(root, "ck")
    pretrain_in_process(tiny_config(prefix, os.path.join(root, "src"), **BASE, **{
        "training.train_iters": 4, "training.save": ck, "training.save_interval": 2, "training.keep_last": 0}))
    return root, prefix, ck


def _cfg(run, name, **extra):
    root, prefix, _ = run
    return tiny_config(prefix, os.path.join(root, name), **BASE, **{"training.train_iters": 4, **extra})


def _preflight(cfg):
    from loop_megatron.training import RunOptions, preflight

    return preflight(cfg, RunOptions())


def test_load_names_save_folder_tag_folder_or_latest(run):
    ck = run[2]
    r = _preflight(_cfg(run, "a", **{"training.load": ck}))["resume"]
    assert (r.save_dir, r.tag, r.meta["iteration"]) == (ck, "iter_0000004", 4)
    r = _preflight(_cfg(run, "b", **{"training.load": os.path.join(ck, "iter_0000002")}))["resume"]
    assert (r.save_dir, r.tag, r.meta["iteration"], r.how) == (ck, "iter_0000002", 2, "the tag folder given")
    r = _preflight(_cfg(run, "c", **{"training.load": os.path.join(ck, "latest")}))["resume"]
    assert (r.save_dir, r.tag) == (ck, "iter_0000004")


def test_missing_path_refused_and_empty_folder_starts_fresh(run, tmp_path):
    from loop_megatron.config import ConfigError

    missing = str(tmp_path / "nope")
    with pytest.raises(ConfigError, match=r"training.load: .*nope does not exist; give the save folder"):
        _preflight(_cfg(run, "d", **{"training.load": missing}))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _preflight(_cfg(run, "e", **{"training.load": str(empty)}))["resume"] is None
    # Megatron's `--save X --load X` on the first run: the missing folder is the run's own save folder.
    first = str(tmp_path / "first")
    assert _preflight(_cfg(run, "e2", **{"training.load": first + "/", "training.save": first}))["resume"] is None
    with pytest.raises(ConfigError, match=r"training.load: .*nope does not exist"):
        _preflight(_cfg(run, "e3", **{"training.load": missing, "training.save": first}))
    # Checkpoints but no `latest`: which one to resume is not guessed.
    no_latest = str(tmp_path / "no_latest")
    shutil.copytree(run[2], no_latest)
    os.remove(os.path.join(no_latest, "latest"))
    with pytest.raises(ConfigError, match=r"holds checkpoints \(iter_0000002, iter_0000004\) but no 'latest'"):
        _preflight(_cfg(run, "f", **{"training.load": no_latest}))


def test_resume_from_tag_folder_trains_on_and_says_what_it_loaded(run, tmp_path, capsys):
    ck = run[2]
    save = str(tmp_path / "save")
    out = pretrain_in_process(_cfg(run, "g", **{"training.load": os.path.join(ck, "iter_0000002"), "training.save": save}))
    assert out["start_iteration"] == 2 and out["iterations"] == 4
    assert [r["iteration"] for r in out["records"]] == [3, 4]
    text = capsys.readouterr().out
    assert (f"resumed from {os.path.join(ck, 'iter_0000002')} at iteration 2, sample 4 (save folder {ck}, tag "
            "iter_0000002: the tag folder given; universal state, same layout; RNG from the checkpoint)") in text
    assert os.path.isdir(os.path.join(save, "iter_0000004"))
    empty = str(tmp_path / "fresh")
    os.makedirs(empty)
    pretrain_in_process(_cfg(run, "h", **{"training.load": empty, "training.train_iters": 1}))
    assert f"no checkpoint in {empty} yet" in capsys.readouterr().out


def test_other_schedule_refused_naming_fields(run):
    from loop_megatron.config import ConfigError

    ck = run[2]
    with pytest.raises(ConfigError) as info:
        _preflight(_cfg(run, "i", **{"training.load": ck, "training.train_iters": 8, "training.lr": 1e-3}))
    msg = str(info.value)
    assert "another LR schedule" in msg and "training.lr 0.003 there vs 0.001 here" in msg
    assert "training.train_iters 4 there vs 8 here (decay horizon 4 there vs 8 here)" in msg
    assert "--override-opt_param-scheduler" in msg and "--use-checkpoint-opt_param-scheduler" in msg
    # A fixed lr_decay_iters keeps the curve when training longer: nothing to decide.
    assert _preflight(_cfg(run, "j", **{"training.load": ck, "training.train_iters": 8,
                                        "training.lr_decay_iters": 4}))["resume"].notes == ()


def test_checkpoint_schedule_keeps_the_curve_and_override_takes_the_new_one(run, tmp_path):
    from loop_megatron.training.optim import lr_at

    ck = run[2]
    kept = _cfg(run, "k", **{"training.load": ck, "training.train_iters": 6,
                             "training.use_checkpoint_opt_param_scheduler": True})
    out = pretrain_in_process(kept)
    assert kept.training.lr_decay_iters == 4
    # Past the checkpoint's horizon the LR stays at min_lr; before this change it rose again.
    assert [r["lr"] for r in out["records"]] == [pytest.approx(3e-4)] * 2
    new = _cfg(run, "l", **{"training.load": ck, "training.train_iters": 8,
                            "training.override_opt_param_scheduler": True})
    out = pretrain_in_process(new)
    assert new.training.lr_decay_iters == 0
    assert [r["lr"] for r in out["records"]] == [pytest.approx(lr_at(i, new.training)) for i in range(4, 8)]
    assert out["records"][0]["lr"] > 3e-4  # the LR jumps to the new curve's value at iteration 4


def test_schedule_flags_parse_and_exclude_each_other():
    from loop_megatron.config import ConfigError
    from loop_megatron.training.arguments import config_from_args

    cfg, opts = config_from_args(["--override-opt_param-scheduler"])
    assert cfg.training.override_opt_param_scheduler and "training.override_opt_param_scheduler" in opts.explicit
    cfg, _ = config_from_args(["--override-opt_param-scheduler", "--use-checkpoint-opt_param-scheduler"])
    with pytest.raises(ConfigError, match="are both set; choose one"):
        cfg.validate(1)


def test_the_new_schedule_fields_need_a_decision_too(run):
    """lr_decay_style, WSD's phase, the warm-up's start and sample-based horizons are part of the schedule: a
    change is refused unless a flag says which wins, and use-checkpoint brings back every one of them."""
    from loop_megatron.config import ConfigError, lr_schedule

    ck = run[2]
    wsd = {"training.load": ck, "training.lr_decay_style": "WSD", "training.lr_wsd_decay_iters": 2,
           "training.lr_warmup_init": 1e-4}
    with pytest.raises(ConfigError) as info:
        _preflight(_cfg(run, "m", **wsd))
    msg = str(info.value)
    assert "lr_wsd_decay_style" not in msg  # only the fields that differ are named
    assert "training.lr_decay_style cosine there vs WSD here" in msg and "training.lr_warmup_init 0.0 there vs 0.0001" in msg
    assert "training.lr_wsd_decay_iters 0 there vs 2 here" in msg
    kept = _cfg(run, "n", **wsd, **{"training.use_checkpoint_opt_param_scheduler": True})
    _preflight(kept)
    saved = _cfg(run, "saved")
    assert lr_schedule(kept.training) == lr_schedule(saved.training)  # the checkpoint's curve, every field
    assert (kept.training.lr_decay_style, kept.training.lr_warmup_init) == ("cosine", 0.0)
    new = _cfg(run, "o", **wsd, **{"training.override_opt_param_scheduler": True})
    notes = _preflight(new)["resume"].notes
    assert notes and notes[0].startswith("LR schedule from this run (--override-opt_param-scheduler)")
    assert lr_schedule(new.training).style == "WSD"
    # The checkpoint counts iterations; keeping its curve in a sample-based run cannot work.
    samples = _cfg(run, "p", **{"training.load": ck, "training.train_samples": 8,
                                "training.use_checkpoint_opt_param_scheduler": True})
    with pytest.raises(ConfigError, match=r"counts its LR schedule in iterations and this run in samples "
                                          r"\(training.train_samples decides\)"):
        _preflight(samples)
