"""Megatron-LM's LR schedules (constant, linear, cosine, inverse-square-root, WSD with its four decay
styles), warm-up from lr_warmup_init or as a fraction of the horizon, and sample-based horizons: values at
known positions against closed forms (and against megatron-core's own scheduler where it imports), every
schedule resuming exactly through the trainer, and the one-unit / one-warm-up rules."""
import math
import os

import pytest

from tests.training.helpers import pretrain_in_process, tiny_config, write_corpus


def _schedule(**fields):
    from loop_megatron.config import TrainingConfig, lr_schedule

    t = TrainingConfig(lr=1.0, min_lr=0.1, lr_warmup_iters=2, lr_decay_iters=10, train_iters=10)
    for key, value in fields.items():
        setattr(t, key, value)
    return lr_schedule(t)


def test_each_style_at_known_positions():
    cos45 = 0.5 * (math.cos(math.pi / 4) + 1)  # cosine at a quarter of the decay
    # Warm-up (every style): lr_warmup_init + (lr - init) * n / warmup for n <= warmup; the update at n = 0
    # takes the initial value, as in Megatron-LM.
    for style in ("constant", "linear", "cosine", "inverse-square-root"):
        s = _schedule(lr_decay_style=style, lr_warmup_init=0.2)
        assert (s.at(0), s.at(1), s.at(2)) == (0.2, pytest.approx(0.6), 1.0), style
    linear, cosine = _schedule(lr_decay_style="linear"), _schedule(lr_decay_style="cosine")
    assert linear.at(4) == pytest.approx(0.1 + 0.9 * 0.75) and linear.at(6) == pytest.approx(0.55)
    assert cosine.at(4) == pytest.approx(0.1 + 0.9 * cos45) and cosine.at(6) == pytest.approx(0.55)
    for s in (linear, cosine):
        assert s.at(10) == pytest.approx(0.1) and s.at(11) == 0.1 and s.at(500) == 0.1  # min_lr at and past it
    constant = _schedule(lr_decay_style="constant")
    assert constant.at(3) == constant.at(10) == constant.at(500) == 1.0
    isr = _schedule(lr_decay_style="inverse-square-root", lr_decay_iters=1000)
    assert isr.at(8) == pytest.approx(0.5) and isr.at(32) == pytest.approx(0.25)  # lr * sqrt(2 / n)
    assert isr.at(800) == 0.1  # sqrt(2/800) = 0.05: floored at min_lr
    assert _schedule(lr_decay_style="inverse-square-root").at(11) == 0.1  # past the horizon: min_lr
    # WSD: warm-up 2, stable to 10 - 4 = 6, then the decay phase shaped by lr_wsd_decay_style.
    r = 0.5  # at n = 8, halfway through the decay phase
    expected = {"exponential": 2 * 0.5 ** r - 1, "linear": 1 - r, "cosine": 0.5 * (math.cos(math.pi * r) + 1),
                "minus_sqrt": 1 - math.sqrt(r)}
    for wsd_style, coeff in expected.items():
        s = _schedule(lr_decay_style="WSD", lr_wsd_decay_iters=4, lr_wsd_decay_style=wsd_style)
        assert s.at(3) == s.at(6) == 1.0, wsd_style
        assert s.at(8) == pytest.approx(0.1 + 0.9 * coeff), wsd_style
        assert s.at(10) == pytest.approx(0.1) and s.at(11) == 0.1, wsd_style
    # lr_warmup_fraction: warm-up = fraction x the decay horizon (here 0.25 x 8 = 2).
    frac = _schedule(lr_decay_style="linear", lr_warmup_iters=0, lr_warmup_fraction=0.25, lr_decay_iters=8)
    assert (frac.warmup, frac.at(1), frac.at(5)) == (2.0, pytest.approx(0.5), pytest.approx(0.55))
    # Sample-based: horizons in samples (decay = train_samples when lr_decay_samples is 0).
    samples = _schedule(lr_decay_style="linear", train_samples=40, lr_warmup_iters=0, lr_decay_iters=0,
                        lr_warmup_samples=8)
    assert (samples.unit, samples.decay, samples.at(4), samples.at(24)) == ("samples", 40, pytest.approx(0.5),
                                                                          pytest.approx(0.55))


