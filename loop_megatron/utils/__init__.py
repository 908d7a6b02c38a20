"""Small helpers every layer may use and that depend on no other part of the package.

`fs` is the one place that writes files atomically (temporary sibling + rename, folder replacement, an
inter-process lock); `profiling` measures peak memory on CPU as well as CUDA (used by bench/); `signals`
holds the process's stop request (SIGTERM/SIGINT), installed by the trainer's CLI before torch loads. Nothing
here imports the model, the data pipeline or DeepSpeed.
"""
