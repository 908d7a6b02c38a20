"""Resume anywhere: a checkpoint saved on one layout (TP size, DP size, ZeRO stage) continues on another.

Each source run trains 3 steps uninterrupted, saving at steps 2 and 3 (every checkpoint carries the
universal/ state). The step-2 checkpoint is resumed on another layout twice:
- with no step, saving at once: the state gathered back from the new layout's partitions must equal the
  saved one bit for bit (masters, moments, step, schedule, samples): the resharding itself is lossless;
- for one more step: its step-3 universal state is compared with the uninterrupted run's: equal
  iteration, optimizer step, LR-schedule position and consumed samples; moments within MOMENT_RTOL and
  weights within WEIGHT_RTOL relative (fp32 reduction-order noise). Elements whose gradient is at fp32
  rounding level (RMS < 1e-9: the attention key bias, whose exact gradient is zero because softmax is
  shift-invariant) are compared absolutely (NOISE_ATOL): AdamW divides their noise by ~eps, so no layout
  change can reproduce them to a relative bound.
  The bounds are about 10x the largest difference bench/layout_spread.py --suite universal measured over
  seeds 1-4: moments 3.5e-7, weights 1.1e-7, noise-level weights 1.6e-6 (absolute), loss 4.8e-7.
One resumption stays on the saved layout (universal/ with each rank's RNG) and must be bit-exact after its step.

Layout pairs (2 gloo ranks: TP x DP = 2): every ZeRO stage is a source and a target, TP 1->2 and 2->1,
DP 1->2 and 2->1.
"""
import json
import os
import shutil

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.training.helpers import tiny_config, write_corpus

TP2 = {"parallel.tensor_model_parallel_size": 2}
SOURCES = {  # name: layout overrides
    "tp2_z0": {"training.zero_stage": 0, **TP2},
    "dp2_z1": {"training.zero_stage": 1},
    "dp2_z2": {"training.zero_stage": 2},
    "dp2_z3": {"training.zero_stage": 3},
}
RESUMES = [  # (source, target name, target layout)
    ("tp2_z0", "dp2_z3", {"training.zero_stage": 3}),            # TP 2->1, DP 1->2, ZeRO 0->3
    ("dp2_z1", "tp2_z2", {"training.zero_stage": 2, **TP2}),     # TP 1->2, DP 2->1, ZeRO 1->2
    ("dp2_z2", "dp2_z0", {"training.zero_stage": 0}),            # ZeRO 2->0 (DP 2 both)
    ("dp2_z3", "tp2_z1", {"training.zero_stage": 1, **TP2}),     # TP 1->2, DP 2->1, ZeRO 3->1
    ("dp2_z2", "dp2_z2", {"training.zero_stage": 2}),            # same layout: universal/ + per-rank RNG
]
MOMENT_RTOL = 4e-6
WEIGHT_RTOL = 1e-6
NOISE_ATOL = 2e-5
LOSS_ATOL = 5e-6
BASE = {"training.global_batch_size": 4, "training.lr_warmup_iters": 1, "training.lr_decay_iters": 6,
        "training.eval_iters": 0, "model.num_layers": 1}


def _copy_tag(src_save: str, tag: str, dst_save: str) -> None:
    """A save dir holding only `tag` of `src_save` (so --load resumes from it, not from the newest)."""
    os.makedirs(dst_save, exist_ok=True)
    shutil.copytree(os.path.join(src_save, tag), os.path.join(dst_save, tag))
    with open(os.path.join(dst_save, "latest"), "w") as f:
        f.write(tag + "\n")


def _worker(rank, world_size, root, prefix, seed=7):
    from loop_megatron.training import RunOptions, pretrain

    def run(name, layout, **extra):
        cfg = tiny_config(prefix, os.path.join(root, "runs", name), **BASE, **layout, **extra,
                          **{"training.seed": seed})
        res = pretrain(cfg, RunOptions())
        return {k: res[k] for k in ("records", "start_iteration", "iterations")}

    out = {"sources": {}, "resumed": {}}
    for name, layout in SOURCES.items():
        ck = os.path.join(root, name, "ck")
        out["sources"][name] = run(name, layout, **{"training.train_iters": 3, "training.save": ck,
                                                    "training.save_interval": 2, "training.keep_last": 0})
        if rank == 0:
            _copy_tag(ck, "iter_0000002", os.path.join(root, name, "at2"))
    for source, target, layout in RESUMES:
        key = f"{source}->{target}"
        load = os.path.join(root, source, "at2")
        if source != target:  # round trip: load on the new layout, save again without a step
            run(key + "-roundtrip", layout, **{"training.train_iters": 2, "training.load": load,
                                               "training.save": os.path.join(root, "roundtrip", key)})
        out["resumed"][key] = run(key, layout, **{"training.train_iters": 3, "training.load": load,
                                                  "training.save": os.path.join(root, "resumed", key)})
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("universal"))
    prefix = write_corpus(os.path.join(root, "data"))
    return run_distributed(_worker, 2, root, prefix)[0], root, prefix


