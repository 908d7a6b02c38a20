"""What a checkpoint holds and how to resume it (tools/checkpoint_info.py prints this)."""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

import torch

from ..config import Config
from ..model import model_summary
from .compat import saved_global_batch
from .io import resolve_checkpoint
from .layout import has_engine_files, meta_path, model_path, read_meta
from .universal import UniversalError, check_complete, has_universal, state_path


def weights_check(folder: str) -> Dict[str, Any]:
    """{"finite": bool, "nonfinite": [names of tensors holding NaN/inf]} of model.pt (read memory-mapped,
    one tensor at a time); {"finite": None, "problem": ...} when it cannot be read."""
    try:
        sd = torch.load(model_path(folder), map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # a truncated or foreign file: say so rather than fail the whole report
        return {"finite": None, "problem": f"{model_path(folder)} could not be read ({type(exc).__name__})"}
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
        sd = sd["model"]
    bad = [name for name, t in sd.items()
           if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())]
    return {"finite": not bad, "nonfinite": bad}


FILE_CLASSES = ("model.pt", "universal", "deepspeed", "rng", "other")
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def file_class(relpath: str) -> str:
    """Which part of a checkpoint a file (path relative to the tag folder) belongs to."""
    top = relpath.split(os.sep)[0]
    if relpath == "model.pt":
        return "model.pt"
    if top == "universal":
        return "universal"
    if top == "rng":
        return "rng"
    name = os.path.basename(relpath)
    if name.endswith(".pt") and ("mp_rank_" in name or "zero_pp_rank_" in name or "optim_states" in name):
        return "deepspeed"
    return "other"


def parameter_count(folder: str) -> int:
    """Elements of the model's parameters: from universal/state.json when present, else model.pt's
    tensors (memory-mapped; shared storage counted once)."""
    if has_universal(folder):
        try:
            import math

            from .universal import read_state

            return sum(math.prod(e["shape"]) for e in read_state(folder)["params"])
        except (UniversalError, KeyError, TypeError):
            pass
    sd = torch.load(model_path(folder), map_location="cpu", weights_only=True, mmap=True)
    seen, total = set(), 0
    for t in sd.values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key not in seen:
            seen.add(key)
            total += t.numel()
    return total


def size_record(folder: str, precision: Optional[str] = None) -> Dict[str, Any]:
    """Bytes of a checkpoint folder per file class (FILE_CLASSES), per parameter, and against the minimal
    state: one fp32 master and two AdamW moments (12 bytes per parameter) plus the weights in the
    training dtype (`precision`: 2 bytes for bf16/fp16, 4 for fp32)."""
    files = {c: 0 for c in FILE_CLASSES}
    for root, _, names in os.walk(folder):
        for name in names:
            full = os.path.join(root, name)
            files[file_class(os.path.relpath(full, folder))] += os.path.getsize(full)
    params = parameter_count(folder)
    total = sum(files.values())
    minimal = 12 + DTYPE_BYTES.get(precision or "fp32", 4)
    per = {c: b / params for c, b in files.items()}
    return {"params": params, "bytes": files, "total_bytes": total, "bytes_per_param": per,
            "total_bytes_per_param": total / params, "minimal_bytes_per_param": minimal,
            "vs_minimal": total / params / minimal}


