"""The data package's boundaries: no trainer/models imports, DALI loaded only when iterating."""
import subprocess
import sys

CODE = """
import sys
import binaryduo.data.pipelines, binaryduo.data.prepare, binaryduo.data.check
from binaryduo.data import LoaderSpec, build_loader, check_dataset, prepare_fashion_mnist
bad = sorted(m for m in sys.modules if m.startswith(("binaryduo.trainer", "binaryduo.models")))
print(bad, "nvidia.dali" in sys.modules)
"""


def test_data_imports_neither_trainer_nor_models_nor_dali_eagerly():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True,
                         timeout=120, check=True).stdout.strip()
    assert out == "[] False"