def _universal(folder):
    from loop_megatron.checkpoint import read_full_state

    return read_full_state(folder)


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


STATE_FIELDS = ("iteration", "optimizer_step", "lr_scheduler", "consumed_samples", "global_batch_size")


@pytest.mark.parametrize("source,target,layout", [r for r in RESUMES if r[0] != r[1]],
                         ids=[f"{s}->{t}" for s, t, _ in RESUMES if s != t])
def test_reshard_round_trip_is_exact(runs, source, target, layout):
    out, root, _ = runs
    key = f"{source}->{target}"
    saved_state, saved = _universal(os.path.join(root, source, "ck", "iter_0000002"))
    state, got = _universal(os.path.join(root, "roundtrip", key, "iter_0000002"))
    for field in STATE_FIELDS:
        assert state[field] == saved_state[field], field
    assert state["optimizer_step"] == 2 and state["source_layout"] != saved_state["source_layout"]
    for name in saved:
        for k in ("fp32", "exp_avg", "exp_avg_sq"):
            assert torch.equal(got[name][k], saved[name][k]), f"{name} {k}"


@pytest.mark.parametrize("source,target,layout", RESUMES, ids=[f"{s}->{t}" for s, t, _ in RESUMES])
def test_resume_on_other_layout_matches_uninterrupted(runs, source, target, layout):
    out, root, _ = runs
    key = f"{source}->{target}"
    resumed = out["resumed"][key]
    assert resumed["start_iteration"] == 2 and resumed["iterations"] == 3
    ref_state, ref = _universal(os.path.join(root, source, "ck", "iter_0000003"))
    state, got = _universal(os.path.join(root, "resumed", key, "iter_0000003"))
    for field in STATE_FIELDS:
        assert state[field] == ref_state[field], field
    assert state["iteration"] == 3 and state["optimizer_step"] == 3 and state["consumed_samples"] == 12
    ref_rec = {r["iteration"]: r for r in out["sources"][source]["records"]}
    (rec,) = resumed["records"]
    assert rec["lr"] == ref_rec[3]["lr"]
    assert abs(rec["loss"] - ref_rec[3]["loss"]) <= LOSS_ATOL
    assert sorted(got) == sorted(ref)
    same_layout = source == target
    for name in ref:
        for k in ("fp32", "exp_avg", "exp_avg_sq"):
            a, b = got[name][k], ref[name][k]
            if same_layout:
                assert torch.equal(a, b), f"{name} {k} not bit-exact"
            elif k != "fp32":
                assert _rel(a, b) <= MOMENT_RTOL, f"{name} {k}: {_rel(a, b)}"
            else:
                noise = ref[name]["exp_avg_sq"].sqrt() < 1e-9
                assert _rel(a[~noise], b[~noise]) <= WEIGHT_RTOL, f"{name}: {_rel(a[~noise], b[~noise])}"
                assert float(torch.cat([(a[noise] - b[noise]).abs(), torch.zeros(1)]).max()) <= NOISE_ATOL, name
    meta = json.load(open(os.path.join(root, "resumed", key, "iter_0000003", "meta.json")))
    assert meta["universal"] is True and meta["global_batch_size"] == 4


def test_universal_matches_model_pt_and_moments_are_live(runs):
    """The universal masters are model.pt's weights (fp32 run); the moments are real (non-zero) state."""
    _, root, _ = runs
    folder = os.path.join(root, "dp2_z3", "ck", "iter_0000003")
    state, params = _universal(folder)
    sd = torch.load(os.path.join(folder, "model.pt"), weights_only=True)
    assert [e["name"] for e in state["params"]] == list(params)
    for name, rec in params.items():
        assert torch.equal(rec["fp32"], sd[name])
        assert list(rec["fp32"].shape) == list(sd[name].shape)
    assert all(float(rec["exp_avg_sq"].abs().sum()) > 0 for rec in params.values())
    assert state["source_layout"]["zero_stage"] == 3 and state["source_layout"]["data_parallel_size"] == 2


