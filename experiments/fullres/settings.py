"""The experiment's settings, fixed before any result was seen, one :class:`Settings` per data set."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
IGNORE = 255
TRIMAP_RADII = (2, 4, 8, 16)
#: The paper's VOC kernels (Zheng et al. 2015, as crfasrnn): widths in px / colour levels, and weights.
VOC = {"theta_alpha": 160.0, "theta_beta": 3.0, "theta_gamma": 3.0, "spatial_weight": 3.0, "bilateral_weight": 5.0}
VOC_IMAGE_PIXELS = 500 * 375  # the size those widths were chosen for

#: arm -> table label, in the order of the tables.
ARMS = {
    "fcn": "(a) FCN",
    "fcn_plus": "(a+) FCN fine-tuned, no CRF (control)",
    "crf_post": "(b) FCN + dense CRF post-processing",
    "crfrnn": "(c) CRF-RNN end to end",
    "crfrnn_theta": "(d) CRF-RNN, bandwidths learned",
    "crf_only": "CRF-RNN over the frozen FCN",
}
FINETUNED = ("fcn_plus", "crfrnn", "crfrnn_theta", "crf_only")


@dataclass(frozen=True)
class Settings:
    """Everything one run of one data set uses; ``to_dict`` goes into results.json."""

    dataset: str
    root: Path
    unary_scale: float
    mean: tuple[float, float, float]  # RGB statistics of the unary network's input normalisation (0..1 scale)
    std: tuple[float, float, float]
    typical_pixels: int  # a typical full-resolution image (for rescaling the VOC widths)
    # the unary network (SmallFCN8s), trained from scratch at the reduced resolution
    widths: tuple[int, ...] = (16, 32, 48, 64, 96)
    fc: int = 128
    fcn_steps: int = 2000
    fcn_batch: int = 8
    fcn_crop: tuple[int, int] | None = None  # None: whole (reduced) images, which then must share one size
    fcn_lr: float = 0.05
    weight_decay: float = 5e-4
    # fine-tuning: every fine-tuned arm gets the same steps, images and learning rate
    finetune_steps: int = 480
    finetune_lr: float = 1e-3
    kernel_lr_mult: float = 100.0
    compat_lr_mult: float = 100.0
    theta_lr_mult: float = 100.0
    grad_clip: float = 10.0
    train_iterations: int = 5
    test_iterations: int = 10
    # grid search of (b) on held-apart training images
    held_apart: int = 37
    grid_alpha_factors: tuple[float, ...] = (0.5, 1.0, 2.0)
    grid_beta_factors: tuple[float, ...] = (0.5, 1.0, 2.0)
    grid_weight_factors: tuple[float, ...] = (0.5, 1.0, 2.0)  # bilateral weight
    # curves, figures
    curve_every: int = 40
    curve_images: int = 8
    figure_images: int = 4
    max_train: int | None = None  # smoke runs only
    max_val: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def size_factor(self) -> float:
        """Linear size of a typical image relative to the VOC image the paper's widths were chosen for."""
        return math.sqrt(self.typical_pixels / VOC_IMAGE_PIXELS)

    def voc_defaults(self) -> dict[str, float]:
        """The paper's VOC parameters with the spatial widths rescaled to this data set's image size."""
        s = self.size_factor
        return {**VOC, "theta_alpha": round(VOC["theta_alpha"] * s, 1), "theta_gamma": round(VOC["theta_gamma"] * s, 2)}

    def grid(self) -> list[dict[str, float]]:
        """theta_alpha x theta_beta x bilateral weight, each scaled both ways around the rescaled VOC defaults
        (which are in it); theta_gamma and the spatial weight stay at the defaults."""
        d = self.voc_defaults()
        return [{**d, "theta_alpha": round(d["theta_alpha"] * a, 1), "theta_beta": d["theta_beta"] * b,
                 "bilateral_weight": d["bilateral_weight"] * w}
                for a in self.grid_alpha_factors for b in self.grid_beta_factors for w in self.grid_weight_factors]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["root"] = str(self.root)
        d["voc_defaults_rescaled"] = self.voc_defaults()
        return d


CAMVID = Settings(
    dataset="camvid", root=DATA / "camvid", unary_scale=1 / 3,
    mean=(0.390, 0.405, 0.414), std=(0.30, 0.31, 0.31), typical_pixels=360 * 480,
)
HORSE = Settings(
    dataset="weizmann-horse", root=DATA / "weizmann-horse", unary_scale=0.5,
    mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), typical_pixels=50457,  # the median of the 218 masks
    fcn_steps=1500, fcn_crop=(96, 96), finetune_steps=450, held_apart=24, curve_every=30,
)
SETTINGS = {s.dataset: s for s in (CAMVID, HORSE)}
SEEDS = (0, 1, 2)


def smoke(s: Settings) -> Settings:
    """A miniature of ``s``: a few images and steps (for the slow test and trying the pipeline)."""
    return replace(s, fcn_steps=3, fcn_batch=2, finetune_steps=2, held_apart=2, curve_every=1, curve_images=1,
                   figure_images=1, max_train=6, max_val=2, grid_alpha_factors=(1.0,), grid_beta_factors=(1.0,),
                   grid_weight_factors=(2.0,))
