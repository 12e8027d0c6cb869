"""What a user sees: known library noise hidden (shown with --verbose), a rank's bad input under torchrun
as exit 2 with one error line (torchrun's traceback kept in the run's log), empty data splits refused."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from test_train_e2e import REPO, _env, save_model_only_checkpoint, write_small_spec

from dsv4cli.noise import KNOWN_WARNINGS, quiet_known_noise

NOISE_MARKERS = ("FutureWarning", "UserWarning", "Apex", "ShardedTensor", "OMP_NUM_THREADS", "Traceback",
                 "ChildFailedError", "elastic")


def _warn_all(verbose):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_known_noise(verbose)
        warnings.warn("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.", UserWarning)
        warnings.warn("`load_state_dict` is deprecated and will be removed in future versions.", FutureWarning)
        warnings.warn("Please use DTensor instead and we are deprecating ShardedTensor.", FutureWarning)
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...", FutureWarning)
        warnings.warn("When using async grad allreduce it is recommended to set the environment variable "
                      "CUDA_DEVICE_MAX_CONNECTIONS to 1 for maximum speedup", UserWarning)
        warnings.warn("Please use DTensor instead and we are deprecating ShardedTensor.", UserWarning)  # other category
        warnings.warn("something else is deprecated", FutureWarning)
        warnings.warn("a dsv4 problem", UserWarning)
    return [str(w.message) for w in seen]


def test_known_noise_is_hidden_by_category_and_message_only(monkeypatch):
    from dsv4cli import noise

    monkeypatch.delenv(noise.VERBOSE_ENV, raising=False)
    monkeypatch.setattr(noise, "_verbose_here", False)  # restored afterwards
    shown = _warn_all(False)
    assert shown == ["Please use DTensor instead and we are deprecating ShardedTensor.",
                     "something else is deprecated", "a dsv4 problem"]
    assert not noise.verbose_requested()
    assert len(_warn_all(True)) == 8, "--verbose hides nothing"
    assert noise.verbose_requested()
    monkeypatch.setenv(noise.VERBOSE_ENV, "1")  # what the launcher gives torchrun's ranks
    assert len(_warn_all(None)) == 8 and noise.verbose_requested()
    assert all(issubclass(c, Warning) for c, _ in KNOWN_WARNINGS)


def test_torchrun_exit_codes_map_to_bad_input_only_when_that_is_the_whole_story():
    from dsv4cli.train.torchrun_agent import failure_exit_code

    assert failure_exit_code(2, [2, -15]) == 2  # one rank found bad input, torchrun stopped the other
    assert failure_exit_code(2, [2, 2]) == 2
    assert failure_exit_code(2, [2, 1]) == 1
    assert failure_exit_code(1, [1, -15]) == 1
    assert failure_exit_code(-9, [-9, 2]) == 1


def _tiny_dataset(tmp_path: Path, docs: int = 3) -> str:
    from dsv4cli.train.data import prepare_data

    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": f"document number {i} " * 8}) + "\n" for i in range(docs)))
    prefix = str(tmp_path / "tiny")
    prepare_data(str(src), prefix)
    return prefix


def _indexed(prefix: str, fraction: float) -> list[str]:
    return ['data.source="indexed"', f'data.paths=["{prefix}"]', f"data.valid_fraction={fraction}"]


def test_empty_split_is_refused_naming_fraction_path_and_counts(tmp_path):
    from dsv4cli.spec.load import load_spec
    from dsv4cli.train.data import DataError, build_sources, check_data, split_document_ranges

    prefix = _tiny_dataset(tmp_path)
    spec_path = write_small_spec(tmp_path)
    with pytest.raises(DataError) as e:
        check_data(load_spec(spec_path, _indexed(prefix, 0.05)))
    msg = str(e.value)
    assert msg.startswith("data.valid_fraction: 0.05") and prefix in msg and "validation split" in msg
    assert "0 of 3 documents" in msg and "between 0.17 and 0.83" in msg
    with pytest.raises(DataError, match="training split .* 0 of 3 documents"):
        check_data(load_spec(spec_path, _indexed(prefix, 0.9)))
    spec = load_spec(spec_path, _indexed(prefix, 0.17))
    check_data(spec)  # the suggested fraction works: megatron builds both splits from the documents we count
    sources = build_sources(spec)
    train, valid = split_document_ranges(3, 17)
    assert len(sources.train.ds.indices) == len(train) == 2
    assert len(sources.valid.ds.indices) == len(valid) == 1
    assert len(sources.valid) > 0


def _dsv4(*args: str, timeout: float, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsv4cli.cli", *args], cwd=str(REPO), env=env or _env(),
                          capture_output=True, text=True, timeout=timeout)


def _error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error:")]


@pytest.mark.slow
def test_empty_split_found_inside_the_ranks_exits_2_in_seconds_with_one_line_and_the_log(tmp_path):
    """An empty validation split (megatron alone would loop forever: the timeout catches a hang).
    The data set is only opened by the ranks: torchrun's failure becomes exit 2, the rank's error
    is printed once, torchrun's traceback and error block go to RUN_DIR/logs/train-*.log."""
    from distributed import free_port

    prefix = _tiny_dataset(tmp_path)
    spec = write_small_spec(tmp_path)
    run = tmp_path / "run"
    p = _dsv4("train", str(spec), "--nproc-per-node", "2", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
              *[a for o in _indexed(prefix, 0.05) for a in ("--set", o)], "--set", f"checkpoint.dir={run}",
              timeout=240)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-3000:]
    errors = _error_lines(p.stderr)
    assert len(errors) == 1 and errors[0].startswith("error: data.valid_fraction: 0.05"), p.stderr
    for marker in NOISE_MARKERS:
        assert marker not in p.stderr + p.stdout, marker
    logs = list((run / "logs").glob("train-*.log"))
    assert len(logs) == 1 and str(logs[0]) in p.stderr, p.stderr
    log = logs[0].read_text()
    assert "ChildFailedError" in log and "exitcode  : 2" in log
    assert not (run / "metrics.jsonl").exists()


