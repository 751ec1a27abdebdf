"""moe-engine packaging.

Builds the optional IO extension moe_engine._C from csrc/*.cpp with plain pybind11 (no torch linkage).
CUDA parts (pinned buffers, async host-to-device copies, events) are compiled in only when a CUDA
toolkit is found (CUDA_HOME / CUDA_PATH / nvcc / /usr/local/cuda with cuda_runtime.h and cudart).
The install never fails because of the extension: a missing compiler, pybind11 or CUDA prints one
warning and moe_engine/_ops falls back to torch. Environment switches:
  MOE_ENGINE_NO_EXT=1   skip the extension entirely
  MOE_ENGINE_NO_CUDA=1  build the extension without its CUDA parts
The CPU kernels run their threads through OpenMP (-fopenmp; at run time torch's own libgomp, so both share
one team of threads); a compiler without OpenMP builds them on csrc/thread_pool.cpp's std::thread pool.
"""
import glob
import os
import shutil
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

OPENMP = "-fopenmp"
CUDA_LIB_SUBDIRS = ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib"),
                    os.path.join("targets", "sbsa-linux", "lib"))


def _cuda_home():
    """The first CUDA toolkit root that has cuda_runtime.h and a cudart library, else None."""
    if os.environ.get("MOE_ENGINE_NO_CUDA") == "1":
        return None
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for root in filter(None, candidates):
        if os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")) and _cudart_dir(root):
            return root
    return None


def _cudart_dir(root):
    for sub in CUDA_LIB_SUBDIRS:
        d = os.path.join(root, sub)
        if glob.glob(os.path.join(d, "libcudart_static.a")) or glob.glob(os.path.join(d, "libcudart.so*")):
            return d
    return None


def _extension():
    """The moe_engine._C Extension, with CUDA flags when a toolkit is found."""
    kw = {"sources": sorted(glob.glob("csrc/*.cpp")), "depends": sorted(glob.glob("csrc/*.h")), "language": "c++",
          "extra_compile_args": ["-std=c++17", "-O3", "-g0", "-fvisibility=hidden", "-pthread", OPENMP],
          "extra_link_args": ["-pthread", OPENMP], "define_macros": [], "include_dirs": [], "library_dirs": [], "libraries": []}
    root = _cuda_home()
    if root:
        libdir = _cudart_dir(root)
        kw["define_macros"].append(("MOE_WITH_CUDA", "1"))
        kw["include_dirs"].append(os.path.join(root, "include"))
        kw["library_dirs"].append(libdir)
        if os.path.exists(os.path.join(libdir, "libcudart_static.a")):   # no runtime library path to find
            kw["libraries"] += ["cudart_static", "dl", "rt"]
        else:
            kw["libraries"].append("cudart")
            kw["runtime_library_dirs"] = [libdir]
    return Extension("moe_engine._C", **kw)


class OptionalBuildExt(build_ext):
    """build_ext that turns any failure to build moe_engine._C into one warning."""

    def run(self):
        try:
            import pybind11
        except ImportError as e:
            self._skip(f"pybind11 is not importable ({e})")
            return
        for ext in self.extensions:
            ext.include_dirs.insert(0, pybind11.get_include())
        if self.parallel is None:
            self.parallel = os.cpu_count() or 1   # one compiler process per source file
        try:
            super().run()
        except Exception as e:  # noqa: BLE001 - compiler/headers missing, link error: never fail the install
            if not any(OPENMP in ext.extra_compile_args for ext in self.extensions):
                self._skip(f"{type(e).__name__}: {e}")
                return
            for ext in self.extensions:   # once more without OpenMP (the kernels then use their own thread pool)
                ext.extra_compile_args = [a for a in ext.extra_compile_args if a != OPENMP]
                ext.extra_link_args = [a for a in ext.extra_link_args if a != OPENMP]
            sys.stderr.write(f"\nWARNING: building moe_engine._C with {OPENMP} failed; building it without.\n")
            self.run()

    def _skip(self, why):
        self.extensions = []
        sys.stderr.write(f"\nWARNING: moe_engine._C (the C++ IO extension) was not built: {why}\n"
                         "         moe-engine will use its slower torch fallback. Install a C++17 compiler and\n"
                         "         pybind11, then reinstall with `pip install -v -e .` to see the build log.\n\n")

    def get_outputs(self):
        return super().get_outputs() if self.extensions else []


ext_modules = [] if os.environ.get("MOE_ENGINE_NO_EXT") == "1" else [_extension()]

setup(
    name="moe-engine",
    version="0.1.0",
    description="Inference engine for Mixture-of-Experts models that do not fit in fast memory",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["moe_engine", "moe_engine.*", "predictors", "predictors.*",
                                    "scheduling", "scheduling.*"]),
    include_package_data=True,
    package_data={"moe_engine": ["models/tiny-moe/*",                # the bundled default model
                                 "profiling/prompts.txt",             # `moe-engine profile`'s built-in prompts
                                 "profiling/profile_schema.json"]},   # the profile JSON's schema
    ext_modules=ext_modules,
    cmdclass={"build_ext": OptionalBuildExt},
    install_requires=[
        "torch>=2.4",          # install torch==2.13.0 first on CPU-only machines (see README)
        "transformers>=4.56",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "numpy",
        "tqdm",
        "psutil",
        "scipy>=1.9",          # scipy.optimize.milp: mixed-precision bit allocation
        "fastapi>=0.100",      # moe-engine serve: the OpenAI-compatible server
        "pydantic>=2",
        "uvicorn>=0.30",
        "prometheus_client>=0.17",
        "rich>=13",            # moe-engine simulate / profile: report tables
        "llguidance>=1.9,<2",  # structured output: JSON schema / regex / grammar token masks (runtime/grammar.py)
    ],
    extras_require={
        # triton: the GPU dequant-matmul kernel; tests run it on CPU with TRITON_INTERPRET=1
        "test": ["pytest>=8", "openai>=1.0", "httpx", "jsonschema>=4", "matplotlib",
                 "triton==3.9.0; platform_system == 'Linux' and platform_machine == 'x86_64'"],
        "gpu": ["triton>=3.2; platform_system == 'Linux'"],
        "bench": ["matplotlib", "xgrammar>=0.2", "outlines-core>=0.2"],   # + bench/bench_grammar.py's rivals
    },
    entry_points={"console_scripts": ["moe-engine=moe_engine.cli:main"]},
)
