"""The "does looping pay?" study: holdout splits, every arm's trainer command, the statistics and the report."""
import dataclasses
import json
import math
import os
import shutil

import pytest

from loop_megatron.data.corpus import split_holdout
from loop_megatron.data.errors import DataError
from loop_megatron.experiments.records import ExperimentError
from loop_megatron.experiments.tables import lr_sweep_table
from loop_megatron.training.arguments import config_from_args
from studies.looping_pays import report as study_report
from studies.looping_pays.report import (RunResult, cheapest_matching_exit, compare, compute_curve_block,
                                         equivalent_layers, exit_advantage, fixed_depth_at, mean_sd, splice_readme,
                                         write_study_report)
from loop_megatron.experiments.driver import StudyError
from studies.looping_pays.study import ARMS, SOURCES, Study, StudySettings, build_parser


def test_split_holdout_is_disjoint_and_takes_the_end():
    docs = list(range(100))
    parts = split_holdout(docs, 0.05)
    assert parts["valid"] == list(range(95, 100)) and parts["test"] == list(range(90, 95))
    assert parts["train"] == list(range(90))
    assert split_holdout(docs, 0.0) == {"all": docs}
    assert len(split_holdout(list(range(5)), 0.01)["valid"]) == 1  # at least one document
    with pytest.raises(DataError, match="too few"):
        split_holdout([1, 2], 0.05, "tiny")
    with pytest.raises(DataError, match="--holdout 0.6"):
        split_holdout(docs, 0.6)


def test_every_arm_builds_a_valid_trainer_config(tmp_path, monkeypatch):
    """Each arm's command line, exactly as the study passes it, parses and validates."""
    settings = StudySettings(data_dir=str(tmp_path / "data"), tokenizer_dir=str(tmp_path / "tok"))
    study = Study(settings)
    monkeypatch.setattr(study, "train_blend", lambda: ["1.0", study.prefix("sotu", "train")])
    seen = {}
    for arm in ARMS:
        cmd = study.trainer_command(arm, seed=3, lr=4e-3, name=f"{arm.name}-s3")
        assert cmd[1:3] == ["-m", "loop_megatron.train"]
        cfg, _ = config_from_args(cmd[3:])
        cfg.validate(1)
        m, t = cfg.model, cfg.training
        assert (m.vocab_size, t.seed, t.lr, t.train_iters) == (2048, 3, 4e-3, settings.train_iters)
        assert cfg.data.split == "1,0,0" and len(cfg.data.valid_data_path) == len(SOURCES)
        seen[arm.name] = cfg
    # The recurrent arm spends exactly the 2-layer model's unique blocks (prelude 1 + core 1, no coda).
    rec, two = seen["rec"].model, seen["2L"].model
    assert rec.prelude_layers + rec.num_layers + rec.coda_layers == two.num_layers == 2
    assert rec.loop_injection == "diagonal" and seen["rec"].training.backprop_loops == 2
    assert seen["1Lx4-prog"].training.loop_schedule.startswith("linear:")
    assert settings.tokens_per_run >= 2_000_000 and len(settings.seeds) >= 2


def test_quick_settings_and_cli_overrides():
    quick = StudySettings.quick_settings()
    assert quick.quick and quick.out_dir != StudySettings().out_dir and len(quick.seeds) >= 2
    args = build_parser().parse_args(["--quick", "--only", "1L", "rec", "--tokens", "1e5"])
    assert args.only == ["1L", "rec"] and args.tokens == 1e5


def test_mean_sd_and_paired_comparison():
    m, sd, n = mean_sd([1.0, 2.0, 3.0])
    assert (m, n) == (2.0, 3) and sd == pytest.approx(1.0)
    assert mean_sd([float("nan")])[2] == 0

    def runs(arm, values):
        return [RunResult(arm, seed, valid_bpb={"a": v, "b": v}) for seed, v in enumerate(values, start=1)]

    # A is better on every seed by far more than the spread.
    c = compare(runs("A", [2.0, 2.1, 2.2]), runs("B", [2.5, 2.6, 2.7]))
    assert c["delta"] == pytest.approx(-0.5) and c["a_better"] == 3 and c["verdict"] == "A better"
    # Seeds disagree: within noise.
    c = compare(runs("A", [2.0, 2.6]), runs("B", [2.1, 2.5]))
    assert c["verdict"] == "within noise"
    # One seed: no verdict.
    assert compare(runs("A", [2.0]), runs("B", [2.5]))["verdict"] == "one seed: no verdict"


