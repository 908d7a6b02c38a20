"""Checkpoints: the one definition of the on-disk layout and everything that reads or writes it.

`layout` names the files and folders (tags, `latest`, meta.json, listing, pruning), `tokenizer` answers
which tokenizer a run or checkpoint uses (`tokenizer_for`) and copies it into checkpoints, `io` reads and writes
the consolidated TP=1 weights without DeepSpeed (tools, Hugging Face conversion, `--init-from`),
`compat` refuses a checkpoint that does not fit the run and decides how a fitting one is resumed, `rng`
saves and restores each rank's random state, `lock` keeps one live run per save folder, `engine` does the collective save (and the resume of
DeepSpeed's shards where a checkpoint holds them) and the consolidation of sharded weights, `background`
runs a save's writes in a thread (training.async_save), and `universal` writes and reads the topology-free training state
(full fp32 masters + AdamW moments per parameter, step, schedule, data position) that resumes a run on
another TP size, DP size, ZeRO stage, CPU offload or precision; `partial` loads part of a checkpoint
(--no-load-optim, --no-load-rng, --finetune).
The trainer, tools/ and hf/ use this package; it depends only on config, model, utils and (for the
tokenizer check) data.
"""
from .compat import (SHAPE_FIELDS, Resume, check_compatible, check_same_shape, check_same_tokenizer, find_init_from,
                     find_resume, layout_changes, locate_resume, resume_vocab_size, saved_global_batch,
                     schedule_changes)
from .background import BackgroundWriter
from .engine import (CheckpointWriteError, consolidated_state_dict, last_good_checkpoint, load_engine_checkpoint,
                     nonfinite_tensors, run_layout, save_engine_checkpoint, wait_for_background)
from .lock import SaveFolderBusy, SaveLock
from .io import load_checkpoint, load_model, resolve_checkpoint, save_checkpoint_files
from .tokenizer import load_tokenizer, save_tokenizer, tokenizer_for
from .layout import (FORMAT, LATEST_FILE, META_FILE, MODEL_FILE, VERSION, CheckpointError, list_checkpoints,
                     list_tags, prune, read_latest, read_meta, tag_for)
from .universal import (UniversalError, has_universal, load_universal_optimizer, load_universal_weights,
                        read_full_state)
from .partial import MasterWeights, load_position, load_weights, restore_rng_or_reseed, set_master_weights

__all__ = ["BackgroundWriter", "wait_for_background", "CheckpointError", "CheckpointWriteError", "SaveFolderBusy", "SaveLock", "last_good_checkpoint",
           "nonfinite_tensors", "FORMAT", "LATEST_FILE", "META_FILE", "MODEL_FILE", "SHAPE_FIELDS", "VERSION",
           "Resume", "UniversalError", "check_compatible", "check_same_shape", "check_same_tokenizer",
           "has_universal", "layout_changes", "locate_resume", "resume_vocab_size", "schedule_changes", "load_universal_optimizer", "load_universal_weights",
           "read_full_state", "run_layout", "saved_global_batch", "consolidated_state_dict", "find_init_from", "find_resume",
           "list_checkpoints", "list_tags", "load_checkpoint", "load_engine_checkpoint", "load_model", "prune",
           "read_latest", "read_meta", "resolve_checkpoint", "save_checkpoint_files", "save_engine_checkpoint",
           "tag_for", "load_tokenizer", "save_tokenizer", "tokenizer_for", "MasterWeights", "load_position",
           "load_weights", "restore_rng_or_reseed", "set_master_weights"]
