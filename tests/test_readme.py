"""README.md works verbatim: every `dsv4 ...` line of its code blocks runs, in order, in a fresh copy
of the repository after the set-up command, with the installed `dsv4` first on PATH."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PREFIXES = ("dsv4 ", ".venv/bin/dsv4 ")


def readme_commands(text: str) -> list[str]:
    """The commands of README's code blocks (indented or fenced) that start with `dsv4 ` or
    `.venv/bin/dsv4 `, also as a step of an `a && b` line (the set-up installs, then trains)."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced or line.startswith("    "):
            out += [cmd for cmd in (part.strip() for part in line.split(" && ")) if cmd.startswith(PREFIXES)]
    return out


def test_readme_commands_are_extracted_one_per_line():
    cmds = readme_commands((REPO / "README.md").read_text())
    assert cmds[0] == ".venv/bin/dsv4 train specs/tiny.toml", "the set-up's training comes first"
    assert len(cmds) >= 10
    for cmd in cmds:
        assert not cmd.endswith("\\"), f"no continuations: {cmd}"
        argv = shlex.split(cmd, comments=True)
        assert argv[0].endswith("dsv4") and len(argv) > 1, cmd
    assert any(c.startswith("dsv4 plot") for c in cmds)
    assert "matplotlib" in (REPO / "pyproject.toml").read_text().split("[project.optional-dependencies]")[1]
    setup = next(ln for ln in (REPO / "README.md").read_text().splitlines() if "pip install -e" in ln)
    assert '".[test,plot]"' in setup, "the set-up installs the extra `dsv4 plot` needs"


def _fresh_copy(dest: Path) -> Path:
    """The repository's tracked (and not ignored) files, as a fresh clone would have them."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.mark.slow
def test_readme_runs_verbatim_in_a_fresh_copy(tmp_path):
    repo = _fresh_copy(tmp_path / "repo")
    assert not (repo / "runs").exists() and not (repo / ".venv").exists()
    bindir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", COLUMNS="80")
    assert shutil.which("dsv4", path=env["PATH"]) == str(bindir / "dsv4"), "the installed dsv4 comes first"
    outputs, stdout, seconds = {}, {}, {}
    for cmd in readme_commands((repo / "README.md").read_text()):
        argv = shlex.split(cmd, comments=True)
        argv[0] = "dsv4"  # .venv/bin/dsv4 of the README is the installed one here
        t0 = time.perf_counter()
        r = subprocess.run(argv, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
        seconds[cmd] = time.perf_counter() - t0
        assert r.returncode == 0, f"{cmd} -> exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        outputs[cmd], stdout[cmd] = r.stdout + r.stderr, r.stdout
        spec_warnings = re.findall(r"^\S+:\d+: \S+: warning: .*$", outputs[cmd], re.M)
        assert not spec_warnings, f"{cmd}: README's examples use specs as they are meant: {spec_warnings}"

    # what the text says the commands produce
    setup = outputs[".venv/bin/dsv4 train specs/tiny.toml"]
    assert "training finished: step 150/150" in setup and "runs/tiny/metrics.jsonl" in setup
    assert "dsv4 eval specs/tiny.toml --load runs/tiny" in setup and "dsv4 plot runs/tiny" in setup
    print("\n".join(f"{s:6.1f} s  {c}" for c, s in seconds.items()))  # shown with -s
    evaluated = json.loads(stdout["dsv4 eval specs/tiny.toml --load runs/tiny --json"].strip().splitlines()[-1])
    assert 0 < evaluated["loss"] < 4
    assert (repo / "runs" / "tiny" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert not (repo / "curves.png").exists()
    assert "training finished: step 160/160" in outputs["dsv4 train specs/tiny.toml --set train.steps=160"]
    assert (repo / "runs" / "tiny-8" / "latest_checkpointed_iteration.txt").read_text().strip() == "10"
    convert = next(v for k, v in outputs.items() if k.startswith("dsv4 convert-ckpt"))
    assert re.search(r"verify model: .* ok", convert), convert
    assert (repo / "runs" / "legacy-learned" / "latest_checkpointed_iteration.txt").is_file()
