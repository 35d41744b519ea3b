import os

import pytest
import torch

# Keep the suite deterministic and light on the 2-core CI machine.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

#: Whole-graph compilation and export of simwarp need this torch (README, docs/backend.md):
#: before, the tracer breaks the graph at constructs it learned later, and export fails inside
#: PyTorch (2.8, 2.9).
FULLGRAPH_TORCH = (2, 10)


def pytest_collection_modifyitems(config, items):
    if tuple(int(x) for x in torch.__version__.split(".")[:2]) >= FULLGRAPH_TORCH:
        return
    skip = pytest.mark.skip(reason=f"whole-graph compile/export needs torch >= {'.'.join(map(str, FULLGRAPH_TORCH))}")
    for item in items:
        if item.get_closest_marker("fullgraph") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
