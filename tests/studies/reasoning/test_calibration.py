"""The calibration probes' records and their loss table (studies/reasoning/calibration.py)."""
import json

from loop_megatron.data.tasks import LETTERS, follow_chain
from studies.reasoning.calibration import probe_records, window_means


def test_probe_records_answer_what_each_probe_asks():
    last = probe_records("last-letter", 50, [1, 2], 16, 4, seed=1)
    assert all(r["answer"] == r["prompt"][-2] and len(r["prompt"]) == 16 + 3 for r in last)
    chain = probe_records("chain", 50, [2, 3], 16, 4, seed=1, nodes=9)
    for r in chain:
        points = [LETTERS.index(c) for c in r["prompt"][:-1]]
        assert len(points) == 9 and r["answer"] == LETTERS[follow_chain(points)]
    assert probe_records("chain", 5, [2], 16, 4, seed=1, nodes=9) == probe_records("chain", 5, [2], 16, 4, 1, 9)


def test_window_means_average_each_window_of_the_metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"iteration": i, "loss": float(i)} for i in range(1, 7)] + [{"iteration": 6, "valid_loss": 9.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert window_means(str(path), 3) == {3: 2.0, 6: 5.0}
