"""binaryduo: distributed trainer for BinaryDuo binary-activation networks.

The three code folders at the top level install as sub-packages of the ``binaryduo``
namespace (never as generic top-level names such as ``models``).
"""
from setuptools import setup

PACKAGE_DIRS = {
    "binaryduo.models": "models",
    "binaryduo.data": "data",
    "binaryduo.trainer": "trainer",
    **{f"binaryduo.trainer.{sub}": f"trainer/{sub}"
       for sub in ("cli", "recipe", "run", "runtime", "tracking", "analysis", "export")},
    # Slurm jobs rendered, submitted and followed, beside the sbatch template (package data)
    "binaryduo.slurm": "slurm",
    # data, not code: the shipped recipes, found with importlib.resources (``binaryduo demo``)
    "binaryduo.recipes": "recipes",
}

# Pinned as measured (docs/dependencies.md): the only working torch/torchvision pair on the
# local wheel mirror, the DALI build matching torch's CUDA 13, and mlflow 3.17.2
# (3.18.0's mlflow-skinny is missing from the mirror and pip silently falls back).
INSTALL_REQUIRES = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "deepspeed==0.19.8",
    "nvidia-dali-cuda130==2.4.0",
    "mlflow==3.17.2",
    "pyyaml>=6",
    "pydantic>=2",
    "tqdm>=4",
    "matplotlib>=3",  # training-curve PNGs (also an mlflow dependency)
    # the inference engine of exported binary networks: its CPU plugin runs BinaryConvolution as a
    # bit-packed xnor-popcount kernel (docs/dependencies.md); installs beside torch's numpy 2.4
    "openvino==2026.4.1",
    # NVML's Python binding (pure Python, ~50 kB): MLflow's GPU collector reads utilisation,
    # memory and power of every GPU of rank 0's node through it (system metrics); where no NVIDIA
    # driver answers, the GPU collector is skipped (trainer/tracking/system_metrics.py)
    "nvidia-ml-py>=12",
    "scipy>=1.10",  # Student t quantiles / p-values of `compare --by-seed --baseline` (also an
    # mlflow dependency, 1.17 installed; named because binaryduo now imports it itself)
]

setup(
    name="binaryduo",
    version="0.1.0",
    description="Distributed ImageNet trainer for BinaryDuo binary-activation networks",
    python_requires=">=3.11,<3.12",
    packages=list(PACKAGE_DIRS),
    package_dir=PACKAGE_DIRS,
    # recipes sit one folder deep (demo/, studies/, cifar10/, imagenet/, analysis/); setuptools expands
    # these globs relative to the package folder, sub-folders included
    package_data={"binaryduo.slurm": ["*.sbatch", "README.md"],
                  "binaryduo.recipes": ["*/*.yaml"]},
    install_requires=INSTALL_REQUIRES,
    # pytest 9 keeps node ids in a field that pytest-xdist 3.8 (the newest) does not rename, so
    # --dist loadgroup stops grouping (tests/conftest.py checks it)
    extras_require={"test": ["pytest>=8,<9", "pytest-xdist>=3.6"]},
    entry_points={"console_scripts": ["binaryduo = binaryduo.trainer.cli.main:main"]},
)
