"""Checkpoint tools: read, check, compare and convert Megatron torch_dist checkpoints (DESIGN.md §2.5-2.6).

    layout       run root / iter_* / bare DCP directory -> CheckpointLocation
    metadata     read_checkpoint_info(path): everything from metadata files, no tensor data
    integrity    check_checkpoint(path): is it complete? run first by every command that reads one
    keys         stored key patterns: mHC tensors, contraction heads, MTP depths, optimizer state
    conformance  check_conformance(info, spec): missing / unexpected / mis-shaped / legacy
    summary      summarize(problems): a long key-problem list as one line (counts, first few, hints)
    report       inspect_checkpoint(path, ...): the `dsv4 inspect checkpoint` report
    stats        per-tensor statistics, one tensor at a time
    diff         diff_checkpoints(a, b): `dsv4 inspect diff`
    convert      convert_checkpoint(src, dst, ...): `dsv4 convert-ckpt` (average -> learned contraction)
    optimizer_state  how optimizer state is stored; the entries convert adds for new parameters
    verify       the checks behind `convert-ckpt --verify`
    tensors      TensorReader: load one stored tensor at a time
    synthetic    write a checkpoint in the stored layout from a spec's inventory (tests, examples)

Bad input raises `dsv4cli.ckpt.errors.CheckpointError` (the CLI's exit 2). Nothing here imports
torch or megatron at module import time except through the functions that need them.
"""
