"""moe-engine packaging.

Builds the optional IO extension moe_engine._C from csrc/*.cpp with plain pybind11 (no torch linkage).
CUDA parts (pinned buffers, async host-to-device copies, events) are compiled in only when a CUDA
toolkit is found (CUDA_HOME / CUDA_PATH / nvcc / /usr/local/cuda with cuda_runtime.h and cudart).
The install never fails because of the extension: a failed build is retried without CUDA (the CPU-only
extension), then without OpenMP, each time with one warning naming the step that failed; a missing compiler
or pybind11 prints one warning and moe_engine/_ops falls back to torch. Environment switches:
  MOE_ENGINE_NO_EXT=1   skip the extension entirely
  MOE_ENGINE_NO_CUDA=1  build the extension without its CUDA parts
The CPU kernels run their threads through OpenMP (-fopenmp; at run time torch's own libgomp, so both share
one team of threads); a compiler without OpenMP builds them on csrc/thread_pool.cpp's std::thread pool.
"""
import glob
import os
import re
import shutil
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

OPENMP = "-fopenmp"
CUDA_MACRO = ("MOE_WITH_CUDA", "1")
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
    """The moe_engine._C Extension, with CUDA flags when a toolkit is found (`cuda_parts` lists them, so that a
    failed CUDA build can drop them and build the CPU-only extension)."""
    kw = {"sources": sorted(glob.glob("csrc/*.cpp")), "depends": sorted(glob.glob("csrc/*.h")), "language": "c++",
          "extra_compile_args": ["-std=c++17", "-O3", "-g0", "-fvisibility=hidden", "-pthread", OPENMP],
          "extra_link_args": ["-pthread", OPENMP], "define_macros": [], "include_dirs": [], "library_dirs": [], "libraries": []}
    cuda = {"define_macros": [], "include_dirs": [], "library_dirs": [], "libraries": [], "runtime_library_dirs": []}
    root = _cuda_home()
    if root:
        libdir = _cudart_dir(root)
        cuda["define_macros"].append(CUDA_MACRO)
        cuda["include_dirs"].append(os.path.join(root, "include"))
        cuda["library_dirs"].append(libdir)
        if os.path.exists(os.path.join(libdir, "libcudart_static.a")):   # no runtime library path to find
            cuda["libraries"] += ["cudart_static", "dl", "rt"]
        else:
            cuda["libraries"].append("cudart")
            cuda["runtime_library_dirs"].append(libdir)
        for key, values in cuda.items():
            kw[key] = kw.get(key, []) + values
    ext = Extension("moe_engine._C", **kw)
    ext.cuda_parts = {"root": root, **cuda} if root else None
    return ext


def _drop_cuda(ext) -> None:
    """Remove what _extension added for CUDA: the CPU-only extension."""
    for key, values in ext.cuda_parts.items():
        if key != "root":
            setattr(ext, key, [v for v in getattr(ext, key) or [] if v not in values])
    ext.cuda_parts = None


def _drop_openmp(ext) -> None:
    """Without -fopenmp the kernels run on csrc/thread_pool.cpp's std::thread pool."""
    ext.extra_compile_args = [a for a in ext.extra_compile_args if a != OPENMP]
    ext.extra_link_args = [a for a in ext.extra_link_args if a != OPENMP]


def _failed_step(e: Exception) -> str:
    """Which step of the build failed, in words, with the error's first line."""
    step = {"CompileError": "compiling csrc/*.cpp", "LinkError": "linking moe_engine._C"}.get(type(e).__name__,
                                                                                              "setting up the build")
    first = (str(e).splitlines() or [""])[0]
    return f"{step} ({type(e).__name__}: {first}; the compiler's messages are above)"


