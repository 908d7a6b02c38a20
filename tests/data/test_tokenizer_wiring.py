"""The data level wired through: the trainer refuses data of another tokenizer, validates on named sets with
bits per byte, checkpoints carry the tokenizer, and evaluation, generation and the HF export use it."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from loop_megatron.config import ConfigError
from loop_megatron.data import DataError, build_tokenizer, preprocess
from loop_megatron.training.arguments import RunOptions

from .conftest import tiny_corpus_texts, write_jsonl

VOCAB = 400  # the conftest tokenizer's vocabulary


def _documents():
    """The tiny corpus cut into 120-character documents (so that short windows hold document ends)."""
    docs = []
    for text in tiny_corpus_texts():
        docs += [text[i:i + 120] for i in range(0, len(text), 120)]
    return docs


def _dataset(tmp, name, texts, tokenizer_type="HuggingFaceTokenizer", model=None):
    src = write_jsonl(os.path.join(tmp, f"{name}.jsonl"), texts)
    preprocess(src, os.path.join(tmp, name), append_eod=True, progress=False, tokenizer_type=tokenizer_type,
               tokenizer_model=model)
    return os.path.join(tmp, f"{name}_text_document")


def _config(tmp, prefixes, tokenizer_dir, **extra):
    from tests.training.helpers import tiny_config

    values = {"data.tokenizer_type": "HuggingFaceTokenizer", "data.tokenizer_model": tokenizer_dir,
              "model.vocab_size": VOCAB, "training.eval_iters": 3}
    values.update(extra)
    return tiny_config(prefixes[0], os.path.join(tmp, "run"), **values)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_tokenizer_dir):
    """A 4-step run on two HF-tokenized sources, validated on both by name, saved with its tokenizer."""
    from loop_megatron.training.trainer import pretrain

    tmp = str(tmp_path_factory.mktemp("wired"))
    docs = _documents()
    a = _dataset(tmp, "a", docs[0::2], model=tiny_tokenizer_dir)
    b = _dataset(tmp, "b", docs[1::2], model=tiny_tokenizer_dir)
    cfg = _config(tmp, [a], tiny_tokenizer_dir, **{"data.data_path": ["0.5", a, "0.5", b],
                                                    "data.valid_data_path": [f"alpha={a}", f"beta={b}"],
                                                    "training.save": os.path.join(tmp, "ckpt")})
    summary = pretrain(cfg)
    import torch.distributed as dist

    if dist.is_initialized():  # pretrain set up a world of one in this process; later tests read WORLD_SIZE
        dist.destroy_process_group()
    return {"tmp": tmp, "a": a, "b": b, "cfg": cfg, "summary": summary, "save": cfg.training.save,
            "tok": build_tokenizer("HuggingFaceTokenizer", tiny_tokenizer_dir)}


def test_preflight_refuses_data_of_another_tokenizer(tmp_path, tiny_tokenizer_dir):
    from loop_megatron.training.trainer import preflight

    hf_data = _dataset(str(tmp_path), "hf", _documents()[:6], model=tiny_tokenizer_dir)
    gpt2_data = _dataset(str(tmp_path), "g", _documents()[:6], tokenizer_type="GPT2BPETokenizer")
    # GPT-2 run (vocab 50257 model) on a dataset made by the trained tokenizer.
    cfg = _config(str(tmp_path), [hf_data], tiny_tokenizer_dir, **{"data.tokenizer_type": "GPT2BPETokenizer",
                                                                  "data.tokenizer_model": "",
                                                                  "model.vocab_size": 50257})
    with pytest.raises(DataError, match=r"hf_text_document\.meta\.json: the dataset was made by HuggingFaceTokenizer"):
        preflight(cfg, RunOptions())
    # HF run on a GPT-2 dataset, named as a validation set only.
    cfg = _config(str(tmp_path), [hf_data], tiny_tokenizer_dir, **{"data.valid_data_path": [f"g={gpt2_data}"]})
    with pytest.raises(DataError, match=r"g_text_document\.meta\.json: the dataset was made by GPT2BPETokenizer"):
        preflight(cfg, RunOptions())
    # A model vocabulary smaller than the tokenizer's.
    cfg = _config(str(tmp_path), [hf_data], tiny_tokenizer_dir, **{"model.vocab_size": 256})
    with pytest.raises(ConfigError, match=r"model.vocab_size \(256\) is smaller than the vocabulary"):
        preflight(cfg, RunOptions(explicit={"model.vocab_size"}))
    cfg = _config(str(tmp_path), [hf_data], tiny_tokenizer_dir)
    assert preflight(cfg, RunOptions())["tokenizer"].vocab_size == VOCAB


def test_named_valid_sets_are_reported_separately(trained):
    run = trained["cfg"].training.run_dir
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl")) if "valid" in line]
    final = [r for r in rows if r["iteration"] == 4]
    alpha = next(r for r in final if "valid_alpha_loss" in r)
    beta = next(r for r in final if "valid_beta_loss" in r)
    # The first set is the primary one: also under the unnamed keys existing plots read.
    assert alpha["valid_loss"] == alpha["valid_alpha_loss"] and alpha["valid_bpb"] == alpha["valid_alpha_bpb"]
    assert "valid_loss" not in beta and beta["valid_beta_loss"] != alpha["valid_alpha_loss"]
    assert 0 < beta["valid_beta_bpb"] < 20
    summary = json.load(open(os.path.join(run, "summary.json")))
    assert summary["final_valid_loss"] == alpha["valid_alpha_loss"]
    assert summary["final_valid_bpb"] == {"alpha": alpha["valid_alpha_bpb"], "beta": beta["valid_beta_bpb"]}


def test_checkpoint_carries_the_tokenizer_and_resume_refuses_another(trained):
    from loop_megatron.checkpoint import load_tokenizer, read_meta, resolve_checkpoint
    from loop_megatron.checkpoint import check_same_tokenizer

    folder = resolve_checkpoint(trained["save"])
    meta = read_meta(folder)
    assert meta["tokenizer"] == trained["tok"].describe()
    assert os.path.isfile(os.path.join(folder, "tokenizer.json"))
    assert load_tokenizer(folder).sha256 == trained["tok"].sha256
    check_same_tokenizer(meta, trained["tok"], folder)
    with pytest.raises(ConfigError, match=r"was trained with HuggingFaceTokenizer .* but this run uses GPT2BPETokenizer"):
        check_same_tokenizer(meta, build_tokenizer(), folder)


def _reference_byte_lengths(tokenizer_json):
    """UTF-8 bytes per id from the vocabulary strings through GPT-2's byte alphabet (written out here:
    printable bytes stand for themselves, the other 68 map to chr(256 + n) in byte order)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    others = [b for b in range(256) if b not in printable]
    decode = {chr(b): b for b in printable}
    decode.update({chr(256 + n): b for n, b in enumerate(others)})
    spec = json.load(open(tokenizer_json, encoding="utf-8"))
    lengths = np.zeros(VOCAB, np.int64)
    for token, i in spec["model"]["vocab"].items():
        lengths[i] = len(bytes(decode[c] for c in token))
    for added in spec["added_tokens"]:
        lengths[added["id"]] = 0 if added["special"] else len(added["content"].encode("utf-8"))
    return lengths


