"""train.py with Megatron's --reset-position-ids --reset-attention-mask --eod-mask-loss: the flags reach the
config, the run says so, its last valid loss is what evaluating the checkpoint gives with the run's document
layout (read from the checkpoint), over the targets that do not follow an end-of-document token, and not what
the same weights give when the documents see each other."""
import json

import pytest
import torch

from loop_megatron.data import EOD_ID, build_train_valid_test_datasets, preprocess
from loop_megatron.training.arguments import config_from_args
from tests.data.test_loss_mask import RECORDS, write_records
from tests.training.helpers import train_tiny_cli

FLAGS = ["--reset-position-ids", "--reset-attention-mask", "--eod-mask-loss"]


def test_flags_set_the_data_fields():
    cfg, _ = config_from_args(["--preset", "tiny-1l", *FLAGS])
    assert (cfg.data.reset_position_ids, cfg.data.reset_attention_mask, cfg.data.eod_mask_loss) == (True, True, True)
    plain, _ = config_from_args(["--preset", "tiny-1l"])
    assert not (plain.data.reset_position_ids or plain.data.reset_attention_mask or plain.data.eod_mask_loss)


def test_train_py_keeps_packed_documents_apart_and_evaluation_does_too(tmp_path):
    from loop_megatron.inference.evaluation import evaluate, evaluate_checkpoint, load_for_evaluation

    src = write_records(tmp_path / "docs.jsonl", [{"text": r["prompt"] + r["answer"]} for r in RECORDS * 2])
    preprocess(src, str(tmp_path / "docs"), append_eod=True, workers=1, progress=False)
    prefix = str(tmp_path / "docs_text_document")
    proc = train_tiny_cli(prefix, tmp_path, *FLAGS)
    assert "documents: reset_position_ids, reset_attention_mask, eod_mask_loss" in proc.stdout, proc.stdout[-2000:]
    summary = json.load(open(tmp_path / "run" / "summary.json"))
    results, meta = evaluate_checkpoint(str(tmp_path / "ck"), eval_iters=2)
    assert results[0].loss == pytest.approx(summary["final_valid_loss"], rel=1e-5)
    valid = build_train_valid_test_datasets([prefix], "70,30,0", 16, meta["eval_data"]["seed"], (0, None, 0),
                                            str(tmp_path / "cache"))[1]
    windows = torch.stack([torch.as_tensor(valid[i]["tokens"]) for i in range(4)])
    after_eod = int((windows[:, :-1] == EOD_ID).sum())
    assert after_eod > 0 and results[0].tokens == 4 * 16 - after_eod
    ev = load_for_evaluation(str(tmp_path / "ck"))
    assert ev.layout is not None and ev.layout.eod == EOD_ID
    seen_together = evaluate(ev.model, ev.sets["valid"], ev.micro_batch_size, 2)  # no layout: one text per window
    assert seen_together.tokens == 4 * 16
    assert abs(seen_together.loss - results[0].loss) > 1e-4