class OptionalBuildExt(build_ext):
    """build_ext that never fails the install. A failed build is retried with one thing fewer: first without
    CUDA (the CPU-only extension), then without OpenMP; when nothing builds, the install goes on without
    moe_engine._C. Every fallback prints one warning naming the step that failed."""

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
        compiler, inplace = self.compiler, self.inplace   # build_ext.run replaces the first by a compiler object
        while True:                                        # and leaves the second False when it raises
            self.compiler, self.inplace = compiler, inplace
            try:
                super().run()
                return
            except Exception as e:  # noqa: BLE001 - compiler/headers missing, link error: never fail the install
                failed = _failed_step(e)
                fallback = self._fallback()
                if fallback is None:
                    self._skip(f"{failed}")
                    return
                what, instead, drop = fallback
                for ext in self.extensions:
                    drop(ext)
                self.force = True                          # objects compiled with the dropped flags are stale
                sys.stderr.write(f"\nWARNING: building moe_engine._C {what} failed while {failed}; building "
                                 f"{instead}.\n")

    def _fallback(self):
        """(what failed, what to build instead, how to change the extension) for the next attempt, or None."""
        ext = self.extensions[0]
        if getattr(ext, "cuda_parts", None):
            return (f"with CUDA ({ext.cuda_parts['root']})", "the CPU-only extension instead (MOE_ENGINE_NO_CUDA=1 "
                    "skips the CUDA attempt)", _drop_cuda)
        if OPENMP in ext.extra_compile_args:
            return (f"with {OPENMP}", "it without OpenMP (the kernels then use their own thread pool)", _drop_openmp)
        return None

    def _skip(self, why):
        self.extensions = []
        sys.stderr.write(f"\nWARNING: moe_engine._C (the C++ IO extension) was not built: {why}\n"
                         "         moe-engine will use its slower torch fallback. Install a C++17 compiler and\n"
                         "         pybind11, then reinstall with `pip install -v -e .` to see the build log.\n\n")

    def get_outputs(self):
        return super().get_outputs() if self.extensions else []


def _version() -> str:
    """moe_engine.__version__, read from the file (importing the package needs torch)."""
    text = Path(__file__).with_name("moe_engine").joinpath("__init__.py").read_text(encoding="utf-8")
    return re.search(r'^__version__ = "([^"]+)"', text, re.MULTILINE).group(1)


def main():
    setup(
        name="moe-engine",
        version=_version(),
        description="Inference engine for Mixture-of-Experts models that do not fit in fast memory",
        long_description=Path("README.md").read_text(encoding="utf-8"),
        long_description_content_type="text/markdown",
        python_requires=">=3.10",
        packages=find_packages(include=["moe_engine", "moe_engine.*", "predictors", "predictors.*",
                                        "scheduling", "scheduling.*"]),
        include_package_data=True,
        package_data={"moe_engine": ["models/tiny-moe/*",                # the bundled default model
                                     "profiling/prompts.txt",             # `moe-engine profile`'s built-in prompts
                                     "profiling/profile_schema.json",     # the profile JSON's schema
                                     "profiling/tiny-moe-trace.npz"]},    # `moe-engine simulate`'s default trace
        ext_modules=[] if os.environ.get("MOE_ENGINE_NO_EXT") == "1" else [_extension()],
        cmdclass={"build_ext": OptionalBuildExt},
        install_requires=[
            "torch>=2.4",          # install torch==2.13.0 first on CPU-only machines (see README)
            "transformers>=4.56",
            "huggingface_hub>=0.34",   # MODEL_DIR as a hub id (org/name): download or the local cache
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
            # no triton here: the CPU suite runs the Triton kernel's tests under TRITON_INTERPRET=1 when triton is
            # installed (.ci/run installs it on its own) and skips them, with the reason, when it is not
            "test": ["pytest>=8", "openai>=1.0", "httpx", "jsonschema>=4", "matplotlib"],
            "gpu": ["triton>=3.2; platform_system == 'Linux'"],   # the GPU dequant-matmul kernel
            "bench": ["matplotlib", "xgrammar>=0.2", "outlines-core>=0.2"],   # + bench/bench_grammar.py's rivals
        },
        entry_points={"console_scripts": ["moe-engine=moe_engine.cli:main"]},
    )


if __name__ == "__main__":      # pip's build backend and `python setup.py ...` run this file as __main__
    main()
