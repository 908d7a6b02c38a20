"""The studies' shared driver (loop_megatron/experiments/driver.py) as both studies call it.

A study subclass that shadows a driver method with another signature breaks every real run while stubbed
tests pass (the LM study's `run(only, ...)` once replaced the driver's `run(cmd, log)`, so its first
subprocess called the report instead). So: no override changes a signature, and one real subprocess per
study goes through `train_arm` -> `StudyDriver.train` -> `StudyDriver.run` with a stand-in trainer."""
import inspect
import json
import sys

import pytest

from loop_megatron.experiments.driver import StudyDriver, StudyError
from studies.looping_pays.study import ARMS as LM_ARMS, Study, StudySettings
from studies.reasoning.study import ARMS as REASONING_ARMS, ReasoningSettings, ReasoningStudy

DRIVER_METHODS = [n for n, f in vars(StudyDriver).items() if callable(f) and not n.startswith("__")]

# A stand-in for `python -m loop_megatron.train`: writes what a finished run leaves (its summary and the
# checkpoint's `latest`) and prints a progress line.
FAKE_TRAINER = """
import json, os, sys
run, ckpt, iters = sys.argv[1:4]
os.makedirs(run, exist_ok=True); os.makedirs(ckpt, exist_ok=True)
json.dump({"iterations": int(iters)}, open(os.path.join(run, "summary.json"), "w"))
open(os.path.join(ckpt, "latest"), "w").write("iter_%s" % iters)
print("iter %s/%s | loss 1.0" % (iters, iters))
"""


@pytest.mark.parametrize("study", [Study, ReasoningStudy])
def test_no_study_shadows_a_driver_method_with_another_signature(study):
    for name in DRIVER_METHODS:
        if name in vars(study):
            base, own = inspect.signature(getattr(StudyDriver, name)), inspect.signature(getattr(study, name))
            assert list(own.parameters) == list(base.parameters), (
                f"{study.__name__}.{name}{own} shadows StudyDriver.{name}{base}")


def _study(kind, tmp_path, monkeypatch, lines):
    if kind == "lm":
        settings = StudySettings(runs_dir=str(tmp_path / "runs"), ckpt_dir=str(tmp_path / "ck"),
                                 out_dir=str(tmp_path / "out"))
        study, arm, iters = Study(settings, log=lines.append), LM_ARMS[0], settings.train_iters
    else:
        settings = ReasoningSettings(runs_dir=str(tmp_path / "runs"), ckpt_dir=str(tmp_path / "ck"),
                                     out_dir=str(tmp_path / "out"), train_iters=7)
        study, arm, iters = ReasoningStudy(settings, log=lines.append), REASONING_ARMS[0], 7
    monkeypatch.setattr(type(study), "trainer_command", lambda self, arm, seed, lr, name: [
        sys.executable, "-c", FAKE_TRAINER, self.run_dir(name), self.ckpt_dir(name), str(iters)])
    return study, arm, iters


@pytest.mark.parametrize("kind", ["lm", "reasoning"])
def test_train_arm_runs_the_trainer_subprocess_once_and_resumes(kind, tmp_path, monkeypatch):
    lines = []
    study, arm, iters = _study(kind, tmp_path, monkeypatch, lines)
    study.train_arm(arm, 1, 1e-3, "a-s1", "[1/1]")
    assert study.is_trained("a-s1", iters)
    log = (tmp_path / "runs" / "a-s1" / "train.log").read_text()
    assert log.startswith("$ ") and f"iter {iters}/{iters} | loss 1.0" in log
    assert any(f"a-s1 iter {iters}/{iters}" in line for line in lines)  # progress echoed
    study.train_arm(arm, 1, 1e-3, "a-s1", "[1/1]")  # a finished run is not trained again
    assert lines[-1] == "[1/1] a-s1: trained already" and log == (tmp_path / "runs" / "a-s1" / "train.log").read_text()


def test_a_failing_step_names_its_log(tmp_path):
    driver = StudyDriver(str(tmp_path / "runs"), str(tmp_path / "ck"), log=lambda line: None)
    with pytest.raises(StudyError, match=r"failed \(exit 3\); see .*x\.log"):
        driver.run([sys.executable, "-c", "import sys; sys.exit(3)"], str(tmp_path / "x.log"))
    json.dumps(DRIVER_METHODS)  # the list the signature test walks is not empty by accident
    assert {"run", "train", "is_trained"} <= set(DRIVER_METHODS)
