"""The embedder's process setup: glibc's allocator keeps the forward pass's memory (workers.embed.keep_freed_memory);
bfloat16 on the CPU (workers.embed.has_native_bfloat16, ModelSettings.cpu_bfloat16); a batch
prepared for the model (Embedder.prepare)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from schemas.settings import ModelSettings
from workers.decode import decode
from workers.embed import BF16_CPU_BATCH, INPUT_PX, Embedder, has_native_bfloat16, keep_freed_memory, unit_rows

SAMPLE_IMAGES = Path(__file__).resolve().parents[2] / "ops" / "sample" / "images"

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


def test_bfloat16_on_the_cpu_runs_the_model_in_bfloat16_and_gives_vectors_close_to_float32_s():
    photos = [decode(p.read_bytes(), 10**8) for p in sorted(SAMPLE_IMAGES.glob("*.jpg"))[:16]]
    f32 = Embedder("test-model", "cpu", threads=1, bfloat16=False)
    bf16 = Embedder("test-model", "cpu", threads=1, bfloat16=True)
    x = torch.zeros(2, 3, INPUT_PX, INPUT_PX).contiguous(memory_format=torch.channels_last)
    assert f32.forward(x).dtype == torch.float32 and bf16.forward(x).dtype == torch.bfloat16
    assert (f32.max_batch, bf16.max_batch) == (1, BF16_CPU_BATCH)
    a, b = f32.embed(photos), bf16.embed(photos)
    assert a.dtype == b.dtype == np.float32 and a.shape == b.shape == (16, 1280)
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1, atol=1e-5)
    cosine = (a * b).sum(axis=1)  # 400 sample photos, segmented: min 0.988, median 0.9988 (README)
    assert cosine.min() >= 0.98 and np.median(cosine) >= 0.995, cosine
    assert ((b @ a.T).argmax(axis=1) == np.arange(16)).all()  # each finds its own float32 vector first
    assert not np.array_equal(a, b)  # bfloat16 did run


def test_the_setting_decides_bfloat16_and_auto_follows_the_cpu_s_bfloat16_flags(tmp_path):
    assert Embedder.from_settings(ModelSettings(device="cpu", cpu_bfloat16="on")).bfloat16
    assert not Embedder.from_settings(ModelSettings(device="cpu", cpu_bfloat16="off")).bfloat16
    assert Embedder.from_settings(ModelSettings(device="cpu", cpu_bfloat16="auto")).bfloat16 == has_native_bfloat16()
    cpus = {"amx": "fpu avx512f amx_bf16 amx_tile amx_int8", "zen4": "fpu avx512f avx512_bf16 avx512_vnni",
            "avx512": "fpu avx512f avx512bw avx512_vnni", "avx2": "fpu avx2 fma"}
    for name, flags in cpus.items():
        (tmp_path / name).write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    assert has_native_bfloat16(str(tmp_path / "amx")) and has_native_bfloat16(str(tmp_path / "zen4"))
    assert not has_native_bfloat16(str(tmp_path / "avx512")) and not has_native_bfloat16(str(tmp_path / "avx2"))
    assert not has_native_bfloat16(str(tmp_path / "none"))


def test_prepare_letterboxes_on_white_and_normalises_and_embed_is_prepare_then_forward():
    wide = np.zeros((56, 112, 3), dtype=np.uint8)
    wide[:] = (255, 0, 0)  # red, twice as wide as high: white bands above and below
    model = Embedder("test-model", "cpu", threads=1, bfloat16=False)
    x = model.prepare([wide, np.full((224, 224, 3), 127, dtype=np.uint8)])
    assert x.shape == (2, 3, INPUT_PX, INPUT_PX) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    white, red = (255 - 127) / 128, torch.tensor([(255 - 127) / 128, -127 / 128, -127 / 128])
    assert torch.allclose(x[0, :, :50], torch.full((3, 50, INPUT_PX), white))  # band of 56 rows
    assert torch.allclose(x[0, :, 60:164, 100], red[:, None]) and torch.allclose(x[0, :, 174:, 7], torch.tensor(white))
    assert torch.all(x[1] == 0)  # the mean grey, already square and 224 px: untouched
    photos = [decode(p.read_bytes(), 10**8) for p in sorted(SAMPLE_IMAGES.glob("*.jpg"))[:3]]
    vectors = model.embed(photos)
    np.testing.assert_allclose(unit_rows(model.forward(model.prepare(photos))), vectors, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