def test_equivalent_layers_interpolates_in_log_depth():
    unshared = {1: 3.0, 2: 2.8, 4: 2.6}
    assert equivalent_layers(2.8, unshared) == pytest.approx(2.0)
    assert equivalent_layers(2.9, unshared) == pytest.approx(math.sqrt(2))
    assert equivalent_layers(2.7, unshared) == pytest.approx(2 ** 1.5)
    assert equivalent_layers(2.5, unshared) == pytest.approx(2 ** 2.5)  # extended past 4 layers
    # Past the best unshared depth (4L worse than 2L) only the part where depth still pays is used.
    assert equivalent_layers(2.7, {1: 3.0, 2: 2.6, 4: 2.8}) == pytest.approx(2 ** 0.75)
    assert equivalent_layers(2.7, {1: 3.0, 2: 3.1, 4: 2.8}) is None  # depth never pays: no placement


def test_splice_readme_replaces_only_the_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- study:begin -->\nold\n<!-- study:end -->\noutro\n")
    splice_readme(str(readme), "new table\n")
    assert readme.read_text() == "intro\n<!-- study:begin -->\nnew table\n<!-- study:end -->\noutro\n"
    (tmp_path / "other.md").write_text("no markers\n")
    with pytest.raises(ExperimentError, match="no '<!-- study:begin -->'"):
        splice_readme(str(tmp_path / "other.md"), "x")


def _fake_study(tmp_path, bpb):
    """settings.json, evaluate.py JSONs and run folders as the study leaves them, with chosen numbers."""
    out, runs = tmp_path / "results", tmp_path / "runs"
    (out / "eval").mkdir(parents=True)
    arms = [a for a in ARMS if a.name in bpb]
    settings = dict(StudySettings().as_dict(), lr=4e-3, sources=["s1", "s2"], seeds=[1, 2],
                    arms=[dict(name=a.name, family=a.family, description=a.description) for a in arms])
    (out / "settings.json").write_text(json.dumps(settings))
    (out / "lr_sweep.json").write_text(json.dumps({"arm": "1L", "seed": 1, "chosen_lr": 4e-3, "criterion": "c",
                                                   "rows": [{"lr": 2e-3, "valid_bpb": 3.0}, {"lr": 4e-3, "valid_bpb": 2.9}]}))
    depth = {"1L": 1, "2L": 2, "4L": 4, "1Lx2": 2, "1Lx4": 4}
    for arm in arms:
        for seed in (1, 2):
            name = f"{arm.name}-s{seed}"
            value = bpb[arm.name] + 0.01 * seed
            rows = [{"name": s, "loops": 1, "loss": value * 2, "bpb": value, "exit_criterion": "none"} for s in ("s1", "s2")]
            for kind in ("valid", "test"):
                (out / "eval" / f"{name}.{kind}.json").write_text(json.dumps({"results": rows}))
            if arm.sweep_loops:
                sweep = [dict(r, loops=L, bpb=value + 0.1 * abs(L - depth[arm.name]), mean_iterations=L)
                         for L in (1, 2, 4) for r in rows]
                (out / "eval" / f"{name}.loops.json").write_text(json.dumps({"results": sweep}))
            run = runs / name
            run.mkdir(parents=True)
            layers = 1 if arm.name.startswith("1L") else int(arm.name[0])
            (run / "summary.json").write_text(json.dumps({
                "params": 1000 * layers, "non_embedding_params": 500 * layers, "num_layers": layers,
                "num_loops": depth[arm.name] // layers, "effective_depth": depth[arm.name], "iterations": 10,
                "tokens_seen": 40960}))
            (run / "config.yaml").write_text(f"model:\n  num_layers: {layers}\n")
            (run / "metrics.jsonl").write_text("".join(
                json.dumps({"iteration": i, "loss": 5.0 - 0.1 * i, "tokens_seen": 4096 * i,
                            "flops_per_token": 1e6 * depth[arm.name]}) + "\n" +
                json.dumps({"iteration": i, "valid_s1_bpb": value + 1 / i, "valid_s2_bpb": value + 1 / i}) + "\n"
                for i in range(1, 11)))
    return out, runs


