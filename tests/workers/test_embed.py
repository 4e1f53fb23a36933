"""The embedder's process setup: glibc's allocator keeps the forward pass's memory (workers.embed.keep_freed_memory)."""

import subprocess
import sys

import pytest

from workers.embed import keep_freed_memory

# A fresh process (the allocator's state is per process): batch-1 forward passes after Embedder.load(),
# printing the minor page faults per pass (getrusage).
FORWARDS = """
import resource, torch
from workers.embed import Embedder
embedder = Embedder("test-model", "cpu", threads=1, max_batch=1)
embedder.load()
x = torch.zeros(1, 3, 224, 224).contiguous(memory_format=torch.channels_last)
for _ in range(3):
    embedder.forward(x)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    embedder.forward(x)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_forward_passes_reuse_their_memory_instead_of_faulting_in_fresh_pages(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    assert keep_freed_memory()
    done = subprocess.run([sys.executable, "-c", FORWARDS], capture_output=True, text=True, timeout=300, check=True)
    # Left to its own thresholds glibc mostly maps each pass's activations afresh: ~2,700 faults a pass.
    assert float(done.stdout.split()[-1]) < 100


def test_an_operators_malloc_environment_is_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", str(128 * 1024))
    assert not keep_freed_memory()
