"""The README's install and test instructions: what a reader copies first must work on their machine."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_cpu_users_install_a_cpu_torch_before_moebench():
    """`pip install -e '.[dev]'` alone pulls PyPI's CUDA build of torch (~5.8 GB) onto a CPU machine."""
    cpu_torch = re.search(r"pip install torch[^\n]*--index-url https://download\.pytorch\.org/whl/cpu", README)
    assert cpu_torch, "no CPU-index torch install in the README"
    after = README[cpu_torch.end():]
    assert "pip install -e '.[dev]'" in after.split("```")[0], "the CPU torch must come before `pip install -e`"


def test_gpu_tests_paragraph_names_a_command_that_exists():
    assert "python -m pytest -q -m gpu tests/gpu" in README and "scripts/gpu_tests.sh" in README
    assert (ROOT / "scripts" / "gpu_tests.sh").is_file() and (ROOT / "tests" / "gpu").is_dir()
