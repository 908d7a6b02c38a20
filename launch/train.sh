#!/usr/bin/env bash
# Launch `python -m loop_megatron.train` under DeepSpeed's launcher.
#
#   launch/train.sh [--hostfile F] [--preset NAME] [--num-gpus N] [--num-nodes N]
#                   [--master-addr A] [--master-port P] [--no-ssh --node-rank R]
#                   [--launcher pdsh|openmpi|slurm] [--launcher-args 'DEEPSPEED OPTIONS'] [--dry-run]
#                   [-- trainer args]
#
# Runs:  deepspeed --hostfile HOSTFILE [--num_nodes N --num_gpus G ...] --module loop_megatron.train \
#            --preset NAME <trainer args>
# Anything this script does not know (and everything after `--`) is passed to the trainer, e.g.
#   launch/train.sh --preset tiny-2l-2loop -- --data-path data/sotu_text_document --train-iters 100
#
# This machine only (no --hostfile): a temporary hostfile `localhost slots=N` is written, N = --num-gpus,
# else every local GPU, else (no GPU) 2 CPU processes; the launcher gets --no_ssh_check and
# --master_addr 127.0.0.1. Without a GPU, DS_ACCELERATOR=cpu (gloo) and OMP_NUM_THREADS=cores/N are set
# unless already set.
#
# Several nodes (see launch/README.md and launch/hostfile.example):
#   * with passwordless ssh + pdsh from node 0:   launch/train.sh --hostfile hosts --preset loop-81m -- ...
#     (DeepSpeed starts every node's ranks; MASTER_ADDR defaults to the first host's `hostname -I`,
#      --master-addr overrides it; NCCL_*/PYTHON* variables are forwarded to the other nodes, and the CPU
#      settings plus GLOO_/NCCL_SOCKET_IFNAME through a .deepspeed_env written for the job.)
#   * options of DeepSpeed's launcher: --launcher-args "--ssh_port 2222 --bind_cores_to_rank" (repeatable)
#   * a rank that dies or hangs ends the job on every node within --distributed-timeout-minutes (a trainer
#     flag, default 10), named by rank and host.
#   * without ssh: run on EVERY node, each with its own rank, the same hostfile and node 0's address:
#       launch/train.sh --hostfile hosts --no-ssh --node-rank R --master-addr NODE0_IP --master-port 29500 -- ...
# A missing or malformed hostfile stops here with one sentence, before anything starts.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_python.sh"
exec "$PYTHON" -m loop_megatron.launch.cli train "$@"
