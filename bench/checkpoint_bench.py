#!/usr/bin/env python
"""Checkpoint size and save time, before/after in one run: bytes per parameter per file class, and how long
a save blocks training (blocking vs --async-save).

    python bench/checkpoint_bench.py [--preset tiny-2l-2loop] [--precision fp32 bf16] [--zero-stage 1] [--repeats 2]

Two gloo ranks (CPU), DP 2, the preset's model (tiny-2l-2loop: 6.87M parameters, vocab 50257), the
trainer itself (`Trainer.setup`, two training steps, then `checkpoint.save_engine_checkpoint`). Layouts:
  before        what every save wrote until now (checkpoint/engine.py DEEPSPEED_SHARDS = True): model.pt in
                fp32, DeepSpeed's module and optimizer shards, and universal/
  after         one copy (the default): universal/ (fp32 master + exp_avg + exp_avg_sq per parameter) and
                model.pt in the training dtype, per-rank RNG, meta.json
  after async   the same files, --async-save: the save returns after the snapshot into CPU memory; rank 0
                writes them in a background thread
Columns: bytes per parameter of each file class (checkpoint/info.py `size_record`; "other" = meta.json,
tokenizer, DeepSpeed's recovery script), the total and its ratio to the minimal state (12 bytes + the
training dtype's 2 or 4), "blocked": seconds the save call kept training from going on (median over
--repeats), "written": seconds until the checkpoint was complete and `latest` named it.
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VARIANTS = ("before", "after", "after async")


def worker(rank, world, root, prefix, preset, precisions, zero_stage, repeats):
    from loop_megatron import checkpoint
    from loop_megatron.checkpoint import engine as ck_engine
    from loop_megatron.checkpoint.info import size_record
    from loop_megatron.config import preset as get_preset, set_field
    from loop_megatron.training import RunOptions, Trainer, preflight
    from loop_megatron.training.distributed import skip_shm_comm_build
    from loop_megatron.utils.distributed import barrier

    skip_shm_comm_build()
    rows = []
    for precision in precisions:
        cfg = get_preset(preset)
        for key, value in {"data.data_path": [prefix], "data.seq_length": 64, "data.split": "90,10,0",
                           "data.data_cache_path": os.path.join(root, "cache"), "training.micro_batch_size": 1,
                           "training.global_batch_size": 2, "training.train_iters": 2, "training.eval_iters": 0,
                           "training.precision": precision, "training.zero_stage": zero_stage,
                           "training.run_dir": os.path.join(root, "run", precision), "training.save": "", "training.load": "",
                           "training.log_interval": 100, "training.lr_warmup_iters": 1}.items():
            set_field(cfg, key, value, "bench")
        trainer = Trainer(cfg, RunOptions(), preflight(cfg, RunOptions()))
        try:
            trainer.setup()
            trainer.train()  # two steps: live moments
            iteration = trainer.iteration
            for variant in VARIANTS:
                save = os.path.join(root, "ck", precision, variant.replace(" ", "_"))
                trainer.cfg.training.save = save
                ck_engine.DEEPSPEED_SHARDS = True if variant == "before" else None
                writer = checkpoint.BackgroundWriter() if variant == "after async" else None
                blocked, written = [], []
                for _ in range(repeats):
                    barrier()
                    t0 = time.perf_counter()
                    folder = checkpoint.save_engine_checkpoint(trainer.engine, trainer.cfg, iteration,
                                                               trainer.consumed_samples(), writer=writer)
                    blocked.append(time.perf_counter() - t0)
                    checkpoint.wait_for_background(writer)
                    written.append(time.perf_counter() - t0)
                barrier()
                if rank == 0:
                    size = size_record(folder, checkpoint.read_meta(folder).get("precision"))
                    rows.append({"precision": precision, "variant": variant, "size": size,
                                 "blocked": statistics.median(blocked), "written": statistics.median(written)})
                    shutil.rmtree(save, ignore_errors=True)
            ck_engine.DEEPSPEED_SHARDS = None
        finally:
            trainer.close()
    return rows


def table(rows, classes):
    head = ("| precision | checkpoint | " + " | ".join(f"{c} B/param" for c in classes)
            + " | total B/param | vs minimal | blocked s | written s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        s = r["size"]
        cells = [f"{s['bytes_per_param'][c]:.2f}" for c in classes]
        lines.append(f"| {r['precision']} | {r['variant']} | " + " | ".join(cells)
                     + f" | {s['total_bytes_per_param']:.2f} | {s['vs_minimal']:.2f}x (of {s['minimal_bytes_per_param']})"
                     f" | {r['blocked']:.2f} | {r['written']:.2f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny-2l-2loop")
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--zero-stage", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    from loop_megatron.checkpoint.info import FILE_CLASSES
    from tests.dist_utils import run_distributed

    from tests.training.helpers import write_corpus

    root = tempfile.mkdtemp(prefix="checkpoint_bench_")
    try:
        prefix = write_corpus(os.path.join(root, "data"))
        rows = run_distributed(worker, 2, root, prefix, args.preset, args.precision, args.zero_stage, args.repeats)[0]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    params = rows[0]["size"]["params"]
    print(f"{args.preset}: {params / 1e6:.2f}M parameters, DP 2 (gloo, CPU), ZeRO {args.zero_stage}; "
          f"median of {args.repeats} saves")
    print(table(rows, FILE_CLASSES))


if __name__ == "__main__":
    main()
