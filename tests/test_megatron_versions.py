"""dsv4 on every supported megatron-core (0.16.1 through 0.19.x): versions reported from package metadata,
checkpoint keys independent of the version, and (marker `crossversion`, CI only) a checkpoint written
under one megatron-core evaluates to the same loss under the other.

The cross-version test needs a second virtualenv with another megatron-core (dsv4 installed there
too): its directory in DSV4_OTHER_VENV. It is deselected unless the -m expression names its marker
(tests/conftest.py), as .ci/run's second leg does; selected without DSV4_OTHER_VENV, it fails
rather than skips.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "specs" / "tiny.toml")


def _run(python: str, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([python, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_version_flag_reads_package_metadata_and_imports_neither_torch_nor_megatron():
    script = (
        "import json, sys\n"
        "sys.argv = ['dsv4', '--version']\n"
        "from dsv4cli.cli import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
        "print(json.dumps({'code': code, 'heavy': sorted(m for m in sys.modules\n"
        "      if m.split('.')[0] in ('torch', 'megatron'))}))\n"
    )
    out = _run(sys.executable, "-c", script)
    assert out.returncode == 0, out.stderr
    version_line, report = out.stdout.strip().splitlines()
    report = json.loads(report)
    assert report == {"code": 0, "heavy": []}, report
    assert version_line == (f"dsv4 {metadata.version('dsv4')} (megatron-core {metadata.version('megatron-core')}, "
                            f"torch {metadata.version('torch')})")


def test_saved_provenance_records_the_megatron_core_in_use_and_inspect_shows_it(tmp_path):
    from megatron.core import package_info
    from typer.testing import CliRunner

    from conftest import make_tiny_spec
    from dsv4cli.ckpt.layout import META_FILE
    from dsv4cli.ckpt.provenance import build_meta
    from dsv4cli.ckpt.synthetic import write_synthetic_checkpoint
    from dsv4cli.cli import app

    meta = build_meta('name = "x"\n', {"tp": 1}, iteration=3, tokens_seen=12, consumed_samples=6)
    assert meta["megatron_core_version"] == metadata.version("megatron-core")
    assert package_info.__version__.split("+")[0] == meta["megatron_core_version"]  # 0.19.2+76c2fb0 there

    iter_dir = write_synthetic_checkpoint(tmp_path / "ck", make_tiny_spec(), iteration=3, optimizer=False)
    (iter_dir / META_FILE).write_text(json.dumps(dict(meta, megatron_core_version="0.17.9")))
    out = CliRunner().invoke(app, ["inspect", "checkpoint", str(tmp_path / "ck")], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    assert "megatron_core_version=0.17.9" in out.stdout  # the version that wrote it, not the one in use


@pytest.mark.usefixtures("megatron_1proc")
def test_megatron_mtp_layer_keeps_transformer_layer_checkpoint_keys():
    """streams = 1 uses megatron's own MTP layer, whose inner layer megatron-core 0.19 renamed
    `mtp_model_layer`: its checkpoint keys stay `mtp.layers.<k>.transformer_layer.*`."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from conftest import make_tiny_spec
    from dsv4cli.build import build_model

    model = build_model(make_tiny_spec(**{"model.mhc.streams": 1, "model.mtp.depth": 1}))
    keys = {v.key for v in model.sharded_state_dict().values() if isinstance(v, ShardedTensor)}
    mtp = sorted(k for k in keys if k.startswith("mtp."))
    assert "mtp.layers.0.transformer_layer.self_attention.linear_proj.weight" in mtp, mtp
    inner = {k.split(".")[3] for k in mtp}  # mtp.layers.0.<child>.*
    assert inner == {"enorm", "hnorm", "eh_proj", "transformer_layer", "final_layernorm"}, inner


def _other_python() -> str:
    venv = os.environ.get("DSV4_OTHER_VENV")
    if not venv:
        pytest.fail("DSV4_OTHER_VENV is not set: name the virtualenv with the other megatron-core "
                    "(.ci/run sets it); this test never passes without one")
    python = Path(venv) / "bin" / "python"
    assert python.is_file(), f"DSV4_OTHER_VENV={venv}: no bin/python there"
    return str(python)


# Small and fast: one optimizer step on the tiny model, two sequences per batch, one held-out batch.
_SETTINGS = ["--set", "train.steps=1", "--set", "train.micro_batch_size=2", "--set", "train.global_batch_size=2",
             "--set", "train.eval_interval=1000"]


def _train(python: str, run_dir: Path, steps: int = 1) -> Path:
    out = _run(python, "-m", "dsv4cli.cli", "train", TINY, *_SETTINGS, "--set", f"train.steps={steps}",
               "--set", f"checkpoint.dir={run_dir}")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return run_dir


def _last_step(run_dir: Path) -> dict:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [x for x in lines if "loss" in x][-1]


def _eval_loss(python: str, run_dir: Path) -> float:
    out = _run(python, "-m", "dsv4cli.cli", "eval", TINY, *_SETTINGS, "--load", str(run_dir), "--batches", "1",
               "--json")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["loss"]


def _mcore(python: str) -> str:
    out = _run(python, "-c", "from importlib import metadata; print(metadata.version('megatron-core'))")
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.slow
@pytest.mark.crossversion
def test_checkpoints_evaluate_identically_across_megatron_versions(tmp_path):
    """Both directions: written under this megatron-core and read under the other, and the reverse
    (eval, then a resume with the optimizer state). Losses must be identical: the same torch and the
    same CPU kernels, and megatron-core's version changes neither the stored tensors nor the math of
    the tiny model's forward and Adam step."""
    from dsv4cli.ckpt.layout import resolve_checkpoint
    from dsv4cli.ckpt.metadata import stored_tensors

    here, other = sys.executable, _other_python()
    versions = {"here": _mcore(here), "other": _mcore(other)}
    assert versions["here"] != versions["other"], f"both interpreters have megatron-core {versions['here']}"

    runs = {name: _train(python, tmp_path / name) for name, python in (("here", here), ("other", other))}
    dirs = {name: resolve_checkpoint(run).iter_dir for name, run in runs.items()}
    for name, d in dirs.items():
        meta = json.loads((d / "dsv4_meta.json").read_text())
        assert meta["megatron_core_version"] == versions[name]
    assert stored_tensors(dirs["here"]) == stored_tensors(dirs["other"]), "checkpoint keys differ by version"

    losses = {(writer, reader): _eval_loss(python, runs[writer])
              for writer in runs for reader, python in (("here", here), ("other", other))}
    for writer in runs:
        assert losses[(writer, "here")] == losses[(writer, "other")], (versions, losses)

    pythons = {"here": here, "other": other}
    resumed = {}
    for writer, reader in (("here", "other"), ("other", "here")):
        shutil.copytree(runs[writer], tmp_path / f"{writer}-by-{reader}")
        resumed[writer] = _last_step(_train(pythons[reader], tmp_path / f"{writer}-by-{reader}", steps=2))
        assert resumed[writer]["step"] == 2
    assert resumed["here"]["loss"] == resumed["other"]["loss"], (versions, resumed)
