"""Importing Chainer 7.8.1 into today's Python environment, quietly, and probing CuPy for it.

Chainer (last released 2020) checks its environment at import: ``chainer._environment_check`` imports
``numpy.distutils.system_info`` and ``pkg_resources``. Both trip over current tooling:

- setuptools installs a ``distutils`` shim (``_distutils_hack``) that serves its own bundled distutils, which
  lacks ``distutils.msvccompiler``; ``numpy.distutils`` imports that and fails. On Python < 3.12 removing the
  shim for the duration of the import lets the standard library's distutils load instead. Where that is not
  possible (Python 3.12 has no stdlib distutils and NumPy 1.26 ships no ``numpy.distutils`` there), a stand-in
  for ``numpy.distutils.system_info`` is installed for the import only: Chainer calls it on macOS alone.
- ``pkg_resources`` is gone from setuptools >= 81; Chainer uses it only to warn about optional packages' versions,
  so without it a stand-in that finds no optional package serves the import.
- NumPy 2 removed ``np.sctypes``, which Chainer reads once at import; it is supplied for the import only. With
  that, Chainer 7.8.1 runs on NumPy 2 and CuPy 14 (seen on an H200 with NumPy 2.5, CuPy 14.2, Python 3.12).
- ``pkg_resources`` and ``numpy.distutils`` emit deprecation warnings, and Chainer warns about CuPy versions it
  does not know. None of that is actionable for a cnnrun user, so warnings are silenced around the import only.

Nothing here outlasts the import but the modules it loaded: the shim is put back and the stand-ins are removed,
so a later ``import setuptools`` behaves as it would have.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import sys
import types
import warnings
from typing import Iterator, Optional, Tuple

# The extra that installs CuPy, and what to say about it. cnnrun's lock pins NumPy 1.26 and CuPy 14 needs NumPy 2,
# so the extra takes the CuPy 13 line; in a NumPy 2 environment CuPy 14 works too (it has no cuDNN: Chainer then
# runs its own CUDA kernels).
CUDA_EXTRA_HINT = (
    "install CuPy with `pip install 'cnnrun[cuda]'` (cupy-cuda13x 13.x, for CUDA 13 drivers; "
    "for CUDA 12 drivers install `pip install 'cupy-cuda12x>=13,<14'` instead)"
)


def import_chainer():
    """Import and return the ``chainer`` module, with the environment fixes above and no warnings printed."""
    if "chainer" in sys.modules:
        return sys.modules["chainer"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with _stdlib_distutils(), _numpy_distutils_fallback(), _pkg_resources_fallback(), _numpy_sctypes():
            _alias_cupy_cudnn()
            return importlib.import_module("chainer")


def _is_distutils(name: str) -> bool:
    return name == "distutils" or name.startswith("distutils.")


@contextlib.contextmanager
def _stdlib_distutils() -> Iterator[None]:
    """Let ``import distutils`` reach the standard library while inside the block (Python < 3.12)."""
    try:
        hack = importlib.import_module("_distutils_hack")
    except ImportError:  # no setuptools, or one too old to have the shim: nothing to undo
        hack = None
    remove = getattr(hack, "remove_shim", None)  # absent on Python >= 3.12, where the shim cannot be disabled
    finder = getattr(hack, "DISTUTILS_FINDER", None)
    if remove is None or finder not in sys.meta_path:
        yield
        return
    loaded_before = {name for name in sys.modules if _is_distutils(name)}
    remove()
    try:
        yield
    finally:
        hack.add_shim()
        # Forget the stdlib distutils modules this import loaded (numpy.distutils keeps its own references), so a
        # later `import setuptools` finds no foreign distutils to replace and stays silent.
        for name in [n for n in sys.modules if _is_distutils(n) and n not in loaded_before]:
            del sys.modules[name]


def _numpy_distutils_importable() -> bool:
    try:
        importlib.import_module("numpy.distutils.system_info")
        return True
    except Exception:  # ImportError, or a distutils that is not the one numpy.distutils was written for
        return False


@contextlib.contextmanager
def _numpy_distutils_fallback() -> Iterator[None]:
    """If ``numpy.distutils.system_info`` cannot be imported, provide a stand-in while inside the block."""
    if _numpy_distutils_importable():
        yield
        return
    import numpy

    package = types.ModuleType("numpy.distutils")
    package.__path__ = []  # a package, so the submodule import resolves through sys.modules
    system_info = types.ModuleType("numpy.distutils.system_info")
    system_info.get_info = lambda name, notfound_action=0: {}  # "no BLAS info": Chainer's macOS check passes
    package.system_info = system_info
    added = {"numpy.distutils": package, "numpy.distutils.system_info": system_info}
    missing = object()
    saved_attribute = getattr(numpy, "distutils", missing)
    saved = {name: sys.modules.pop(name) for name in added if name in sys.modules}
    sys.modules.update(added)
    numpy.distutils = package  # Chainer reaches system_info as an attribute chain from numpy
    try:
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)
        sys.modules.update(saved)
        if saved_attribute is missing:
            del numpy.distutils
        else:
            numpy.distutils = saved_attribute


@contextlib.contextmanager
def _numpy_sctypes() -> Iterator[None]:
    """Provide ``numpy.sctypes`` (removed in NumPy 2) while inside the block.

    Chainer reads it once at import, to pick an index dtype for ``F.as_strided``; nothing else in Chainer 7.8.1
    touches an API that NumPy 2 removed, so this lets Chainer run on NumPy 2 (and CuPy 14, which needs it).
    """
    import numpy

    if "sctypes" in vars(numpy):  # NumPy 1.x
        yield
        return
    numpy.sctypes = {
        "int": [numpy.int8, numpy.int16, numpy.int32, numpy.int64],
        "uint": [numpy.uint8, numpy.uint16, numpy.uint32, numpy.uint64],
        "float": [numpy.float16, numpy.float32, numpy.float64, numpy.longdouble],
        "complex": [numpy.complex64, numpy.complex128, numpy.clongdouble],
        "others": [bool, object, bytes, str, numpy.void],
    }
    try:
        yield
    finally:
        del numpy.sctypes


def _findable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a finder that refuses the name, or a broken half-imported module
        return False


@contextlib.contextmanager
def _pkg_resources_fallback() -> Iterator[None]:
    """If ``pkg_resources`` cannot be imported, provide a stand-in (no optional packages found) inside the block."""
    if _findable("pkg_resources"):
        yield
        return
    stub = types.ModuleType("pkg_resources")

    class DistributionNotFound(Exception):
        pass

    class VersionConflict(Exception):
        pass

    def require(requirement):
        raise DistributionNotFound(requirement)

    stub.DistributionNotFound, stub.VersionConflict, stub.require = DistributionNotFound, VersionConflict, require
    sys.modules["pkg_resources"] = stub
    try:
        yield
    finally:
        if sys.modules.get("pkg_resources") is stub:
            del sys.modules["pkg_resources"]


def _alias_cupy_cudnn() -> None:
    """Serve ``cupy.cudnn`` from ``cupyx.cudnn`` where CuPy has only the latter.

    Chainer 7.8.1 enables cuDNN only if ``import cupy.cudnn`` works. CuPy moved those wrappers to ``cupyx.cudnn``
    and kept ``cupy.cudnn`` as a deprecated alias for a while; where the alias is gone but the wrappers (and the
    cuDNN libraries) are there, this restores it. Without CuPy, or without cuDNN (CuPy 14 removed it), nothing
    happens and Chainer runs its own CUDA kernels.
    """
    if not _findable("cupy"):
        return
    try:
        importlib.import_module("cupy.cudnn")
        return  # the alias exists (or CuPy predates the move)
    except Exception:
        pass
    try:
        cupy = importlib.import_module("cupy")
        cudnn = importlib.import_module("cupyx.cudnn")
    except Exception:  # no cuDNN libraries, no GPU driver, or a CuPy without cuDNN support
        return
    sys.modules["cupy.cudnn"] = cudnn
    cupy.cudnn = cudnn  # Chainer reads it as an attribute after the import


def cupy_status() -> Tuple[Optional[object], str]:
    """(the cupy module, "") when Chainer can use CuPy, else (None, why not) in words for an error message.

    Call after :func:`import_chainer`: Chainer decides at its own import whether CuPy works, and that decision
    (``chainer.backends.cuda.available``) is the one that counts.
    """
    from chainer.backends import cuda

    if cuda.available:
        return cuda.cupy, ""
    if not _findable("cupy"):
        return None, "CuPy is not installed"
    error = getattr(cuda, "_resolution_error", None)
    return None, f"CuPy is installed but cannot be imported ({type(error).__name__}: {error})"


def gpu_count(cupy) -> Tuple[int, str]:
    """(number of CUDA GPUs CuPy sees, "") or (0, why none) when the driver or runtime is unusable."""
    try:
        return int(cupy.cuda.runtime.getDeviceCount()), ""
    except Exception as err:  # CUDARuntimeError without a driver; other errors from a broken install
        return 0, f"{type(err).__name__}: {err}"


def gpu_name(cupy, index: int) -> str:
    """The GPU's marketing name, e.g. 'NVIDIA H100 80GB HBM3'."""
    name = cupy.cuda.runtime.getDeviceProperties(index)["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def cudnn_usable() -> bool:
    """Whether Chainer found a working cuDNN through CuPy (CuPy 14 has none; CuPy 13 needs the cuDNN libraries)."""
    from chainer.backends import cuda

    return bool(cuda.available and cuda.cudnn_enabled)


@functools.lru_cache(maxsize=None)
def cudnn_min_epsilon() -> float:
    """The smallest batchnorm epsilon cuDNN accepts (Chainer raises below it); 0 when cuDNN is not in use."""
    from chainer.backends import cuda

    if not cudnn_usable():
        return 0.0
    return float(getattr(cuda.libcudnn, "CUDNN_BN_MIN_EPSILON", 0.0))


def limit_cpu_threads(threads: Optional[int]):
    """Cap NumPy's BLAS threads (Chainer's CPU convolutions are BLAS matmuls); returns the limiter, or None.

    Uses threadpoolctl when installed; without it the BLAS default (all cores) stays.
    """
    if not threads:
        return None
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    return threadpool_limits(limits=threads, user_api="blas")
