"""Hugging Face conversion: loop_megatron checkpoints <-> GPT2LMHeadModel / custom `loop_gpt` folders.

`configuration_loop_gpt.py` and `modeling_loop_gpt.py` are the self-contained sources copied into
exported folders (loaded with ``trust_remote_code=True``); `convert.py` holds the conversion logic.
transformers is imported lazily, so importing this package is cheap.
"""
from .convert import (ConversionError, application_order, choose_format, convert_checkpoint_to_hf,
                      convert_hf_to_checkpoint, export_to_hf, gates_are_trivial, import_from_hf, write_tokenizer)

__all__ = ["ConversionError", "application_order", "choose_format", "convert_checkpoint_to_hf",
           "convert_hf_to_checkpoint", "export_to_hf", "gates_are_trivial", "import_from_hf", "write_tokenizer"]
