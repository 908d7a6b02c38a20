"""train.py with Megatron's --reset-position-ids --reset-attention-mask --eod-mask-loss: the flags reach the
config, the run says so, its last valid loss is what evaluating the checkpoint gives with the run's document
layout (read from the checkpoint), over the targets that do not follow an end-of-document token, and not what
the same weights give when the documents see each other."""

import torch

from loop_megatron.data import EOD_ID, preprocess
from loop_megatron.training.arguments import config_from_args
from tests.data.test_loss_mask import RECORDS, write_records
from tests.training.helpers import evaluate_tiny_run, train_tiny_cli

FLAGS = ["--reset-position-ids", "--reset-attention-mask", "--eod-mask-loss"]


def test_flags_set_the_data_fields():
    cfg, _ = config_from_args(["--preset", "tiny-1l", *FLAGS])
    assert (cfg.data.reset_position_ids, cfg.data.reset_attention_mask, cfg.data.eod_mask_loss) == (True, True, True)
    plain, _ = config_from_args(["--preset", "tiny-1l"])
    assert not (plain.data.reset_position_ids or plain.data.reset_attention_mask or plain.data.eod_mask_loss)


def test_train_py_keeps_packed_documents_apart_and_evaluation_does_too(tmp_path):
    from loop_megatron.inference.evaluation import evaluate, load_for_evaluation

    src = write_records(tmp_path / "docs.jsonl", [{"text": r["prompt"] + r["answer"]} for r in RECORDS * 2])
    preprocess(src, str(tmp_path / "docs"), append_eod=True, workers=1, progress=False)
    prefix = str(tmp_path / "docs_text_document")
    proc = train_tiny_cli(prefix, tmp_path, *FLAGS)
    assert "documents: reset_position_ids, reset_attention_mask, eod_mask_loss" in proc.stdout, proc.stdout[-2000:]
    result, valid = evaluate_tiny_run(prefix, tmp_path)
    windows = torch.stack([torch.as_tensor(valid[i]["tokens"]) for i in range(4)])
    after_eod = int((windows[:, :-1] == EOD_ID).sum())
    assert after_eod > 0 and result.tokens == 4 * 16 - after_eod
    ev = load_for_evaluation(str(tmp_path / "ck"))
    assert ev.layout is not None and ev.layout.eod == EOD_ID
    seen_together = evaluate(ev.model, ev.sets["valid"], ev.micro_batch_size, 2)  # no layout: one text per window
    assert seen_together.tokens == 4 * 16
    assert abs(seen_together.loss - result.loss) > 1e-4
