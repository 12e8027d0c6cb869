"""`python -m dsv4cli.train.torchrun_agent LOG [torchrun arguments]`: torchrun with its own chatter in LOG.

`dsv4 train` / `dsv4 eval` run torchrun through this module. The ranks torchrun starts inherit this
process's stdout and stderr (file descriptors 1 and 2) unchanged, so the user sees what the ranks
print, progress bar included. torchrun's own
Python-level output (its log lines, the OMP_NUM_THREADS banner, the ChildFailedError traceback and
the elastic error block) goes to LOG instead; with DSV4_VERBOSE=1 it stays on stderr too.

Exit code: 0 success; 2 when the first rank to fail exited 2 (bad input, the rank said why) and
no rank exited 1; 1 otherwise, with one `error:` line on stderr saying which rank failed and how
where no rank wrote an `error:` line of its own.
"""

from __future__ import annotations

import sys
import traceback
from typing import Optional, Sequence

from dsv4cli.noise import verbose_requested


class _Tee:
    """A text stream writing to several (the log file, and stderr when verbose)."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for s in self.streams:
            s.write(text)
            s.flush()
        return len(text)

    def flush(self) -> None:
        for s in self.streams:
            s.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:  # for faulthandler: crash dumps go to the first stream (the log)
        return self.streams[0].fileno()


def failure_exit_code(first_exitcode: int, exitcodes: Sequence[int]) -> int:
    """Rank exit codes -> the launcher's: 2 only where bad input is the whole story."""
    return 2 if first_exitcode == 2 and 1 not in exitcodes else 1


def describe_failure(rank: int, failure) -> str:
    """One line for a rank that did not exit 2: its exit code, or the signal that ended it."""
    if failure.exitcode < 0:
        return f"rank {rank} (pid {failure.pid}) was ended by {failure.signal_name()}"
    return f"rank {rank} (pid {failure.pid}) exited with code {failure.exitcode}"


def _ranks_reported() -> bool:
    """Did a rank write its own `error:` line (which the launcher prints) into DSV4_ERROR_DIR?"""
    import os
    from pathlib import Path

    from dsv4cli.train.entry import ERROR_DIR_ENV

    error_dir = os.environ.get(ERROR_DIR_ENV)
    return bool(error_dir) and any(f.stat().st_size for f in Path(error_dir).glob("rank*.txt"))


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    log_path, torchrun_args = argv[0], argv[1:]
    user_err = sys.stderr
    log = open(log_path, "a", buffering=1, encoding="utf-8")
    sink = _Tee(log, user_err) if verbose_requested() else log
    # Before torch is imported: its logging handlers bind to sys.stderr at import time.
    sys.stdout = sys.stderr = sink
    try:
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.run import main as torchrun_main

        try:
            torchrun_main(torchrun_args)
        except ChildFailedError as e:
            traceback.print_exc()
            first_rank, first = e.get_first_failure()
            code = failure_exit_code(first.exitcode, [f.exitcode for f in e.failures.values()])
            if code != 2 and not _ranks_reported():
                print(f"error: torchrun: {describe_failure(first_rank, first)}", file=user_err, flush=True)
            return code
        except Exception as e:  # rendezvous, port in use, ...: torchrun itself failed
            traceback.print_exc()
            first_line = (str(e).strip().splitlines() or [""])[0]
            print(f"error: torchrun: {type(e).__name__}: {first_line}", file=user_err, flush=True)
            return 1
        return 0
    finally:
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        log.close()


if __name__ == "__main__":
    sys.exit(main())
