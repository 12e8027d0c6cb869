"""The list of megatron patches (dsv4cli.compat.megatron_patches) is the code: every patch function
of the compat package is listed, every record names a function that exists, every patch was
checked against the installed megatron-core, and activate() installs exactly the CPU records."""

from __future__ import annotations

import importlib
import inspect
from importlib.metadata import version

from dsv4cli.compat import megatron_patches as mp

PATCH_MODULES = ("dsv4cli.compat.cpu", "dsv4cli.compat.cpu_rng", "dsv4cli.compat.cpu_megatron",
                 "dsv4cli.compat.distopt", "dsv4cli.compat.multi_tensor", "dsv4cli.compat.versions")


def _patch_functions(module_name: str) -> set[str]:
    mod = importlib.import_module(module_name)
    return {f"{module_name}:{name}" for name, fn in vars(mod).items()
            if name.startswith("patch_") and inspect.isfunction(fn) and fn.__module__ == module_name}


def test_every_patch_function_is_listed_once_and_every_record_names_one():
    listed = [p.function for p in mp.PATCHES]
    assert len(set(listed)) == len(listed) and len({p.name for p in mp.PATCHES}) == len(listed)
    defined = set().union(*(_patch_functions(m) for m in PATCH_MODULES))
    assert defined == {p.function for p in mp.PATCHES if p.function.startswith("dsv4cli.compat.")}
    for p in mp.PATCHES:
        assert callable(p.installer()), p.name
        assert p.patches and p.why and p.checked and p.when in ("cpu", "version", "model"), p.name


def test_every_patch_was_checked_against_the_installed_megatron_core():
    assert mp.unchecked(version("megatron-core")) == []
    assert mp.unchecked("0.0.1") == [p.name for p in mp.PATCHES]


def test_activate_installs_each_cpu_record(cpu_compat, monkeypatch):
    """With the records replaced by recorders, a fresh activate() calls each one once, in order, and a
    second activate() nothing; the CPU records are the ones installed in this process."""
    import dsv4cli.compat as compat

    calls = []
    fake = tuple(mp.MegatronPatch(p.name, p.function, p.patches, p.why) for p in mp.cpu_patches())
    monkeypatch.setattr(mp, "PATCHES", fake)
    monkeypatch.setattr(mp.MegatronPatch, "installer", lambda self: (lambda: calls.append(self.name)))
    monkeypatch.setattr(compat, "_ACTIVE", False)
    assert compat.activate() is True and compat.activate() is True
    assert calls == [p.name for p in fake] and len(calls) >= 10


def test_activate_is_a_no_op_with_cuda(monkeypatch):
    import torch

    import dsv4cli.compat as compat

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(compat, "_ACTIVE", False)
    monkeypatch.setattr(mp.MegatronPatch, "installer", lambda self: (_ for _ in ()).throw(AssertionError(self.name)))
    assert compat.activate() is False and not compat.is_active()


def test_importing_the_package_imports_neither_torch_nor_megatron():
    import subprocess
    import sys

    code = ("import sys, dsv4cli.compat, dsv4cli.compat.megatron_patches, dsv4cli.compat.device; "
            "print(any(m == 'torch' or m.startswith('megatron') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_model_records_point_at_a_marked_code_site():
    """A "model" record names the class that carries the workaround, and its module marks the site."""
    for p in (p for p in mp.PATCHES if p.when == "model"):
        cls = p.installer()
        source = inspect.getsource(importlib.import_module(cls.__module__))
        assert inspect.isclass(cls) and f"PATCH (stays; dsv4cli/compat/megatron_patches.py `{p.name}`)" in source, p.name