def describe(path: str, tag: Optional[str] = None) -> Dict[str, Any]:
    """A JSON-able record of the checkpoint at `path` (save dir or tag folder)."""
    folder = resolve_checkpoint(path, tag)
    meta = read_meta(folder)
    cfg = Config.from_dict(meta["config"], source=meta_path(folder))
    m = cfg.model
    gbs = saved_global_batch(meta)
    consumed = int(meta.get("consumed_samples", 0))
    universal: Dict[str, Any] = {"present": has_universal(folder)}
    if universal["present"]:
        try:
            state = check_complete(folder)
            universal.update(complete=True, optimizer_step=state.get("optimizer_step"), params=len(state["params"]),
                             lr_scheduler=state.get("lr_scheduler"))
        except UniversalError as exc:
            universal.update(complete=False, problem=str(exc))
    tp, world = meta.get("tensor_model_parallel_size"), meta.get("world_size")
    record = {
        "folder": folder,
        "save_dir": os.path.dirname(folder),
        "tag": os.path.basename(folder),
        "model": {"hidden_size": m.hidden_size, "num_layers": m.num_layers, "num_loops": m.num_loops,
                  "num_attention_heads": m.num_attention_heads, "vocab_size": m.vocab_size,
                  "padded_vocab_size": m.padded_vocab_size,
                  "params": int(model_summary(m, cfg.data.seq_length)["params"])},
        "layout": {"tensor_model_parallel_size": tp, "data_parallel_size": (world // tp) if tp and world else None,
                   "world_size": world, "zero_stage": meta.get("zero_stage"),
                   "cpu_offload": meta.get("cpu_offload"), "precision": meta.get("precision")},
        "iteration": int(meta.get("iteration", 0)),
        "consumed_samples": consumed,
        "global_batch_size": gbs,
        "seq_length": cfg.data.seq_length,
        "tokens_seen": consumed * cfg.data.seq_length,
        "model_pt": os.path.isfile(model_path(folder)),
        "weights": weights_check(folder),
        "engine_state": has_engine_files(folder),
        "universal": universal,
        "tokenizer": meta.get("tokenizer") or {"type": cfg.data.tokenizer_type,
                                               "model": cfg.data.tokenizer_model or None, "recorded": False},
    }
    record["size"] = size_record(folder, meta.get("precision"))
    # Complete = resumable as is: model.pt with finite weights, and engine or universal state.
    record["complete"] = bool(record["weights"]["finite"]) and (record["engine_state"] or bool(universal.get("complete")))
    record["resume"] = resume_commands(record) if record["weights"]["finite"] is not False else {}
    return record


def resume_commands(record: Dict[str, Any]) -> Dict[str, str]:
    """Command lines that continue the run: on the saved layout, and (with universal state) on another."""
    save, lay = record["save_dir"], record["layout"]
    gbs = f" --global-batch-size {record['global_batch_size']}" if record["global_batch_size"] else ""
    base = f"python -m loop_megatron.train --config CONFIG.yaml --load {save} --save {save}{gbs}"
    out = {}
    if record["engine_state"] or record["universal"].get("complete"):
        out["same_layout"] = (f"deepspeed --num_gpus {lay['world_size']} -m loop_megatron.train --config CONFIG.yaml "
                              f"--load {save} --save {save}{gbs} --tensor-model-parallel-size "
                              f"{lay['tensor_model_parallel_size']} --zero-stage {lay['zero_stage']}")
    if record["universal"].get("complete"):
        out["any_layout"] = (f"deepspeed --num_gpus NEW_WORLD -m loop_megatron.train --config CONFIG.yaml --load {save} "
                             f"--save {save}{gbs} --tensor-model-parallel-size NEW_TP --zero-stage NEW_STAGE "
                             "(keep the global batch size; micro batch x accumulation adapts to the new DP size)")
    elif not out:
        out["init_from"] = base.replace("--load", "--init-from")
    return out


def _tokenizer_line(tok: Dict[str, Any]) -> str:
    name = tok.get("name") or tok.get("type")
    model = f" ({tok['model']})" if tok.get("model") else ""
    sha = f", sha256 {tok['sha256'][:12]}" if tok.get("sha256") else ""
    return f"{name}{model}{sha}" + ("" if tok.get("recorded", True) else " (from the config; not recorded)")


def _size_line(size: Dict[str, Any]) -> str:
    parts = ", ".join(f"{c} {size['bytes_per_param'][c]:.2f}" for c in FILE_CLASSES if size["bytes"][c])
    return (f"{size['total_bytes'] / 2 ** 20:,.1f} MiB = {size['total_bytes_per_param']:.2f} bytes/parameter "
            f"({parts}); minimal {size['minimal_bytes_per_param']} (fp32 master + 2 moments + weights in the "
            f"training dtype): {size['vs_minimal']:.2f}x")


def _weights_line(w: Dict[str, Any]) -> str:
    if w["finite"] is None:
        return f"not checked: {w['problem']}"
    if w["finite"]:
        return "all finite"
    names = ", ".join(w["nonfinite"][:3]) + (", ..." if len(w["nonfinite"]) > 3 else "")
    return f"NOT FINITE: {len(w['nonfinite'])} tensor(s) hold NaN/inf ({names})"


def format_text(record: Dict[str, Any]) -> str:
    """The human-readable report."""
    m, lay, u = record["model"], record["layout"], record["universal"]
    lines: List[str] = [
        f"checkpoint   {record['folder']}",
        f"model        {m['params'] / 1e6:.2f}M params: d={m['hidden_size']}, {m['num_layers']} layers x "
        f"{m['num_loops']} loops, {m['num_attention_heads']} heads, vocab {m['vocab_size']} "
        f"(padded {m['padded_vocab_size']})",
        f"layout       TP {lay['tensor_model_parallel_size']} x DP {lay['data_parallel_size']} "
        f"({lay['world_size']} ranks), ZeRO {lay['zero_stage']}, CPU offload {lay['cpu_offload']}, "
        f"precision {lay['precision']}",
        f"progress     iteration {record['iteration']}, {record['consumed_samples']} samples "
        f"(global batch {record['global_batch_size']}), {record['tokens_seen']:,} tokens",
        f"contents     model.pt {'yes' if record['model_pt'] else 'no'}, DeepSpeed state "
        f"{'yes' if record['engine_state'] else 'no'}, universal state "
        + ("no" if not u["present"] else ("yes, complete" if u.get("complete") else f"INCOMPLETE ({u['problem']})")),
        f"size         {_size_line(record['size'])}",
        f"tokenizer    {_tokenizer_line(record['tokenizer'])}",
        f"weights      {_weights_line(record['weights'])}",
    ]
    if record["weights"]["finite"] is False:
        lines.append("NOT A GOOD CHECKPOINT: its weights hold NaN/inf values (the run diverged before this save); "
                     "resume from an earlier tag (--tag) instead")
        return "\n".join(lines)
    lines.append("(--load resumes the save folder's 'latest' tag; CONFIG.yaml is the run's config.yaml)")
    for kind, cmd in record["resume"].items():
        lines.append(f"resume ({kind.replace('_', ' ')}): {cmd}")
    return "\n".join(lines)


__all__ = ["describe", "format_text", "resume_commands", "size_record", "state_path"]
