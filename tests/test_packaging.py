"""pyproject.toml lists every package: a non-editable install (pip install .) ships only those."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_package_of_dsv4cli_and_kernels_is_listed_in_pyproject():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    dirs = {name: REPO / path for name, path in setuptools.get("package-dir", {}).items()}
    dirs.setdefault("dsv4cli", REPO / "dsv4cli")
    found = set()
    for name, root in dirs.items():
        for init in root.rglob("__init__.py"):
            found.add(".".join((name, *init.parent.relative_to(root).parts)))
    assert "dsv4cli.train.data" in found and "dsv4cli.kernels" in found  # the walk sees nested and mapped packages
    assert found - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