@pytest.mark.slow
def test_library_warnings_are_shown_with_verbose_and_hidden_under_torchrun_by_default(tmp_path):
    from distributed import free_port

    spec = write_small_spec(tmp_path)
    ckpt = tmp_path / "ckpt"
    save_model_only_checkpoint(spec, ckpt)
    env = {k: v for k, v in _env().items() if k != "PYTHONWARNINGS"}
    args = ("eval", str(spec), "--load", str(ckpt), "--batches", "1", "--json")
    loud = _dsv4(*args, "--verbose", timeout=300, env=env)
    assert loud.returncode == 0, loud.stderr[-2000:]
    # under torchrun (OMP_NUM_THREADS unset, so torchrun prints its banner): the ranks' warnings and
    # torchrun's own output are hidden too; the result is the same
    env.pop("OMP_NUM_THREADS", None)
    two = ("--nproc-per-node", "2", "--set", f'launch.rdzv_endpoint="127.0.0.1:{free_port()}"')
    quiet2 = _dsv4(*args, *two, timeout=300, env=env)
    assert quiet2.returncode == 0, quiet2.stderr[-3000:]
    assert quiet2.stderr.strip() == "", quiet2.stderr
    a, b = (json.loads(r.stdout.strip().splitlines()[-1]) for r in (loud, quiet2))
    assert abs(a["loss"] - b["loss"]) <= 1e-5 and a["tokens"] == b["tokens"]


CHILD = """
import sys
print("rank output", flush=True)
sys.exit(int(sys.argv[1]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("child_code,verbose", [(2, False), (1, True)])
def test_torchrun_agent_keeps_its_own_output_in_the_log(tmp_path, child_code, verbose):
    """The agent alone, with a plain-Python rank: the rank's output reaches the user, torchrun's
    traceback and error block only the log (also the user's stderr with DSV4_VERBOSE=1)."""

    from distributed import free_port

    child = tmp_path / "child.py"
    child.write_text(CHILD)
    log = tmp_path / "torchrun.log"
    env = {k: v for k, v in _env().items() if k != "DSV4_VERBOSE"}
    if verbose:
        env["DSV4_VERBOSE"] = "1"
    env.pop("OMP_NUM_THREADS", None)
    p = subprocess.run([sys.executable, "-m", "dsv4cli.train.torchrun_agent", str(log), "--nnodes", "1",
                        "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                        f"127.0.0.1:{free_port()}", str(child), str(child_code)],
                       cwd=str(REPO), env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == child_code, p.stderr
    assert "rank output" in p.stdout
    text = log.read_text()
    assert "ChildFailedError" in text and f"exitcode  : {child_code}" in text
    assert ("ChildFailedError" in p.stderr) == verbose, p.stderr
    errors = _error_lines(p.stderr)
    if child_code == 2:
        assert errors == [], "exit 2: the rank said why; the agent adds nothing"
    else:
        assert len(errors) == 1 and "rank 0" in errors[0] and "exited with code 1" in errors[0]
