"""Builds and loads the compiled CPU kernels (`mhc_cpu.c`) with the machine's C compiler and ctypes.

The first use on a machine compiles the one C file (~1.5 s with gcc; no torch headers, so no C++
toolchain or Python headers are needed) into a per-user cache, `$DSV4_CACHE_DIR` or
`$XDG_CACHE_HOME/dsv4` (default `~/.cache/dsv4`), under `kernels/`; later processes only load it.
The file name carries a hash of the source, flags, compiler and machine, so an edited source or another
compiler builds anew; the build writes a temporary file and renames it, so ranks that start together
never load a half-written library. On x86-64 CPUs with AVX2 the build adds `-mavx2` (8-token blocks;
4 otherwise); the flag is part of the name, so a cache shared by different CPUs stays valid. Where torch
runs on GNU OpenMP (its Linux wheels load `libgomp.so.1`) it adds `-fopenmp`: the library then uses that
same runtime, so its calls run on torch's intra-op threads (a compiler without OpenMP: built again
without, one thread per call).

Without a C compiler, or when the build fails, the ops run on the PyTorch path (`fast_cpu.py`, the
same math) after one warning. `DSV4_NATIVE_KERNELS=0` turns the compiled path off.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

SOURCE = Path(__file__).with_name("mhc_cpu.c")
FLAGS = ("-O3", "-std=c99", "-fPIC", "-shared", "-ffp-contract=off", "-fno-math-errno", "-Wno-unknown-pragmas")
SWITCH = "DSV4_NATIVE_KERNELS"

_I64, _F32, _PTR = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
_SIGNATURES = {  # name -> (restype, argtypes)
    "dsv4_mhc_fwd": (ctypes.c_int, [_I64] * 6 + [_F32] + [_PTR] * 9 + [_I64]),
    "dsv4_mhc_bwd": (ctypes.c_int, [_I64] * 6 + [_F32] + [_PTR] * 13 + [_I64]),
    "dsv4_mhc_post_bwd": (None, [_I64] * 3 + [_PTR] * 5 + [_I64]),
}


def enabled() -> bool:
    """False when `DSV4_NATIVE_KERNELS` is 0 / false / off / no."""
    return os.environ.get(SWITCH, "1").strip().lower() not in ("0", "false", "off", "no")


def cache_dir() -> Path:
    """Where built libraries live: $DSV4_CACHE_DIR, else $XDG_CACHE_HOME/dsv4, else ~/.cache/dsv4 (+ kernels/)."""
    root = os.environ.get("DSV4_CACHE_DIR")
    if not root:
        root = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dsv4")
    return Path(root) / "kernels"


def _compiler() -> str | None:
    """$CC, else the first of cc / gcc / clang on PATH (None: no compiler)."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


_OPENMP_RUNTIMES = ("libgomp", "libomp", "libiomp")


def _openmp_runtimes() -> set[str]:
    """Paths of the OpenMP runtimes mapped into this process (Linux /proc/self/maps; empty elsewhere)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return set()
    paths = {line.split()[-1] for line in lines if len(line.split()) >= 6}
    return {p for p in paths if Path(p).name.startswith(_OPENMP_RUNTIMES)}


def _gnu_openmp_loaded() -> bool:
    """True when this process has GNU OpenMP loaded under the soname `libgomp.so.1` (torch's Linux x86-64 wheels
    bring it). Only then does a library built with -fopenmp, which needs `libgomp.so.1`, share torch's threads
    instead of starting a second OpenMP runtime (a renamed copy, e.g. libgomp-<hash>.so.1, would not match)."""
    return any(Path(p).name == "libgomp.so.1" for p in _openmp_runtimes())


def cpu_flags() -> tuple[str, ...]:
    """Flags for this machine: -fopenmp where torch's GNU OpenMP is loaded (Linux; the library then runs on
    torch's intra-op threads), -mavx2 on x86-64 CPUs with AVX2 (/proc/cpuinfo)."""
    flags = ("-fopenmp",) if _gnu_openmp_loaded() else ()
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return flags
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return flags
    cpu = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    return flags + (("-mavx2",) if "avx2" in cpu else ())