def test_evaluate_bpb_matches_hand_computation(trained, capsys):
    from loop_megatron.checkpoint import load_model
    from loop_megatron.inference.evaluation import build_eval_sets, evaluate_checkpoint
    from tests.hf.helpers import tool_main

    save, a, b = trained["save"], trained["a"], trained["b"]
    results, _ = evaluate_checkpoint(save, [], seq_length=16, micro_batch_size=2, eval_iters=4,
                                     named=[f"alpha={a}", f"beta={b}"], cache_dir=os.path.join(trained["tmp"], "c"))
    assert [r.name for r in results] == ["alpha", "beta"]
    model = load_model(save)
    lengths = _reference_byte_lengths(trained["tok"].model_path)
    # evaluate_checkpoint samples with the run's seed (its training.seed), as the trainer did.
    sets = build_eval_sets([], "", 16, seed=trained["cfg"].training.seed, named=[f"alpha={a}", f"beta={b}"],
                           cache_dir=os.path.join(trained["tmp"], "c"))
    zero_byte_targets = 0
    for r, ds in zip(results, sets.values()):
        tokens = torch.stack([torch.as_tensor(ds[i]["tokens"], dtype=torch.long) for i in range(8)])
        with torch.no_grad():
            logits = model(tokens[:, :-1])[0]
        nll = F.cross_entropy(logits.reshape(-1, VOCAB).double(), tokens[:, 1:].reshape(-1), reduction="none")
        target_bytes = lengths[tokens[:, 1:].reshape(-1).numpy()]
        zero_byte_targets += int((target_bytes == 0).sum())
        expected = float(nll[torch.from_numpy(target_bytes > 0)].sum()) / (np.log(2) * target_bytes.sum())
        assert r.loss == pytest.approx(float(nll.mean()), rel=1e-6)
        assert r.bpb == pytest.approx(expected, rel=1e-6) and r.bytes == int(target_bytes.sum())
    assert zero_byte_targets > 0  # some end-of-document targets were left out of bpb

    main = tool_main("evaluate")
    out_json = os.path.join(trained["tmp"], "eval.json")
    assert main(["--load", save, "--valid-data-path", f"alpha={a}", f"beta={b}", "--seq-length", "16",
                 "--micro-batch-size", "2", "--eval-iters", "4", "--json", out_json, "--device", "cpu",
                 "--data-cache-path", os.path.join(trained["tmp"], "c")]) == 0
    printed = capsys.readouterr().out
    assert "| set | loops | loss | perplexity | bpb | tokens |" in printed and "| beta | 2* |" in printed
    rows = json.load(open(out_json))["results"]
    assert [r["name"] for r in rows] == ["alpha", "beta"] and rows[1]["bpb"] == pytest.approx(results[1].bpb)
    # A GPT-2 tokenizer named on the command line does not match the data: one sentence.
    assert main(["--load", save, "--valid-data-path", a, "--tokenizer-type", "GPT2BPETokenizer"]) == 1
    assert "the dataset was made by HuggingFaceTokenizer" in capsys.readouterr().err


