"""tools/plot_runs.py / loop_megatron.experiments on synthetic runs: PNGs, the results table, loss vs loops."""
import json
import os
import subprocess
import sys

import pytest
import yaml

from loop_megatron.config import preset
from loop_megatron.experiments.plots import plot_loss_vs_loops
from loop_megatron.experiments.records import ExperimentError, expand_run_dirs, load_eval_json, load_run, load_runs
from loop_megatron.experiments.report import write_report
from loop_megatron.experiments.tables import loops_markdown, results_markdown

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_run(root, name, preset_name, *, gates=None, step_time, train, valid, params=None, write_summary=True):
    """A run folder as the trainer leaves it: config.yaml, summary.json, tensorboard/ events."""
    from torch.utils.tensorboard import SummaryWriter

    run_dir = os.path.join(root, name)
    os.makedirs(run_dir)
    cfg = preset(preset_name)
    if gates:
        cfg.model.loop_gates = gates
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(cfg.to_dict(), f)
    writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))
    for step, loss in train:
        writer.add_scalar("train/loss", loss, step)
        writer.add_scalar("train/tokens_seen", step * 1024, step)
    for step, loss in valid:
        writer.add_scalar("valid/loss", loss, step)
    writer.add_scalar("train/step_time", step_time, train[-1][0])
    writer.close()
    m = cfg.model
    if write_summary:
        summary = {"preset": preset_name, "params": params or 1_000_000, "non_embedding_params": 1000,
                   "num_layers": m.num_layers, "num_loops": m.num_loops, "inner_loops": m.inner_loops,
                   "effective_depth": m.effective_depth, "iterations": train[-1][0],
                   "tokens_seen": train[-1][0] * 1024, "final_train_loss": train[-1][1],
                   "final_valid_loss": valid[-1][1], "tokens_per_sec": 1024 / step_time, "step_time": step_time,
                   "run_dir": run_dir, "save": None}
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(summary, f)
    return run_dir


@pytest.fixture
def runs(tmp_path):
    root = str(tmp_path / "runs")
    curve = lambda start: [(i, start - 0.01 * i) for i in range(1, 51)]  # noqa: E731
    dirs = [
        make_run(root, "tiny-2l-2loop", "tiny-2l-2loop", step_time=0.30, train=curve(6.0),
                 valid=[(25, 6.1), (50, 5.6)], params=6_868_736),
        make_run(root, "tiny-2l-2loop-nogate", "tiny-2l-2loop", gates="none", step_time=0.29, train=curve(6.2),
                 valid=[(25, 6.3), (50, 5.8)], params=6_868_224),
        make_run(root, "tiny-1l", "tiny-1l", step_time=0.20, train=curve(6.5), valid=[(25, 6.6), (50, 6.25)],
                 params=6_670_208),
    ]
    return root, dirs


def table_rows(markdown):
    lines = [l for l in markdown.splitlines() if l.startswith("| ") and not l.startswith("| run ")]
    return {cells[0]: cells for cells in ([c.strip() for c in l.strip("|").split("|")] for l in lines)}


def test_load_run_reads_events_config_and_summary(runs):
    _, dirs = runs
    run = load_run(dirs[0])
    assert run.name == "tiny-2l-2loop"
    assert [s for s, _ in run.scalars["train/loss"]] == list(range(1, 51))
    assert run.scalars["valid/loss"] == [(25, pytest.approx(6.1)), (50, pytest.approx(5.6))]
    assert run.gates == "vector" and run.num_loops == 2 and run.unique_layers == 2 and run.effective_depth == 4
    assert run.label == "tiny-2l-2loop: 2L x 2 loops, vector gates, 6.87M"
    assert load_run(dirs[1]).label == "tiny-2l-2loop-nogate: 2L x 2 loops, no gates, 6.87M"
    assert load_run(dirs[2]).label == "tiny-1l: 1L, 6.67M"


