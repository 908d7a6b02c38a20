"""Launching training jobs: the Python behind the thin shell scripts in the repository's `launch/` folder.

`hostfile` reads and checks MPI-style hostfiles, `commands` builds the exact `deepspeed ... --module
loop_megatron.train` command for a localhost, ssh/pdsh multi-node or ssh-less launch and runs it,
`environment` describes this machine (GPUs, cores, the CPU-only environment, a free port), `memory`
estimates model-state memory per GPU under ZeRO 0-3, `paper` plans the paper's five runs, and `cli` is
the command line the scripts call (`python -m loop_megatron.launch.cli {train|paper} ...`). Nothing here
imports torch or DeepSpeed until a GPU count or a memory estimate is asked for.
"""
