"""Checkpoint tools: read, check, compare and convert Megatron torch_dist checkpoints (docs/design.md §2.5-2.6).

And the checkpoints of training: save, load (resume, eval), the checks before a load.


    errors       CheckpointError: the one error for a checkpoint that cannot be used (exit 2)
    layout       file names; run root / iter_* / bare DCP directory -> CheckpointLocation (the one resolver)
    atomic       write_text_atomic; temp iteration directory -> published iter_*, tracker file, keep_last
    save         save_checkpoint (collective): model, optimizer, scheduler, progress, RNG, dsv4 files
    load         load_checkpoint (resume), load_model_weights (eval); collective, any parallel layout
    optimizer_resume  optimizer state on resume: checked, prefix-resolved, regrouped across layouts
    adam_state   the distributed optimizer's format; Adam state across plain <-> distributed optimizer
    rng_state    every rank's random generators, saved and restored
    provenance   dsv4_meta.json: versions, commit, spec hash, parallel layout, progress
    metadata     read_checkpoint_info(path): everything from metadata files, no tensor data
    integrity    check_checkpoint(path): is it complete? run first by every command that reads one
    keys         stored key patterns: mHC tensors, contraction heads, MTP depths, optimizer state
    conformance  check_conformance(info, spec): missing / unexpected / mis-shaped / legacy; before a
                 load: check_model_spec (saved [model] vs spec), check_tensors (built model vs stored)
    summary      summarize(problems): a long key-problem list as one line (counts, first few, hints)
    report       inspect_checkpoint(path, ...): the `dsv4 inspect checkpoint` report
    stats        per-tensor statistics, one tensor at a time
    diff         diff_checkpoints(a, b): `dsv4 inspect diff`
    convert      convert_checkpoint(src, dst, ...): `dsv4 convert-ckpt` (average -> learned contraction)
    dcp_pickle   DCP `.metadata` read and written without torch (stand-ins for torch's pickled classes)
    torch_zip    torch.save's zip of one float32 tensor, written without torch
    new_entries  the tensors convert adds, their data file and `.metadata` entries, without torch
    optimizer_state  how optimizer state is stored; the entries convert adds for new parameters
    verify       the checks behind `convert-ckpt --verify`
    tensors      TensorReader: load one stored tensor at a time
    synthetic    write a checkpoint in the stored layout from a spec's inventory (tests, examples)

Bad input raises `dsv4cli.ckpt.errors.CheckpointError` (the CLI's and the ranks' exit 2). Nothing here
imports torch or megatron at module import time except through the functions that need them.
"""