def test_report_writes_png_and_table_with_right_values(runs, tmp_path):
    root, dirs = runs
    out = str(tmp_path / "out")
    written = write_report([os.path.join(root, "*")], out)
    png = os.path.join(out, "loss_curves.png")
    assert written["loss_curves"] == png
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(png) > 10_000
    text = open(os.path.join(out, "results.md")).read()
    assert "step time (x tiny-1l)" in text  # the 1-layer baseline is the reference when present
    rows = table_rows(text)
    assert set(rows) == {"tiny-2l-2loop", "tiny-2l-2loop-nogate", "tiny-1l"}
    # run | params | unique layers | loops | effective depth | gates | tokens seen | train | valid | tok/s | rel
    assert rows["tiny-2l-2loop"] == ["tiny-2l-2loop", "6.87M", "2", "2", "4", "vector", "51,200", "5.5000",
                                     "5.6000", "3,413", "1.50"]
    assert rows["tiny-2l-2loop-nogate"][5] == "none"
    assert rows["tiny-2l-2loop-nogate"][10] == "1.45"
    assert rows["tiny-1l"][1:6] == ["6.67M", "1", "1", "1", "–"]
    assert rows["tiny-1l"][8] == "6.2500" and rows["tiny-1l"][10] == "1.00"
    assert not [f for f in os.listdir(out) if ".tmp" in f]


def test_baseline_falls_back_to_first_run_and_values_fall_back_to_events(tmp_path):
    root = str(tmp_path / "runs")
    a = make_run(root, "a", "tiny-2l-3loop", step_time=0.6, train=[(1, 7.0), (2, 6.5)], valid=[(2, 6.7)],
                 write_summary=False)
    b = make_run(root, "b", "tiny-4l", step_time=0.3, train=[(1, 7.1), (2, 6.9)], valid=[(2, 6.95)])
    runs = load_runs([a, b])
    text = results_markdown(runs)
    assert "step time (x a)" in text
    rows = table_rows(text)
    assert rows["a"][3] == "3" and rows["a"][4] == "6"      # loops and depth from config.yaml
    assert rows["a"][7] == "6.5000" and rows["a"][8] == "6.7000"  # losses from the event files
    assert rows["a"][1] == "6.87M"                         # parameters computed from the config
    assert rows["b"][10] == "0.50"


def test_bad_run_folder_is_one_sentence(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExperimentError, match="not a run folder"):
        load_run(str(tmp_path / "empty"))
    with pytest.raises(ExperimentError, match="matches no run folder"):
        expand_run_dirs([str(tmp_path / "nothing*")])


def write_eval(path, trained, losses):
    results = [{"loops": n, "loss": l, "perplexity": 2.718 ** l, "tokens": 4096, "batches": 4}
               for n, l in losses.items()]
    with open(path, "w") as f:
        json.dump({"checkpoint": "ckpt", "trained_loops": trained, "results": results}, f)


def test_loss_vs_loops_table_and_png(tmp_path):
    write_eval(tmp_path / "tiny-2l-2loop.json", 2, {1: 6.5, 2: 5.6, 3: 5.55, 4: 5.7})
    write_eval(tmp_path / "tiny-1l-4loop.json", 4, {8: 6.0, 1: 7.0, 4: 5.9})
    evals = [load_eval_json(str(tmp_path / n)) for n in ("tiny-2l-2loop.json", "tiny-1l-4loop.json")]
    assert [p["loops"] for p in evals[1].points] == [1, 4, 8]
    table = loops_markdown(evals)
    lines = table.splitlines()
    assert lines[0] == "| model | trained loops | 1 loop | 2 loops | 3 loops | 4 loops | 8 loops | best |"
    assert lines[2] == "| tiny-2l-2loop | 2 | 6.5000 | 5.6000* | 5.5500 | 5.7000 | – | 3 loops |"
    assert lines[3] == "| tiny-1l-4loop | 4 | 7.0000 | – | – | 5.9000* | 6.0000 | 4 loops |"
    png = plot_loss_vs_loops(evals, str(tmp_path / "out" / "loss_vs_loops.png"))
    assert open(png, "rb").read(4) == b"\x89PNG"


def test_bad_eval_json_names_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"results": [{"loss": 1.0}]}))
    with pytest.raises(ExperimentError, match=r"bad\.json: results\[0\] lacks 'loops'"):
        load_eval_json(str(bad))


def test_cli_end_to_end(runs, tmp_path):
    root, dirs = runs
    write_eval(tmp_path / "tiny-2l-2loop.json", 2, {1: 6.5, 2: 5.6, 3: 5.55, 4: 5.7})
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "plot_runs.py"), *dirs, "--out", str(out),
                           "--eval-json", str(tmp_path / "*.json")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(out)) == ["loss_curves.png", "loss_vs_loops.md", "loss_vs_loops.png", "results.md"]
    text = (out / "results.md").read_text()
    assert "| tiny-2l-2loop | 2 | 6.5000 | 5.6000* |" in text
    assert len(table_rows(text.split("## Loss vs.")[0])) == 3
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "plot_runs.py"), str(tmp_path / "nope"),
                           "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode != 0 and "run folder not found" in proc.stderr
