#!/usr/bin/env python
"""Write (or check) docs/configuration.md, the configuration reference built from the field docstrings
in loop_megatron/config.py.

    python tools/config_reference.py            # rewrite docs/configuration.md
    python tools/config_reference.py --check    # exit 1 if it is out of date (the tests run this)
"""
import argparse
import os
import sys

import _bootstrap  # noqa: F401  (repo root on sys.path)

import inspect

from loop_megatron.config import PRESET_DESCRIPTIONS, PRESET_RECIPES, cpu_recipe, describe_fields, paper_recipe
from loop_megatron.training.arguments import flag_table
from loop_megatron.training.megatron_flags import RECOMPUTE_FLAGS, SPELLINGS, UNSUPPORTED
from loop_megatron.utils import fs

TARGET = os.path.join(_bootstrap.ROOT, "docs", "configuration.md")


def render() -> str:
    recipes = {"paper": paper_recipe, "cpu": cpu_recipe}
    presets = "\n".join(f"| `{name}` | {PRESET_RECIPES[name]} | {text} |" for name, text in PRESET_DESCRIPTIONS.items())
    recipe_text = "\n".join(f"- **{kind}**: {' '.join(inspect.getdoc(fn).split())}" for kind, fn in recipes.items())
    flags = {key: flag for flag, key in flag_table().items()}
    return (
        "# Configuration reference\n\n"
        "Generated from the docstrings in `loop_megatron/config.py` by `python tools/config_reference.py`; "
        "do not edit by hand.\n\n"
        "A run's config is: a preset (`--preset`), then a YAML/JSON file (`--config`, which may name its own "
        "`preset:`), then the trainer's flags, then `--override section.field=value`. `validate()` rejects "
        "impossible settings with one sentence naming the field. The resolved config is saved as "
        "`<run_dir>/config.yaml` and inside every checkpoint's `meta.json`.\n\n"
        "## Presets\n\n"
        "A preset is the whole recipe: model shape, data, parallel layout and training settings (a function "
        "returning a `Config`, registered in `config.PRESETS`; `launch/presets/<name>.sh` runs it). Two "
        "recipes share the settings beyond the model:\n\n" + recipe_text + "\n\n"
        "| preset | recipe | what it is |\n|---|---|---|\n" + presets + "\n\n## Fields\n\n"
        "The flag column names the option of `python -m loop_megatron.train` that sets a field (its `--help` "
        "text is the meaning below); every field can also be set with `--override section.field=value`.\n\n"
        + describe_fields(flags)
        + "\n## Megatron-LM spellings\n\n"
        "Options of the same parser (loop_megatron/training/megatron_flags.py) for Megatron-LM / Megatron-DeepSpeed "
        "flags that set a field above under another name or form; a spelling and a flag that set one field to "
        "different values are refused.\n\n| flag | what it does |\n|---|---|\n"
        + "\n".join(f"| `{s.flag}` | {s.help} |" for s in SPELLINGS) + "\n"
        + "\n".join(f"| `{flag}` | {text} |" for flag, text in RECOMPUTE_FLAGS.items())
        + "\n\n## Megatron-LM flags refused\n\nEach stops the run (and launch/train.sh) with one sentence: "
        "`FLAG (Megatron-LM) is not supported here: REASON.`\n\n| flag | reason |\n|---|---|\n"
        + "\n".join(f"| `{flag}` | {reason} |" for flag, reason in UNSUPPORTED.items()) + "\n"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if docs/configuration.md is out of date")
    args = parser.parse_args()
    text = render()
    if args.check:
        current = open(TARGET, encoding="utf-8").read() if os.path.exists(TARGET) else ""
        if current != text:
            print(f"{TARGET} is out of date: run python tools/config_reference.py", file=sys.stderr)
            return 1
        return 0
    fs.write_text(TARGET, text)
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