def test_hf_export_tokenizer_round_trips_and_generate_uses_it(trained, capsys):
    from transformers import AutoTokenizer

    from loop_megatron.hf import convert_checkpoint_to_hf
    from tests.hf.helpers import tool_main

    tok = trained["tok"]
    out = os.path.join(trained["tmp"], "hf")
    # The gated run exports the loop_gpt architecture, whose folder transformers loads with remote code.
    assert convert_checkpoint_to_hf(trained["save"], out, overwrite=True) == "loop_gpt"
    hf = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    config = json.load(open(os.path.join(out, "config.json")))
    assert hf.eos_token_id == hf.bos_token_id == tok.eod == config["eos_token_id"] == config["bos_token_id"]
    for text in ["The Congress shall assemble, naïve café.", "日本語 🙂 tabs\tand\nlines  "]:
        ids = hf.encode(text, add_special_tokens=False)
        assert ids == tok.encode(text) and hf.decode(ids) == text

    main = tool_main("generate")
    assert main(["--load", trained["save"], "--prompt", "The Congress", "--max-new-tokens", "6",
                 "--temperature", "0", "--ignore-eod", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    ids = tok.encode(text.rstrip("\n"))
    assert text.startswith("The Congress") and max(ids) < VOCAB


def test_vocab_size_follows_the_tokenizer_unless_set(tmp_path, tiny_tokenizer_dir):
    """model.vocab_size not set explicitly: the HF tokenizer's vocabulary (not GPT-2's 50,257), or on a
    resume the checkpoint's (same tokenizer); set explicitly it is kept (and a smaller one is refused)."""
    import yaml

    import torch.distributed as dist

    from loop_megatron.training.trainer import preflight, pretrain

    data = _dataset(str(tmp_path), "v", _documents()[:40], model=tiny_tokenizer_dir)
    cfg = _config(str(tmp_path), [data], tiny_tokenizer_dir, **{"model.vocab_size": 50257})
    checks = preflight(cfg, RunOptions())
    assert cfg.model.vocab_size == VOCAB
    assert any(n.startswith(f"model.vocab_size {VOCAB} from the vocabulary of the tokenizer") for n in checks["data_notes"])
    cfg = _config(str(tmp_path), [data], tiny_tokenizer_dir, **{"model.vocab_size": 512})
    preflight(cfg, RunOptions(explicit={"model.vocab_size"}))
    assert cfg.model.vocab_size == 512
    # A checkpoint trained with vocab 512 (set) is resumed with 512 when the resume does not set it.
    save = str(tmp_path / "ck")
    cfg = _config(str(tmp_path), [data], tiny_tokenizer_dir, **{"model.vocab_size": 512, "training.train_iters": 1, "training.lr_decay_iters": 2,
                                                               "training.save": save, "training.eval_iters": 0})
    try:
        pretrain(cfg, RunOptions(explicit={"model.vocab_size"}))
        resumed = _config(str(tmp_path / "r"), [data], tiny_tokenizer_dir, **{
            "model.vocab_size": 50257, "training.train_iters": 2, "training.lr_decay_iters": 2, "training.load": save, "training.eval_iters": 0})
        pretrain(resumed, RunOptions())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert resumed.model.vocab_size == 512
    with open(os.path.join(resumed.training.run_dir, "config.yaml")) as f:
        assert yaml.safe_load(f)["model"]["vocab_size"] == 512