@functools.cache
def _compiler_version(cc: str) -> str:
    return subprocess.run([cc, "--version"], capture_output=True, text=True, errors="replace", timeout=30).stdout


def _library_name(cc: str, flags: tuple[str, ...]) -> str:
    """mhc_cpu-<hash>.so over the source, flags, compiler (path and version) and machine."""
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(flags).encode(), cc.encode(), _compiler_version(cc).encode(),
                 platform.machine().encode(), platform.system().encode()):
        key.update(part)
        key.update(b"\0")
    return f"mhc_cpu-{key.hexdigest()[:16]}.so"


def _build(cc: str, target: Path, flags: tuple[str, ...]) -> None:
    """Compile SOURCE into target atomically (a temporary file in the same directory, then a rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp.so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([cc, *flags, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True,
                              errors="replace", timeout=300)
        if done.returncode != 0:
            detail = done.stderr.strip()[-500:]
            raise RuntimeError(f"{Path(cc).name} failed (exit {done.returncode})" + (f": {detail}" if detail else ""))
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def _uses_openmp(flags: tuple[str, ...]) -> bool:
    return any(f.startswith("-fopenmp") for f in flags)


def build(flags: tuple[str, ...] | None = None) -> ctypes.CDLL:
    """Build (unless cached) and load the kernels with FLAGS + `flags` (default: cpu_flags()); raises
    RuntimeError without a compiler or when the build fails, OSError when the cache is not writable.
    An OpenMP build that fails, or whose loading would start a second OpenMP runtime, is replaced by one
    without OpenMP (one thread per call)."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc / clang)")
    extra = cpu_flags() if flags is None else tuple(flags)
    if "-fopenmp" in extra and "clang" in _compiler_version(cc).lower():
        extra = tuple("-fopenmp=libgomp" if f == "-fopenmp" else f for f in extra)  # not LLVM's libomp
    try:
        return _build_and_load(cc, FLAGS + extra)
    except (RuntimeError, OSError):
        if not _uses_openmp(extra):
            raise
        return _build_and_load(cc, FLAGS + tuple(f for f in extra if not f.startswith("-fopenmp")))


def _build_and_load(cc: str, flags: tuple[str, ...]) -> ctypes.CDLL:
    """Load the cached library of these flags, building it first when needed. A failed build leaves a
    `.failed` file with the compiler's message, so later processes do not compile it again."""
    target = cache_dir() / _library_name(cc, flags)
    failed = target.with_suffix(".failed")
    if failed.exists():
        raise RuntimeError(failed.read_text(errors="replace"))
    if not target.exists():
        try:
            _build(cc, target, flags)
        except RuntimeError as err:
            with contextlib.suppress(OSError):
                failed.write_text(str(err))
            raise
    before = _openmp_runtimes()
    lib = _load(target)
    added = _openmp_runtimes() - before
    if added and _uses_openmp(flags):
        raise OSError(f"it would run a second OpenMP runtime ({', '.join(sorted(added))}) beside torch's")
    return lib


_failure: list[str] = []  # why library() returned None (empty when it loaded or was never called)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels (built on first use), or None with one warning when they cannot be built."""
    _failure.clear()
    try:
        return build()
    except Exception as err:  # noqa: BLE001 - whatever fails here (compiler, cache, loader), the torch path runs
        _failure.append(str(err) or type(err).__name__)
        _warn(_failure[0])
        return None


def unavailable_reason() -> str | None:
    """Why the compiled kernels cannot run here (builds them first, without warning), or None when they load
    or are switched off on purpose (DSV4_NATIVE_KERNELS=0)."""
    if not enabled():
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lib = library()
    return None if lib is not None else (_failure[0] if _failure else "not built")


def _warn(reason: str) -> None:
    warnings.warn(f"dsv4: the compiled CPU mHC kernels are not available ({reason}); the mHC ops run on the "
                  f"slower PyTorch path (same results). {SWITCH}=0 skips the attempt.", RuntimeWarning,
                  stacklevel=3)


def available() -> bool:
    """True when the compiled path is switched on and the library loads (builds it on first call)."""
    return enabled() and library() is not None
