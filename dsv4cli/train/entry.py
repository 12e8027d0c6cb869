"""Per-rank entry point: `python -m dsv4cli.train.entry SPEC [--set K=V]... [--eval --load DIR]`.

torchrun runs this module in every rank; a one-process `dsv4 train` calls `run()` in-process.
`run()` is where a worker starts using megatron: it activates the CPU workarounds (dsv4cli.compat).
Bad input (spec, data, checkpoint) -> exit 2 with one line on stderr (rank 0 only);
runtime failure -> exit 1. Under `dsv4 train`/`dsv4 eval` (DSV4_ERROR_DIR set) every rank writes its
`error:` lines to DSV4_ERROR_DIR/rank{R}.txt instead and the launcher prints them once.
Known library warnings are hidden (dsv4cli.noise) unless DSV4_VERBOSE=1 or `verbose`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence


ERROR_DIR_ENV = "DSV4_ERROR_DIR"


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _err(message: str) -> None:
    error_dir = os.environ.get(ERROR_DIR_ENV)
    if error_dir:
        with open(os.path.join(error_dir, f"rank{_rank()}.txt"), "a", encoding="utf-8") as f:
            f.write(f"error: {message}\n")
    elif _rank() == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)


def run(spec_path: str, overrides: Sequence[str] = (), *, mode: str = "train", load: Optional[str] = None,
        batches: Optional[int] = None, as_json: bool = False, out=None, verbose: Optional[bool] = None) -> int:
    """Train or evaluate in this process; -> exit code. `out` collects the eval result (dict).
    `verbose`: show known library warnings (None: from DSV4_VERBOSE)."""
    from dsv4cli.noise import quiet_known_noise
    from dsv4cli.spec.load import load_spec
    from dsv4cli.spec.problems import SpecError
    from dsv4cli.ckpt.errors import CheckpointError
    from dsv4cli.compat import activate
    from dsv4cli.train.data import DataError, check_data

    quiet_known_noise(verbose)
    from dsv4cli.train.loop import TrainingStopped, train

    code = 0
    try:
        spec = load_spec(spec_path, list(overrides), world_size=int(os.environ.get("WORLD_SIZE", "1")))
        check_data(spec)  # before any process group: a bad data set is exit 2 in seconds, on every rank
        activate()  # the CPU workarounds (no-op with CUDA), before megatron builds anything
        if mode == "train":
            code = train(spec)
        else:
            from dsv4cli.train.eval import evaluate

            result = evaluate(spec, load, batches)
            if out is not None:
                out.update(result)
            if _rank() == 0:
                if as_json:
                    print(json.dumps({k: result[k] for k in ("loss", "mtp_losses", "tokens")}), flush=True)
                else:
                    mtp = ", ".join(f"{x:.6f}" for x in result["mtp_losses"]) or "-"
                    print(f"checkpoint {result['checkpoint']} (step {result['iteration']})")
                    print(f"held-out loss {result['loss']:.6f} | mtp losses {mtp} | {result['tokens']:,} tokens",
                          flush=True)
    except SpecError as e:
        for p in e.problems:
            _err(str(p))
        code = 2
    except (CheckpointError, DataError) as e:
        _err(str(e))
        code = 2
    except TrainingStopped as e:
        _err(str(e))
        code = 1
    finally:
        from dsv4cli.build.parallel import destroy_parallel

        destroy_parallel()
    return code


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dsv4cli.train.entry")
    ap.add_argument("spec")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--eval", action="store_true", help="evaluate a checkpoint instead of training")
    ap.add_argument("--load")
    ap.add_argument("--batches", type=int)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    return run(args.spec, args.overrides, mode="eval" if args.eval else "train", load=args.load,
               batches=args.batches, as_json=args.json)


if __name__ == "__main__":
    sys.exit(main())