def test_refuses_truncated_universal_and_other_batch(runs, monkeypatch, tmp_path):
    from loop_megatron.config import ConfigError
    from loop_megatron.training import RunOptions, preflight

    _, root, prefix = runs
    monkeypatch.setenv("WORLD_SIZE", "2")
    src = os.path.join(root, "dp2_z1", "at2")

    def config(load, **extra):
        return tiny_config(prefix, str(tmp_path / "refused"), **{**BASE, "training.load": load, **extra})

    # Another global batch size: refused in one sentence, or continued from the same sample on request.
    with pytest.raises(ConfigError, match="global batch size 4 but this run uses 8"):
        preflight(config(src, **{"training.global_batch_size": 8}), RunOptions())
    checks = preflight(config(src, **{"training.global_batch_size": 8, "training.override_global_batch": True,
                                       "training.zero_stage": 1}), RunOptions())
    assert checks["resume"].mode == "universal" and checks["resume"].same_layout
    assert preflight(config(src, **{"training.zero_stage": 3, **TP2}), RunOptions())["resume"].mode == "universal"
    # A truncated universal folder names the missing file.
    broken = str(tmp_path / "broken")
    _copy_tag(os.path.join(root, "dp2_z1", "ck"), "iter_0000002", broken)
    os.remove(os.path.join(broken, "iter_0000002", "universal", "params", "wpe.weight.pt"))
    with pytest.raises(ConfigError, match=r"universal/params/wpe\.weight\.pt: missing"):
        preflight(config(broken, **{"training.zero_stage": 3}), RunOptions())
    # No universal state at all: another layout is refused naming the change; the same one too, since the
    # checkpoint holds no DeepSpeed shards either (universal/ is its one copy of the optimizer state).
    shutil.rmtree(os.path.join(broken, "iter_0000002", "universal"))
    with pytest.raises(ConfigError, match="zero_stage 1 there vs 3 here"):
        preflight(config(broken, **{"training.zero_stage": 3}), RunOptions())
    with pytest.raises(ConfigError, match="holds neither DeepSpeed's shards nor a universal/ state"):
        preflight(config(broken, **{"training.zero_stage": 1}), RunOptions())


def test_checkpoint_info_tool(runs, capsys):
    import subprocess
    import sys

    from tests.training.helpers import REPO, cli_env

    _, root, _ = runs
    save = os.path.join(root, "dp2_z1", "ck")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "checkpoint_info.py"), save, "--json"],
                          capture_output=True, text=True, env=cli_env(), check=True)
    info = json.loads(proc.stdout)
    assert info["tag"] == "iter_0000003" and info["iteration"] == 3 and info["consumed_samples"] == 12
    assert info["tokens_seen"] == 12 * 16 and info["global_batch_size"] == 4
    assert info["layout"] == {"tensor_model_parallel_size": 1, "data_parallel_size": 2, "world_size": 2,
                              "zero_stage": 1, "cpu_offload": False, "precision": "fp32"}
    assert info["universal"]["complete"] is True and info["universal"]["optimizer_step"] == 3
    assert info["model_pt"] and not info["engine_state"] and "any_layout" in info["resume"]
    assert "same_layout" in info["resume"] and info["size"]["bytes"]["deepspeed"] == 0
    text = subprocess.run([sys.executable, os.path.join(REPO, "tools", "checkpoint_info.py"),
                           os.path.join(save, "iter_0000002")], capture_output=True, text=True, env=cli_env(),
                          check=True).stdout
    assert "ZeRO 1" in text and "iteration 2, 8 samples" in text and "universal state yes, complete" in text


def _offload_worker(rank, world_size, root, prefix):
    from loop_megatron.training import RunOptions, pretrain

    cfg = tiny_config(prefix, os.path.join(root, "runs", "offload"), **{
        **BASE, "training.zero_stage": 2, "training.cpu_offload": True, "training.train_iters": 3,
        "training.load": os.path.join(root, "dp2_z1", "at2"), "training.save": os.path.join(root, "offload")})
    return pretrain(cfg, RunOptions())["start_iteration"]


def test_resume_with_cpu_offload(runs):
    """ZeRO-1 -> ZeRO-2 with CPU optimizer offload (DeepSpeedCPUAdam; runs where its op is built)."""
    from tests.training.test_offload import _cpu_adam_built

    if not (_cpu_adam_built() or os.environ.get("LOOP_MEGATRON_TEST_OFFLOAD") == "1"):
        pytest.skip("DeepSpeedCPUAdam not built yet (set LOOP_MEGATRON_TEST_OFFLOAD=1 to build it, ~80 s)")
    _, root, prefix = runs
    assert run_distributed(_offload_worker, 2, root, prefix)[0] == 2
    ref_state, ref = _universal(os.path.join(root, "dp2_z1", "ck", "iter_0000003"))
    state, got = _universal(os.path.join(root, "offload", "iter_0000003"))
    for field in STATE_FIELDS:
        assert state[field] == ref_state[field], field
    for name in ref:
        for k in ("exp_avg", "exp_avg_sq"):
            assert _rel(got[name][k], ref[name][k]) <= 1e-6, f"{name} {k}"
        noise = ref[name]["exp_avg_sq"].sqrt() < 1e-9
        assert _rel(got[name]["fp32"][~noise], ref[name]["fp32"][~noise]) <= 1e-6, name


def test_override_global_batch_continues_from_consumed_samples():
    """--override-global-batch: resumed at iteration 2 after 8 samples (global batch 4), now 8 per step:
    the first step reads samples 8..15, i.e. what a global-batch-8 run reads at its iteration 1."""
    from loop_megatron.training.data import TrainBatchSampler

    resumed = list(TrainBatchSampler(2, 4, 8, 2, 2, 1, first_sample=8))
    fresh = list(TrainBatchSampler(1, 3, 8, 2, 2, 1))
    assert resumed == fresh and sorted(i for mb in resumed[:2] for i in mb) == [10, 11, 14, 15]
