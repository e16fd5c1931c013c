"""Compile the C kernel at first use and load it with ctypes.

The shared library is cached under ``$LPL_CACHE_DIR`` (default ``$XDG_CACHE_HOME/lpl`` or ``~/.cache/lpl``) in
``cpu_kernels/``, named by a hash of the source, compiler, flags and CPU, and written under a temporary name then
renamed, so concurrent processes (pytest-xdist, DDP ranks) never load a half-written file. Without a working C
compiler the caller falls back to the pure-torch path; ``load_library`` says so once through ``warnings``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

_SOURCE = Path(__file__).with_name("csrc") / "block_sparse.c"
_BASE_FLAGS = ["-O3", "-shared", "-fPIC", "-pthread", "-std=gnu11"]
# Tried in order: the host's full instruction set first, then a portable build (correct, slower).
_ARCH_FLAGS = [["-march=native"], []]

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_load_error: str | None = None
_warned = False

_i64 = ctypes.c_int64
_ptr = ctypes.c_void_p


def cache_dir() -> Path:
    """Folder that holds the compiled libraries (a per-user temp folder when the usual one is not writable)."""
    root = os.environ.get("LPL_CACHE_DIR")
    if root:
        preferred = Path(root) / "cpu_kernels"
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        preferred = (Path(xdg) if xdg else Path.home() / ".cache") / "lpl" / "cpu_kernels"
    try:
        preferred.mkdir(parents=True, exist_ok=True)
        if os.access(preferred, os.W_OK):
            return preferred
    except OSError:
        pass
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"lpl-{uid}" / "cpu_kernels"


def _find_compiler() -> str | None:
    for candidate in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


def _cpu_signature() -> str:
    """CPU model and feature flags: a library built with -march=native must not be reused on another CPU."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(lines)))


def _compile(compiler: str, flags: list[str], target: Path) -> None:
    """Compile to a temporary file next to ``target`` and rename it into place (atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run(
            [compiler, *flags, str(_SOURCE), "-o", tmp],
            check=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            timeout=120,
        )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    lib.lpl_bs_matmul.restype = ctypes.c_int
    lib.lpl_bs_matmul.argtypes = [
        _ptr, _i64, _i64, _i64, _i64,  # a, M, K, a_sm, a_sk
        _ptr, _ptr, _ptr, _i64,  # bpack, ptr, in_blk, R
        _i64, _i64,  # kb, nb
        _ptr, _i64, _i64, _ptr,  # out, N, out_sm, bias
        _i64, _i64, ctypes.c_int,  # kc, mt, nthreads
    ]
    lib.lpl_bs_grad_values.restype = ctypes.c_int
    lib.lpl_bs_grad_values.argtypes = [
        _ptr, _i64, _i64, _i64, _i64,  # dy, M, N, dy_sm, dy_sn
        _ptr, _i64, _i64, _i64,  # x, K, x_sm, x_sk
        _ptr, _ptr, _i64, _i64,  # ptr, col, R, nnz
        _i64, _i64, _ptr, _i64, ctypes.c_int,  # br, bc, out, mt, nthreads
    ]
    lib.lpl_pack_b.restype = None
    lib.lpl_pack_b.argtypes = [
        _ptr, _ptr, _i64, _i64,  # src, perm, nnz, block_stride
        _i64, _i64, _i64, _i64,  # kb, nb, sk, sn
        _ptr, ctypes.c_int,  # dst, nthreads
    ]
    lib.lpl_has_avx2.restype = ctypes.c_int
    lib.lpl_has_avx2.argtypes = []
    return lib


def _build_and_load() -> ctypes.CDLL:
    compiler = _find_compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC or install gcc)")
    source = _SOURCE.read_bytes()
    errors = []
    for arch in _ARCH_FLAGS:
        flags = _BASE_FLAGS + arch
        key = hashlib.sha256(
            b"\0".join([source, compiler.encode(), " ".join(flags).encode(), _cpu_signature().encode()])
        ).hexdigest()[:20]
        target = cache_dir() / f"block_sparse_{key}.so"
        try:
            if not target.exists():
                _compile(compiler, flags, target)
            return _declare(ctypes.CDLL(str(target)))
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", b"") or b""
            errors.append(f"{' '.join(flags)}: {exc} {detail.decode(errors='replace')[:500]}")
    raise RuntimeError("; ".join(errors))


def load_library() -> ctypes.CDLL | None:
    """The compiled kernel library, building it on first use; None (after one warning) when that is impossible."""
    global _library, _load_error, _warned
    if _library is not None:
        return _library
    with _lock:
        if _library is None and _load_error is None:
            try:
                _library = _build_and_load()
            except RuntimeError as exc:
                _load_error = str(exc)
        if _library is None and not _warned:
            _warned = True
            warnings.warn(
                f"lpl.kernels.cpu: compiled block-sparse kernel unavailable ({_load_error}); "
                "using the slower pure-torch fallback.",
                RuntimeWarning,
                stacklevel=3,
            )
    return _library


def load_error() -> str | None:
    """Why the compiled library could not be loaded (None when it loaded or was not tried yet)."""
    return _load_error
