"""Checkpoints: the one definition of the on-disk layout and everything that reads or writes it.

`layout` names the files and folders (tags, `latest`, meta.json, listing, pruning), `io` reads and writes
the consolidated TP=1 weights without DeepSpeed (tools, Hugging Face conversion, `--init-from`),
`compat` refuses a checkpoint that does not fit the run, `rng` saves and restores each rank's random
state, and `engine` does the collective DeepSpeed save/resume and the consolidation of sharded weights.
The trainer, tools/ and hf/ use this package; it depends only on config, model and utils.
"""
from .compat import SHAPE_FIELDS, check_compatible, check_same_shape, find_init_from, find_resume
from .engine import consolidated_state_dict, load_engine_checkpoint, save_engine_checkpoint
from .io import load_checkpoint, load_model, resolve_checkpoint, save_checkpoint_files
from .tokenizer import load_tokenizer, save_tokenizer, tokenizer_for
from .layout import (FORMAT, LATEST_FILE, META_FILE, MODEL_FILE, VERSION, CheckpointError, list_checkpoints,
                     list_tags, prune, read_latest, read_meta, tag_for)

__all__ = ["CheckpointError", "FORMAT", "LATEST_FILE", "META_FILE", "MODEL_FILE", "SHAPE_FIELDS", "VERSION",
           "check_compatible", "check_same_shape", "consolidated_state_dict", "find_init_from", "find_resume",
           "list_checkpoints", "list_tags", "load_checkpoint", "load_engine_checkpoint", "load_model", "prune",
           "read_latest", "read_meta", "resolve_checkpoint", "save_checkpoint_files", "save_engine_checkpoint",
           "tag_for", "load_tokenizer", "save_tokenizer", "tokenizer_for"]