def test_report_tables_plots_and_readme(tmp_path):
    out, runs = _fake_study(tmp_path, {"1L": 3.0, "2L": 2.8, "4L": 2.6, "1Lx2": 2.9, "1Lx4": 2.7})
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- study:begin -->\n<!-- study:end -->\n")
    written = write_study_report(str(out), str(runs), readme=str(readme))
    for key in ("curves", "depth", "loops", "results", "json", "readme"):
        assert os.path.getsize(written[key]) > 0, key
    text = (out / "results.md").read_text()
    assert "| **1Lx2** |" in text and "0.004 (chosen)" in text
    # 1Lx2 (2.91, 2.92) against 1L (3.01, 3.02): -0.1 on both seeds, spread 0.007: a clear win.
    assert "| 1Lx2 | 1L | parameters | 1.00 | 2.00 | -0.1000 ± 0.0000 | 2/2 |" in text and "A better" in text
    summary = json.loads((out / "study.json").read_text())
    worth = {w["arm"]: w for w in summary["recurrence_worth"]}
    # 1Lx2 reaches 2.9 (+0.01 per seed, as do the unshared runs): sqrt(2) unshared layers, worth 0.41 each.
    assert worth["1Lx2"]["equivalent_layers"] == pytest.approx([math.sqrt(2)] * 2)
    assert worth["1Lx2"]["worth"] == pytest.approx([math.sqrt(2) - 1] * 2)
    assert summary["arms"]["1Lx4"]["train_flops_per_token"] == [4e6, 4e6]
    assert "results/curves.png" in readme.read_text()
    # The claims follow from the comparisons: 1Lx2 beats 1L on both seeds by 0.1 >> 2 x 0.007.
    verdicts = {c["claim"]: c["verdict"] for c in summary["claims"]}
    assert verdicts["Looping beats no looping at equal parameters (1Lx2 vs 1L)"] == "reproduced"
    # 1Lx4 (2.71, 2.72) vs 4L (2.61, 2.62): worse beyond the spread, so "approaches" did not hold.
    assert verdicts["A looped model approaches the deeper unshared one of its effective depth (1Lx4 vs 4L)"].startswith(
        "not reproduced")
    assert "**The claims, checked**" in text


