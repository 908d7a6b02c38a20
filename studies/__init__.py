"""Studies beside the library: each sub-package is one study (its grid, its report, its claims), a client
of loop_megatron's public API like tools/, run from the repository root with `python -m studies.NAME.MODULE`.
Nothing in loop_megatron/ imports from here."""
