"""Build script: the Python package always; the CUDA extension (csrc/) only when it can be built.

GENJO_FAST_BUILD_CUDA=1 forces the extension (failing loudly if it cannot be built),
GENJO_FAST_BUILD_CUDA=0 skips it; unset, it is built when torch in the build environment is a
CUDA build and a CUDA toolkit is found. torch must be visible to the build, so build it with
`pip install --no-build-isolation .` (torch installed first), as flash-attention does.
"""
import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
BUILD_ENV = "GENJO_FAST_BUILD_CUDA"


def cuda_extension():
    """Returns (ext_modules, cmdclass) for setup(); empty when the extension is skipped."""
    mode = os.environ.get(BUILD_ENV, "auto").strip().lower()
    if mode in ("0", "false", "off", "no"):
        print(f"genjo_fast: CUDA extension skipped ({BUILD_ENV}={mode})")
        return [], {}
    sources = sorted(os.path.relpath(p, ROOT) for p in (ROOT / "csrc").glob("*")
                     if p.suffix in (".cpp", ".cu"))
    reason = None
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        reason = "torch is not importable by the build (use pip install --no-build-isolation)"
    else:
        if torch.version.cuda is None:
            reason = f"torch {torch.__version__} is a CPU build"
        elif CUDA_HOME is None:
            reason = "no CUDA toolkit found (set CUDA_HOME)"
        elif not os.path.exists(os.path.join(CUDA_HOME, "include", "cuda_runtime.h")):
            # e.g. an nvcc wrapper in /usr/local/bin makes torch guess CUDA_HOME=/usr/local
            reason = (f"CUDA_HOME={CUDA_HOME} is not a CUDA toolkit (no include/cuda_runtime.h); "
                      "set CUDA_HOME to the toolkit's root, e.g. /usr/local/cuda")
    if reason is None and not sources:
        reason = "csrc/ holds no .cpp/.cu sources"
    if reason is not None:
        if mode in ("1", "true", "on", "yes"):
            sys.exit(f"genjo_fast: {BUILD_ENV}={mode} but the CUDA extension cannot be built: "
                     f"{reason}")
        print(f"genjo_fast: building without the CUDA extension: {reason}")
        return [], {}
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # No GPU to detect the architecture from (a build machine): Ampere and Hopper.
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        print("genjo_fast: no GPU visible, building the CUDA extension for sm_80 and sm_90 "
              "(set TORCH_CUDA_ARCH_LIST to choose)")
    ext = CUDAExtension("genjo_fast._C", sources,
                        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]})
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
