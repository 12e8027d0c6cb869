"""Training: `dsv4 train`, `dsv4 eval`, `dsv4 prepare-data`, `dsv4 plot` (docs/training.md).

    launch.py         validate, memory preflight, torchrun argv / sbatch script, in-process or torchrun
    entry.py          per-rank entry point (`python -m dsv4cli.train.entry`), exit codes
    torchrun_agent.py torchrun with its own output in the run's log; ranks' exit codes -> 0/1/2
    runlock.py        one `dsv4 train` per run directory (checkpoint.dir/dsv4.lock)
    runtime.py        megatron parallel state, model chunks, DDP, optimizer, scheduler, schedules
    loop.py           the training loop: steps, held-out loss, checkpoints, exit_interval, signals
    data/             builtin stdlib corpus, byte/HF tokenizers, indexed/mock datasets, batching, prepare-data
    metrics.py        metrics.jsonl, progress lines/bar, TensorBoard
    eval.py           held-out loss of a checkpoint
    plot.py           loss curves of run directories

Checkpoints (save, resume, the checks before a load) are dsv4cli.ckpt's: save.py, load.py, conformance.py.

Only launch/runlock/metrics/plot/data import without torch; the rest import megatron.
"""
