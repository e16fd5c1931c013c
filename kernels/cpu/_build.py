"""Compile the C kernels at first use and load them with ctypes.

Each source in ``csrc/`` is one ``CompiledLibrary`` (``BLOCK_SPARSE``, ``ADAM_REPLAY``). Its shared library is
cached under ``$LPL_CACHE_DIR`` (default ``$XDG_CACHE_HOME/lpl`` or ``~/.cache/lpl``) in ``cpu_kernels/``, named by
a hash of the source, compiler, flags and CPU, and written under a temporary name then renamed, so concurrent
processes (pytest-xdist, DDP ranks) never load a half-written file. Without a working C compiler the caller falls
back to the pure-torch path; ``CompiledLibrary.load`` says so once through ``warnings``.
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
from typing import Callable

_SOURCES = Path(__file__).with_name("csrc")
# -fopenmp-simd: the sources' `#pragma omp simd` loops (vectorised reductions without -ffast-math; no OpenMP runtime)
_BASE_FLAGS = ["-O3", "-shared", "-fPIC", "-pthread", "-std=gnu11", "-fopenmp-simd"]
# Tried in order: the host's full instruction set first, then a portable build (correct, slower).
_ARCH_FLAGS = [["-march=native"], []]

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


def _compile(compiler: str, flags: list[str], source: Path, target: Path) -> None:
    """Compile to a temporary file next to ``target`` and rename it into place (atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run(
            [compiler, *flags, str(source), "-o", tmp, "-lm"],
            check=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            timeout=120,
        )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _declare_block_sparse(lib: ctypes.CDLL) -> ctypes.CDLL:
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


def _declare_adam_replay(lib: ctypes.CDLL) -> ctypes.CDLL:
    lib.lpl_adam_replay.restype = ctypes.c_int
    lib.lpl_adam_replay.argtypes = [
        _ptr, _i64, _i64, _ptr, _ptr,  # pool_grads, nb, d, vectors, values
        _i64, _ptr, _ptr,  # k, ref_updates, val_grads
        _ptr, ctypes.c_int,  # coupled_decay, bf16_mask
        _ptr, ctypes.c_float, ctypes.c_int,  # decay_per_coord, decay, decoupled
        _ptr, ctypes.c_double, ctypes.c_double, ctypes.c_double,  # lr, beta1, beta2, eps
        _ptr, _i64, _i64,  # orders, n, length
        _ptr, _ptr, _ptr, _ptr, ctypes.c_int,  # delta, exp_avg, exp_avg_sq, val_dots, nthreads
    ]
    return lib


class CompiledLibrary:
    """One C source of ``csrc/``, compiled and loaded at first use (thread-safe), or None after one warning."""

    def __init__(self, name: str, what: str, declare: Callable[[ctypes.CDLL], ctypes.CDLL],
                 extra_flags: tuple[str, ...] = ()) -> None:
        self.name, self.what, self.declare, self.extra_flags = name, what, declare, list(extra_flags)
        self.library: ctypes.CDLL | None = None
        self.load_error: str | None = None
        self.warned = False
        self._lock = threading.Lock()

    def _build_and_load(self) -> ctypes.CDLL:
        compiler = _find_compiler()
        if compiler is None:
            raise RuntimeError("no C compiler found (set CC or install gcc)")
        source_path = _SOURCES / f"{self.name}.c"
        source = source_path.read_bytes()
        errors = []
        for arch in _ARCH_FLAGS:
            flags = _BASE_FLAGS + self.extra_flags + arch
            key = hashlib.sha256(
                b"\0".join([source, compiler.encode(), " ".join(flags).encode(), _cpu_signature().encode()])
            ).hexdigest()[:20]
            target = cache_dir() / f"{self.name}_{key}.so"
            try:
                if not target.exists():
                    _compile(compiler, flags, source_path, target)
                return self.declare(ctypes.CDLL(str(target)))
            except (OSError, subprocess.SubprocessError) as exc:
                detail = getattr(exc, "stderr", b"") or b""
                errors.append(f"{' '.join(flags)}: {exc} {detail.decode(errors='replace')[:500]}")
        raise RuntimeError("; ".join(errors))

    def load(self) -> ctypes.CDLL | None:
        """The compiled library, building it on first use; None (after one warning) when that is impossible."""
        if self.library is not None:
            return self.library
        with self._lock:
            if self.library is None and self.load_error is None:
                try:
                    self.library = self._build_and_load()
                except RuntimeError as exc:
                    self.load_error = str(exc)
            if self.library is None and not self.warned:
                self.warned = True
                warnings.warn(
                    f"lpl.kernels.cpu: compiled {self.what} unavailable ({self.load_error}); "
                    "using the slower pure-torch fallback.",
                    RuntimeWarning,
                    stacklevel=3,
                )
        return self.library


BLOCK_SPARSE = CompiledLibrary("block_sparse", "block-sparse kernel", _declare_block_sparse)
# -fno-math-errno lets sqrtf vectorise (no errno to set); IEEE arithmetic is otherwise unchanged
ADAM_REPLAY = CompiledLibrary("adam_replay", "linearised Adam replay kernel", _declare_adam_replay,
                              extra_flags=("-fno-math-errno",))


def load_library() -> ctypes.CDLL | None:
    """The block-sparse kernel library (``BLOCK_SPARSE.load``)."""
    return BLOCK_SPARSE.load()


def load_error() -> str | None:
    """Why the block-sparse library could not be loaded (None when it loaded or was not tried yet)."""
    return BLOCK_SPARSE.load_error
