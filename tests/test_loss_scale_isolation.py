"""An in-process training leaves no loss scale behind for the next test module's one-process reference.

megatron's schedule leaves optimizer loss scale / micro-batches in class attributes (MTPLossAutoScaler,
MoEAuxLossAutoScaler) and dsv4's training step in IndexerLossAutoScaler; a module-scoped fixture (the
one-process reference of tests/test_model_distributed.py) is set up before any function-scoped
fixture of its first test, so it saw the scales of the test that trained before it (gradients off by
5e-4 against fresh worker processes). This runs that sequence in an inner pytest session with the real
tests/conftest.py: a training test module, then a module whose module-scoped fixture reads the scales.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_train_e2e import _env, write_small_spec

TRAINS = '''
import os


def test_an_in_process_training_leaves_its_loss_scales(tmp_path):
    from dsv4cli.train.entry import run

    overrides = ["train.steps=1", "train.eval_interval=0", f"checkpoint.dir={tmp_path / 'run'}"]
    assert run(os.environ["LEAK_SPEC"], overrides) == 0
    from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler
    from dsv4cli.model.dsv4.indexer_loss import IndexerLossAutoScaler

    # 2 micro-batches (global batch 4, micro-batch 2): what the leak was made of
    assert MTPLossAutoScaler.main_loss_backward_scale.item() == 0.5
    assert IndexerLossAutoScaler.scale.item() == 0.5
'''

REFERENCE = '''
import pytest


@pytest.fixture(scope="module")
def scales_at_module_setup():
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
    from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler
    from dsv4cli.model.dsv4.indexer_loss import IndexerLossAutoScaler

    return (MTPLossAutoScaler.main_loss_backward_scale.item(), MoEAuxLossAutoScaler.main_loss_backward_scale,
            IndexerLossAutoScaler.scale)


def test_a_module_scoped_reference_sees_a_fresh_process(scales_at_module_setup):
    assert scales_at_module_setup == (1.0, None, None)
'''


@pytest.mark.slow
def test_training_then_a_module_scoped_reference_in_one_session(tmp_path):
    inner = tmp_path / "inner"
    inner.mkdir()
    shutil.copy(Path(__file__).with_name("conftest.py"), inner / "conftest.py")
    (inner / "test_1_trains.py").write_text(TRAINS)
    (inner / "test_2_reference.py").write_text(REFERENCE)
    (inner / "pytest.ini").write_text("[pytest]\n")
    env = dict(_env(), LEAK_SPEC=str(write_small_spec(tmp_path)))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", str(inner)],
                          cwd=inner, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "2 passed" in out, out[-3000:]