def test_report_archives_run_records_and_rebuilds_without_run_folders(tmp_path):
    out, runs = _fake_study(tmp_path, {"1L": 3.0, "2L": 2.8, "4L": 2.6, "1Lx2": 2.9, "1Lx4": 2.7})
    write_study_report(str(out), str(runs))
    first = (out / "results.md").read_text()
    archived = out / "runs" / "1Lx4-s1"
    records = [json.loads(line) for line in (archived / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["iteration"] for r in records if "loss" in r]
    assert train_steps == [1, 5, 10]  # first, every 5th, last
    assert sum("valid_s1_bpb" in r for r in records) == 10  # every evaluation kept
    assert json.loads((archived / "summary.json").read_text())["train_flops_per_token"] == 4e6
    shutil.rmtree(runs)
    write_study_report(str(out), str(runs))  # the archive alone rebuilds the same report
    assert (out / "results.md").read_text() == first


def test_compute_curve_block_and_the_cheapest_matching_exit(tmp_path):
    sweep = {1: [3.0, 3.1], 2: [2.5, 2.6], 4: [2.40, 2.42], 8: [2.40, 2.42]}
    exits = {0.1: {"bpb": [2.6, 2.7], "mean_iterations": [1.5, 1.6]},
             0.01: {"bpb": [2.401, 2.421], "mean_iterations": [2.9, 3.1]},   # within 0.1% of depth 4
             0.001: {"bpb": [2.40, 2.42], "mean_iterations": [3.8, 3.8]}}
    best = cheapest_matching_exit(sweep, exits, 4)
    assert best["threshold"] == 0.01 and best["mean_iterations"] == pytest.approx(3.0)
    assert best["saving"] == pytest.approx(0.25)
    assert cheapest_matching_exit(sweep, {0.1: exits[0.1]}, 4) is None
    # Against a uniform depth at the same iterations, seed 1: 2.9 iterations lie 0.45 of the way from
    # depth 2 (2.5) to depth 4 (2.40), so the uniform depth reaches 2.455 and the exit (2.401) is 0.054 better.
    adv = exit_advantage(sweep, exits)
    assert adv[0.01][0] == pytest.approx(2.401 - 2.455)
    assert fixed_depth_at({2: 2.0, 4: 1.0}, 3.0) == pytest.approx(1.5) and fixed_depth_at({2: 2.0}, 9) is None
    block = compute_curve_block({"rec": sweep}, {"rec": exits}, {"rec": 4}, "results/study/bpb_vs_loops.png")
    lines = [line for line in block.splitlines() if line.startswith("| ") and "setting" not in line]
    assert [line.split(" | ")[0] for line in lines] == ["| fixed depth 1", "| kl < 0.1", "| fixed depth 2",
                                                        "| kl < 0.01", "| kl < 0.001", "| fixed depth 4",
                                                        "| fixed depth 8"]
    assert "kl < 0.01: 3.00 iterations per token, 25% fewer than depth 4" in block
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- study-ttc:begin -->\nold\n<!-- study-ttc:end -->\nb\n")
    splice_readme(str(readme), block, "<!-- study-ttc:begin -->", "<!-- study-ttc:end -->")
    assert "kl < 0.01" in readme.read_text() and "old" not in readme.read_text()
    (tmp_path / "plain.md").write_text("x\n")
    splice_readme(str(tmp_path / "plain.md"), block, "<!-- study-ttc:begin -->", "<!-- study-ttc:end -->",
                  required=False)
    assert (tmp_path / "plain.md").read_text() == "x\n"


def test_report_without_runs_says_so(tmp_path):
    with pytest.raises(ExperimentError, match="settings.json: not found"):
        study_report.write_study_report(str(tmp_path), str(tmp_path))


def test_a_run_made_with_another_lr_is_refused(tmp_path):
    settings = StudySettings(runs_dir=str(tmp_path / "runs"), ckpt_dir=str(tmp_path / "ckpt"))
    run = tmp_path / "runs" / "1L-s1"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("training:\n  lr: 0.002\n")
    study = Study(settings)
    assert study.is_trained("1L-s1", settings.train_iters, 0.002) is False  # same LR, not finished
    with pytest.raises(StudyError, match="trained with lr 0.002 but the study now uses 0.001"):
        study.is_trained("1L-s1", settings.train_iters, 0.001)


def test_report_refuses_an_evaluated_run_without_its_record(tmp_path):
    """Parameters, FLOPs and curves come from the archived run records: a missing one is refused in one sentence
    (a fresh clone once lacked them and the report wrote '–' parameters and flipped claims with exit 0)."""
    out, runs = _fake_study(tmp_path, {"1L": 3.0, "1Lx2": 2.9})
    write_study_report(str(out), str(runs))
    shutil.rmtree(runs)
    (out / "runs" / "1Lx2-s2" / "summary.json").unlink()
    before = (out / "results.md").read_text()
    with pytest.raises(ExperimentError, match=r"1Lx2-s2/summary.json is missing: the evaluated run 1Lx2-s2 needs"):
        write_study_report(str(out), str(runs))
    assert (out / "results.md").read_text() == before  # nothing rewritten


def test_each_arm_gets_its_own_lr_from_one_grid_on_valid_bpb(tmp_path, monkeypatch):
    """The per-arm sweep: every arm at every grid LR (training and evaluation stubbed with known valid bpb),
    each arm's lowest valid bpb chosen, a choice at the grid's edge marked, arms swept earlier kept by a
    later run on other arms, and all of them forgotten when the grid changes."""
    valid = {("1L", 5e-4): 2.6, ("1L", 1e-3): 2.4, ("1L", 2e-3): 2.5,
             ("4L", 5e-4): 2.3, ("4L", 1e-3): 2.35, ("4L", 2e-3): 2.5}
    trained = []
    monkeypatch.setattr(Study, "train_arm", lambda self, arm, seed, lr, name, label: trained.append((arm.name, seed, lr)))

    def fake_evaluate(self, name, kind, extra, split="valid"):
        arm, lr = name.split("-", 1)[1].rsplit("-s", 1)[0], float(name.split("-")[0][2:])
        path = tmp_path / f"{name}.{kind}.json"
        rows = [{"name": s, "loops": 1, "bpb": valid[(arm, lr)], "exit_criterion": "none"} for s in ("s1", "s2")]
        path.write_text(json.dumps({"results": rows}))
        return str(path)

    monkeypatch.setattr(Study, "evaluate", fake_evaluate)
    settings = StudySettings(out_dir=str(tmp_path / "out"), runs_dir=str(tmp_path / "runs"),
                             ckpt_dir=str(tmp_path / "ck"))
    arms = {a.name: a for a in ARMS}
    study = Study(settings, log=lambda line: None)
    assert study.choose_lrs([arms["1L"]]) == {"1L": 1e-3}
    assert study.choose_lrs([arms["4L"]]) == {"1L": 1e-3, "4L": 5e-4}  # 1L kept from the first run
    assert trained == [("1L", 1, lr) for lr in settings.lr_grid] + [("4L", 1, lr) for lr in settings.lr_grid]
    sweep = json.loads((tmp_path / "out" / "lr_sweep.json").read_text())
    assert sweep["grid"] == list(settings.lr_grid) and sweep["seed"] == 1
    assert not sweep["arms"]["1L"]["at_grid_edge"] and sweep["arms"]["4L"]["at_grid_edge"]
    assert [r["valid_bpb"] for r in sweep["arms"]["4L"]["rows"]] == [2.3, 2.35, 2.5]
    # the report's table: one row per arm and LR, the choice marked
    table = lr_sweep_table(sweep, [("valid bpb", lambda r: f"{r['valid_bpb']:.4f}")])
    assert "| 4L | 0.0005 (chosen, grid edge) | 2.3000 |" in table and "| 1L | 0.001 (chosen) | 2.4000 |" in table
    # another grid: the earlier choices no longer hold
    study.s.lr_grid = (1e-3, 2e-3)
    assert study.choose_lrs([arms["4L"]]) == {"4L": 1e-3}


def test_report_of_a_per_arm_lr_study(tmp_path):
    out, runs = _fake_study(tmp_path, {"1L": 3.0, "2L": 2.8})
    settings = json.loads((out / "settings.json").read_text())
    (out / "settings.json").write_text(json.dumps(dict(settings, lr={"1L": 1e-3, "2L": 5e-4})))
    (out / "lr_sweep.json").write_text(json.dumps({"seed": 1, "criterion": "c", "grid": [5e-4, 1e-3], "arms": {
        arm: {"chosen_lr": lr, "at_grid_edge": lr == 5e-4,
              "rows": [{"lr": 5e-4, "valid_bpb": 3.1}, {"lr": 1e-3, "valid_bpb": 3.0}]}
        for arm, lr in (("1L", 1e-3), ("2L", 5e-4))}}))
    write_study_report(str(out), str(runs))
    text = (out / "results.md").read_text()
    assert "the peak LR chosen per arm (below)" in text and "**Learning rate per arm**" in text
    assert "| 2L | 0.0005 (chosen, grid edge) | 3.1000 |" in text and "| 1L | 0.001 (chosen) | 3.0000 |" in text


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _study_block(text: str) -> str:
    begin, end = study_report.README_BEGIN, study_report.README_END
    assert begin in text and end in text, "README.md has no study block"
    return text[text.index(begin):text.index(end)]


def test_committed_records_rebuild_the_readme_results_unchanged(tmp_path, monkeypatch):
    """The README's Results and results/study/results.md follow from the committed records alone: the
    report, run on a copy of results/study with no runs/ folder beside it (as on a fresh clone), writes
    them back unchanged. Fails when a record is missing, ignored by git, or edited without the report."""
    src = os.path.join(REPO, "results", "study")
    if os.path.isdir(os.path.join(REPO, ".git")) or os.path.isfile(os.path.join(REPO, ".git")):
        import subprocess
        probe = os.path.join("results", "study", "runs", "1L-s1", "summary.json")
        ignored = subprocess.run(["git", "check-ignore", "-q", probe], cwd=REPO).returncode == 0
        assert not ignored, f".gitignore hides {probe}: a fresh clone would not have the study's run records"
    out = tmp_path / "results" / "study"
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("*.png"))
    readme = tmp_path / "README.md"
    shutil.copy(os.path.join(REPO, "README.md"), readme)
    monkeypatch.chdir(tmp_path)  # the report names its inputs by the path it is given: the repository's relative one
    write_study_report(os.path.join("results", "study"), "no-runs-here", readme="README.md")
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        committed = f.read()
    assert _study_block(readme.read_text(encoding="utf-8")) == _study_block(committed)
    assert readme.read_text(encoding="utf-8") == committed  # the compute-curve block too
    with open(os.path.join(src, "results.md"), encoding="utf-8") as f:
        assert (out / "results.md").read_text(encoding="utf-8") == f.read()