def test_matches_megatron_cores_scheduler():
    import warnings

    try:
        with warnings.catch_warnings():  # megatron-core warns that apex/TE are absent; irrelevant here
            warnings.simplefilter("ignore")
            from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    except Exception as err:  # a dev dependency; the closed forms above hold without it
        pytest.skip(f"megatron-core cannot be imported ({type(err).__name__}: {err})")

    class Groups:
        param_groups = [{}]

    gbs = 4  # Megatron counts samples: an iteration-based horizon of N is N x global batch there
    cases = [dict(lr_decay_style=s) for s in ("constant", "linear", "cosine", "inverse-square-root")]
    cases += [dict(lr_decay_style="WSD", lr_wsd_decay_iters=4, lr_wsd_decay_style=w)
              for w in ("exponential", "linear", "cosine", "minus_sqrt")]
    cases += [dict(lr_decay_style="cosine", lr_warmup_init=0.3, lr_warmup_iters=3)]
    for case in cases:
        ours = _schedule(**case)
        theirs = OptimizerParamScheduler(
            Groups(), init_lr=ours.init, max_lr=ours.lr, min_lr=ours.min_lr if case["lr_decay_style"] != "constant"
            else 0.1, lr_warmup_steps=ours.warmup * gbs, lr_decay_steps=10 * gbs,
            lr_decay_style=case["lr_decay_style"], start_wd=0.1, end_wd=0.1, wd_incr_steps=10 * gbs,
            wd_incr_style="constant", wsd_decay_steps=ours.wsd_decay * gbs or None,
            lr_wsd_decay_style=case.get("lr_wsd_decay_style"))
        for n in range(0, 14):
            theirs.num_steps = n * gbs
            assert ours.at(n) == pytest.approx(theirs.get_lr({}), rel=1e-12, abs=1e-15), (case, n)


# ------------------------------------------------------------------------------------------------------
# Every schedule resumes exactly through the trainer: a 6-step run saving at 3, resumed from its iteration-3
# checkpoint, gives the same LR and loss (bit for bit; dropout on, so the RNG state matters too).
# ------------------------------------------------------------------------------------------------------
BASE = {"training.global_batch_size": 2, "training.eval_iters": 0, "model.num_layers": 1,
        "model.hidden_dropout": 0.1, "training.lr_warmup_iters": 1}
SCHEDULES = {
    "constant": {"training.lr_decay_style": "constant", "training.lr_warmup_init": 1e-3, "training.lr_warmup_iters": 2},
    "linear": {"training.lr_decay_style": "linear"},
    "cosine-fraction": {"training.lr_decay_style": "cosine", "training.lr_warmup_iters": 0,
                        "training.lr_warmup_fraction": 0.4},
    "inverse-square-root": {"training.lr_decay_style": "inverse-square-root", "training.lr_warmup_iters": 2},
    "WSD": {"training.lr_decay_style": "WSD", "training.lr_wsd_decay_iters": 3},
    "WSD-samples": {"training.lr_decay_style": "WSD", "training.lr_wsd_decay_style": "minus_sqrt",
                    "training.train_samples": 12, "training.lr_wsd_decay_samples": 6, "training.lr_warmup_iters": 0,
                    "training.lr_warmup_samples": 4},
}


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    return write_corpus(str(tmp_path_factory.mktemp("data")))


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_schedule_resumes_exactly(prefix, tmp_path, name):
    from loop_megatron.config import lr_schedule

    extra = {**BASE, **SCHEDULES[name]}
    if "training.train_samples" not in extra:
        extra["training.train_iters"] = 6
    ck = str(tmp_path / "ck")
    full_cfg = tiny_config(prefix, str(tmp_path / "full"), **extra, **{
        "training.save": ck, "training.save_interval": 3, "training.keep_last": 0})
    full = pretrain_in_process(full_cfg)
    assert full["iterations"] == 6  # 12 samples of 2 per step in the sample-based case
    resumed = pretrain_in_process(tiny_config(prefix, str(tmp_path / "resumed"), **extra, **{
        "training.load": os.path.join(ck, "iter_0000003"), "training.save": str(tmp_path / "ck2")}))
    assert resumed["start_iteration"] == 3 and [r["iteration"] for r in resumed["records"]] == [4, 5, 6]
    want = {r["iteration"]: (r["lr"], r["loss"]) for r in full["records"]}
    assert [(r["lr"], r["loss"]) for r in resumed["records"]] == [want[i] for i in (4, 5, 6)]
    # The LR each update used is the curve's value at its position (updates, or samples, before it).
    s = lr_schedule(full_cfg.training)
    step = 2 if s.unit == "samples" else 1
    assert [r["lr"] for r in full["records"]] == [s.at(i * step) for i in range(6)]
    assert len({r["lr"] for r in full["records"]}) >= 3, "a schedule that does not move tests nothing"


