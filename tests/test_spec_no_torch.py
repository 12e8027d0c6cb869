"""`dsv4 --help` and `dsv4 validate` work without torch, megatron or triton, and never import them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "megatron", "triton")

SCRIPT = r"""
import sys, importlib.abc
HEAVY = {heavy!r}
if {block!r}:
    class BlockHeavy(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in HEAVY:
                raise ImportError("blocked for this test: " + name)
            return None
    sys.meta_path.insert(0, BlockHeavy())
for mod in list(sys.modules):
    if mod.split(".")[0] in HEAVY:
        del sys.modules[mod]
sys.argv = ["dsv4", *{args!r}]
from dsv4cli.cli import main
try:
    main()
    code = 0
except SystemExit as e:
    code = e.code or 0
loaded = sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)
print("HEAVY-MODULES:", loaded, file=sys.stderr)
sys.exit(code)
"""


def run_cli(args: list[str], block: bool) -> subprocess.CompletedProcess:
    code = SCRIPT.format(heavy=HEAVY, block=block, args=args)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "COLUMNS": "200", "NO_COLOR": "1"})


def test_validate_works_with_torch_megatron_and_triton_unimportable():
    specs = [str(p) for p in sorted((REPO / "specs").glob("*.toml"))]
    result = run_cli(["validate", *specs], block=True)
    assert result.returncode == 0, result.stderr
    assert "HEAVY-MODULES: []" in result.stderr
    assert "torchrun" in result.stdout


def test_help_and_validate_do_not_import_heavy_modules_when_they_are_installed():
    for args in (["--help"], ["validate", "specs/tiny.toml", "--json"], ["inspect", "spec", "specs/tiny.toml"],
                 ["schema"]):
        result = run_cli(args, block=False)
        assert result.returncode == 0, (args, result.stderr)
        assert "HEAVY-MODULES: []" in result.stderr, (args, result.stderr)


def test_a_broken_spec_still_exits_2_without_torch(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nnum_layers = 0\n")
    result = run_cli(["validate", str(bad)], block=True)
    assert result.returncode == 2
    assert f"{bad}:2: model.num_layers: " in result.stderr and "Traceback" not in result.stderr
