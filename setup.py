"""moe-engine packaging. The C++/CUDA extension (csrc/) arrives with the offloading work and will be
optional: the install must never fail for lack of a compiler or CUDA toolkit."""
from setuptools import find_packages, setup

setup(
    name="moe-engine",
    version="0.1.0",
    description="Inference engine for Mixture-of-Experts models that do not fit in fast memory",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["moe_engine", "moe_engine.*", "predictors", "predictors.*",
                                    "scheduling", "scheduling.*"]),
    include_package_data=True,
    package_data={"moe_engine": ["models/tiny-moe/*"]},   # the bundled default model
    install_requires=[
        "torch>=2.4",          # install torch==2.13.0 first on CPU-only machines (see README)
        "transformers>=4.56",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "numpy",
        "tqdm",
        "psutil",
    ],
    extras_require={"test": ["pytest>=8"]},
    entry_points={"console_scripts": ["moe-engine=moe_engine.cli:main"]},
)