def test_sample_based_run_sizes_itself_in_samples_and_refuses_a_mix(tmp_path):
    from loop_megatron.config import ConfigError, preset, sample_based_train_iters
    from loop_megatron.training.arguments import config_from_args

    cfg, opts = config_from_args(["--preset", "tiny-1l", "--train-samples", "1000", "--lr-warmup-samples", "80",
                                  "--global-batch-size", "16", "--micro-batch-size", "8"])
    # The preset's lr_warmup_iters (20) is nobody's choice here: reset, and said so.
    assert cfg.training.lr_warmup_iters == 0 and any("lr_warmup_iters 20" in n for n in opts.notes)
    cfg.validate(2)
    note = sample_based_train_iters(cfg, 2, opts.explicit)
    assert cfg.training.train_iters == 62 and note == ("sample-based run: training.train_samples 1000 = 62 steps of "
                                                       "16 samples (8 left over, less than a global batch)")
    with pytest.raises(ConfigError, match=r"training.train_samples \(1000\) makes a sample-based run, which cannot "
                                          r"also take training.lr_decay_iters \(300, iteration-based\); give it in "
                                          r"samples \(training.lr_decay_samples\)"):
        config_from_args(["--preset", "tiny-1l", "--train-samples", "1000", "--lr-decay-iters", "300"])
    cfg, opts = config_from_args(["--train-samples", "1000", "--train-iters", "50", "--micro-batch-size", "8"])
    with pytest.raises(ConfigError, match=r"training.train_iters \(50\) and training.train_samples \(1000, 125 steps "
                                          r"of 8 samples\) both size the run; give one"):
        sample_based_train_iters(cfg, 1, opts.explicit)
    cfg, _ = config_from_args(["--lr-decay-samples", "500"])
    with pytest.raises(ConfigError, match=r"training.lr_decay_samples \(500\) counts samples and needs a sample-based "
                                          r"run \(training.train_samples\)"):
        cfg.validate(1)
    with pytest.raises(ConfigError, match="training.lr_warmup_fraction and training.lr_warmup_iters \\(5\\) both set "
                                          "the warm-up; give one"):
        config_from_args(["--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "5"])
    cfg, _ = config_from_args(["--preset", "tiny-1l", "--lr-warmup-fraction", "0"])  # Megatron's "no warm-up"
    assert cfg.training.lr_warmup_iters == 0
    cfg = preset("tiny-1l")
    cfg.training.lr_decay_style = "WSD"
    with pytest.raises(ConfigError, match="training.lr_decay_style WSD needs training.lr_wsd_decay_iters"):
        cfg.validate(1)
    cfg.training.lr_decay_style = "cosine-ish"
    with pytest.raises(ConfigError, match=r"training.lr_decay_style must be one of \('constant', 'linear', 'cosine', "
                                          r"'inverse-square-root', 'WSD'\), got 'cosine-ish'"):
        cfg.validate(1)


def test_megatron_schedule_flags_set_their_fields():
    from loop_megatron.training.arguments import config_from_args

    cfg, opts = config_from_args(["--lr-decay-style", "WSD", "--lr-wsd-decay-style", "cosine", "--lr-wsd-decay-iters",
                                  "40", "--lr-warmup-init", "1e-5", "--lr-warmup-iters", "10", "--lr-decay-iters", "200",
                                  "--min-lr", "1e-5"])
    t = cfg.training
    assert (t.lr_decay_style, t.lr_wsd_decay_style, t.lr_wsd_decay_iters, t.lr_warmup_init, t.lr_decay_iters) == \
        ("WSD", "cosine", 40, 1e-5, 200)
    cfg.validate(1)
    assert {"training.lr_decay_style", "training.lr_wsd_decay_iters"} <= opts.explicit