def test_data_made_with_another_vocab_or_holdout_is_refused_not_reused(tmp_path):
    """The data step's reuse check: the tokenizer's vocabulary and each source's held-out document shares."""
    settings = StudySettings(data_dir=str(tmp_path / "data"), tokenizer_dir=str(tmp_path / "tok"))
    study = Study(settings)
    os.makedirs(settings.tokenizer_dir)
    with open(study.tokenizer_file, "w") as f:
        json.dump({"model": {"vocab": {str(i): i for i in range(settings.vocab_size)}}}, f)
    os.makedirs(settings.data_dir)
    for src in SOURCES:
        for part, docs in (("train", 90), ("valid", 5), ("test", 5)):  # 5% each, as the default holdout
            with open(study.prefix(src, part) + ".meta.json", "w") as f:
                json.dump({"num_documents": docs}, f)
    study.check_data()
    with pytest.raises(StudyError, match=r"has 2048 tokens, the settings ask for vocab_size 4096: remove"):
        Study(dataclasses.replace(settings, vocab_size=4096)).check_data()
    with pytest.raises(StudyError, match=r"sotu_valid_text_document holds 5.0% of sotu's documents, the settings ask "
                                         r"for holdout 0.1"):
        Study(dataclasses.replace(settings, holdout=0.1)).check_data()
