"""Compile the C kernels at first use and load them with ctypes.

Each source in ``csrc/`` is one ``CompiledLibrary`` (``BLOCK_SPARSE``, ``ADAM_REPLAY``). Its shared library is
cached under ``$LPL_CACHE_DIR`` (default ``$XDG_CACHE_HOME/lpl`` or ``~/.cache/lpl``) in ``cpu_kernels/``, named by
a hash of the source, compiler, flags and CPU, and written under a temporary name then renamed, so concurrent
processes (pytest-xdist, DDP ranks) never load a half-written file; a cached file whose sha256 differs from
the one its build recorded, or that does not load, is built again. When that folder is not writable, a temp folder
only this user can write to is used. Without a working C compiler the caller falls back to the pure-torch path;
``CompiledLibrary.load`` says so once through ``warnings``.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Callable

from lpl.utils.io import atomic_write_text

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
    return _private_temp_dir()


_process_temp_dir: Path | None = None


def _private_temp_dir() -> Path:
    """``$TMPDIR/lpl-<uid>/cpu_kernels`` when that folder is this user's alone (libraries in it get loaded, so a
    folder another user could write to must not be trusted), else a fresh private folder for this process."""
    global _process_temp_dir
    if hasattr(os, "getuid"):
        shared = Path(tempfile.gettempdir()) / f"lpl-{os.getuid()}"
        try:
            if _made_private(shared) and _made_private(shared / "cpu_kernels"):
                return shared / "cpu_kernels"
        except OSError:
            pass
    if _process_temp_dir is None:
        _process_temp_dir = Path(tempfile.mkdtemp(prefix="lpl-kernels-"))  # 0700, removed by the OS's temp cleanup
    return _process_temp_dir


def torch_path_forced() -> bool:
    """Whether ``LPL_CPU_KERNEL=torch`` asks every CPU caller for the pure-torch path (read at each call)."""
    return os.environ.get("LPL_CPU_KERNEL", "").lower() == "torch"


def _made_private(folder: Path) -> bool:
    """Create ``folder`` (mode 0700) if missing; whether it is a real folder this user owns and only it can write."""
    folder.mkdir(mode=0o700, exist_ok=True)
    info = os.lstat(folder)
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o022


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
    """Compile to a temporary file next to ``target``, rename it into place (atomic), then record its sha256 beside
    it (``_intact`` checks it before loading)."""
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
        digest = hashlib.sha256(Path(tmp).read_bytes()).hexdigest()
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    atomic_write_text(_digest_path(target), digest)


def _digest_path(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def _intact(library: Path) -> bool:
    """Whether ``library`` is the file its build recorded: loading a damaged one (truncated by a full disk, say)
    can kill the process with SIGBUS inside the dynamic loader, past any error handling."""
    try:
        return hashlib.sha256(library.read_bytes()).hexdigest() == _digest_path(library).read_text().strip()
    except OSError:
        return False


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


def _declared(declare: Callable[[ctypes.CDLL], ctypes.CDLL], path: Path) -> ctypes.CDLL:
    """Load ``path`` and declare its functions; a library without them is unloaded again, so that the file built
    in its place is read (the dynamic loader would hand back the loaded one for the same path)."""
    library = ctypes.CDLL(str(path))
    try:
        return declare(library)
    except AttributeError:
        with contextlib.suppress(Exception):  # platforms without dlclose keep it loaded
            import _ctypes

            _ctypes.dlclose(library._handle)
        raise


def torch_openmp_is_gnu() -> bool:
    """Whether this process has GNU OpenMP (libgomp.so.1) loaded, as PyPI's Linux torch does: a library built with
    -fopenmp then resolves its OpenMP calls to that same runtime and runs on torch's thread pool. (Another runtime,
    such as Intel's, would bring a second pool of spinning threads: no gain, so we build without OpenMP there.)"""
    import torch  # noqa: F401  (loads torch's OpenMP runtime, if it has one)

    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    return any(line.rsplit("/", 1)[-1] == "libgomp.so.1" for line in maps.splitlines())


class CompiledLibrary:
    """One C source of ``csrc/``, compiled and loaded at first use (thread-safe), or None after one warning."""

    def __init__(self, name: str, what: str, declare: Callable[[ctypes.CDLL], ctypes.CDLL],
                 extra_flags: tuple[str, ...] = (), torch_openmp: bool = False) -> None:
        self.name, self.what, self.declare, self.extra_flags = name, what, declare, list(extra_flags)
        self.torch_openmp = torch_openmp  # run its threads on torch's OpenMP pool where that can be shared
        self.openmp = False  # whether the library loaded was built with OpenMP
        self.library: ctypes.CDLL | None = None
        self.load_error: str | None = None
        self.warned = False
        self._lock = threading.Lock()

    def _build_and_load(self) -> ctypes.CDLL:
        compiler = _find_compiler()
        if compiler is None:
            raise RuntimeError("no C compiler found (set CC or install gcc)")
        source_path = _SOURCES / f"{self.name}.c"
        errors = []
        for flags in self.flag_variants():
            target = self.cached_path(compiler, flags)
            try:
                library = self._load_or_build(compiler, flags, source_path, target)
            except (OSError, AttributeError, subprocess.SubprocessError) as exc:
                detail = getattr(exc, "stderr", b"") or b""
                errors.append(f"{' '.join(flags)}: {exc} {detail.decode(errors='replace')[:500]}")
                continue
            self.openmp = "-fopenmp" in flags
            return library
        raise RuntimeError("; ".join(errors))

    def flag_variants(self) -> list[list[str]]:
        """The builds to try, best first: with torch's OpenMP where it can be shared, each for the host's full
        instruction set and then portable."""
        openmp = [["-fopenmp"], []] if self.torch_openmp and torch_openmp_is_gnu() else [[]]
        return [_BASE_FLAGS + self.extra_flags + threads + arch for threads in openmp for arch in _ARCH_FLAGS]

    def cached_path(self, compiler: str, flags: list[str]) -> Path:
        """Where the library built by ``compiler`` with ``flags`` is cached (named by everything it depends on)."""
        source = (_SOURCES / f"{self.name}.c").read_bytes()
        key = hashlib.sha256(
            b"\0".join([source, compiler.encode(), " ".join(flags).encode(), _cpu_signature().encode()])
        ).hexdigest()[:20]
        return cache_dir() / f"{self.name}_{key}.so"

    def _load_or_build(self, compiler: str, flags: list[str], source_path: Path, target: Path) -> ctypes.CDLL:
        """Load the cached library; one that is not the file its build recorded, does not load or lacks a function
        (a damaged or foreign file) is built again in its place. AttributeError: ctypes' missing-function error."""
        if _intact(target):
            try:
                return _declared(self.declare, target)
            except (OSError, AttributeError):
                target.unlink(missing_ok=True)
        _compile(compiler, flags, source_path, target)
        return _declared(self.declare, target)

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


BLOCK_SPARSE = CompiledLibrary("block_sparse", "block-sparse kernel", _declare_block_sparse, torch_openmp=True)
# -fno-math-errno lets sqrtf vectorise (no errno to set); IEEE arithmetic is otherwise unchanged
ADAM_REPLAY = CompiledLibrary("adam_replay", "linearised Adam replay kernel", _declare_adam_replay,
                              extra_flags=("-fno-math-errno",))


def load_library() -> ctypes.CDLL | None:
    """The block-sparse kernel library (``BLOCK_SPARSE.load``)."""
    return BLOCK_SPARSE.load()


def load_error() -> str | None:
    """Why the block-sparse library could not be loaded (None when it loaded or was not tried yet)."""
    return BLOCK_SPARSE.load_error
