"""Batch augmentation on [0, 1] image tensors: geometric, intensity, crop, blur, masking,
CutMix and MixUp.

Done on whole batches with an explicit generator, so that a seed fixes every draw and the
cost stays small next to the network on a 2-core CPU. Images are (N, C, H, W); volumes
(N, C, D, H, W) get the 3D counterparts (flips of each axis, rotation about the axial D
axis, 3D shift and zoom, CutMix boxes in all three dimensions) from their own draws, so the
2D results for a given generator state do not depend on the 3D code.

The random resized crop and the Gaussian blur are torchvision.transforms.v2's own, so their
parameters are drawn exactly as the BPD code's torchvision pipeline draws them. Those
transforms take their draws from torch's global generator; each batch runs them under a
forked global state seeded from the stage's generator, so a seed still fixes every draw and
the global stream outside is left alone. Each is drawn per image (one v2 call per image: a
call on a batch would give every image the same box and sigma).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from stagewise.recipe import AugmentConfig, BlurConfig, CropConfig, MaskConfig, MixConfig


def _uniform(n: int, bound: float, g: torch.Generator) -> torch.Tensor:
    return (torch.rand(n, generator=g) * 2 - 1) * bound


def augment_batch(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Random flip, rotation, zoom, shift and brightness/contrast, one draw per image."""
    if not cfg.active:
        return x
    if x.dim() == 5:
        return _augment_volumes(x, cfg, g)
    n = x.shape[0]
    x = _warp(x.float(), cfg, g)
    if cfg.crop is not None:
        x = random_resized_crop(x, cfg.crop, g)
    if cfg.blur is not None:
        x = gaussian_blur(x, cfg.blur, g)
    if cfg.intensity:
        contrast = (1 + _uniform(n, cfg.intensity, g)).view(-1, 1, 1, 1).to(x.device)
        brightness = _uniform(n, cfg.intensity / 2, g).view(-1, 1, 1, 1).to(x.device)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * contrast + mean + brightness).clamp(0, 1)
    if cfg.mask is not None:
        x = pixel_mask(x, cfg.mask, g)
    return x


def augment_features(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """The stage's augmentation on feature maps (N, C, h, w), the cached output of the frozen
    groups (`augment_on: features`): the same flip/rotation/shift/zoom warp and resized crop,
    whose sizes are fractions of the side and so scale to the map, and masking, whose masked
    activations become 0 (a dropout of feature-map cells). Blur and intensity act on pixel
    values; the recipe refuses them here. Drawn in the same order as `augment_batch`."""
    if not cfg.active:
        return x
    x = _warp(x.float(), cfg, g)
    if cfg.crop is not None:
        x = random_resized_crop(x, cfg.crop, g)
    if cfg.mask is not None:
        x = pixel_mask(x, cfg.mask.model_copy(update={"value": 0.0}), g)
    return x


def _warp(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Flip, rotation, zoom and shift of (N, C, H, W) as one affine warp, one draw per image."""
    if not (cfg.rotate or cfg.translate or cfg.scale or cfg.flip):
        return x
    n = x.shape[0]
    angle = _uniform(n, math.radians(cfg.rotate), g)
    scale = 1 + _uniform(n, cfg.scale, g)
    flip = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0) if cfg.flip else torch.ones(n)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos * flip, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin * flip, cos
    theta[:, 0, 2], theta[:, 1, 2] = _uniform(n, 2 * cfg.translate, g), _uniform(n, 2 * cfg.translate, g)
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _chosen(n: int, p: float, g: torch.Generator) -> list[int]:
    """The images (indices) a transform with probability `p` applies to, one draw each."""
    return torch.nonzero(torch.rand(n, generator=g) < p).flatten().tolist()


def _per_image_v2(x: torch.Tensor, transform, chosen: list[int], g: torch.Generator) -> torch.Tensor:
    """`transform` (a torchvision v2 transform) on images `chosen` of x, each with its own draw,
    under torch's global generator forked and seeded from `g`."""
    if not chosen:
        return x
    seed = int(torch.randint(2**62, (1,), generator=g))
    x = x.clone()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in chosen:
            x[i] = transform(x[i])
    return x


def _spatial_2d(x: torch.Tensor, what: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"augment.{what} is a 2D augmentation; these inputs are volumes (N, C, D, H, W)")


def random_resized_crop(x: torch.Tensor, cfg: CropConfig, g: torch.Generator) -> torch.Tensor:
    """torchvision's RandomResizedCrop (bilinear, antialiased) back to the same size, per image."""
    from torchvision.transforms import v2

    _spatial_2d(x, "crop")
    crop = v2.RandomResizedCrop(tuple(x.shape[-2:]), scale=cfg.scale, ratio=cfg.ratio,
                                interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
    return _per_image_v2(x, crop, _chosen(x.shape[0], cfg.p, g), g)


def gaussian_blur(x: torch.Tensor, cfg: BlurConfig, g: torch.Generator) -> torch.Tensor:
    """torchvision's GaussianBlur with sigma drawn per image, on a share `p` of the images."""
    from torchvision.transforms import v2

    _spatial_2d(x, "blur")
    blur = v2.GaussianBlur(cfg.kernel, sigma=cfg.sigma)
    return _per_image_v2(x, blur, _chosen(x.shape[0], cfg.p, g), g)


def pixel_mask(x: torch.Tensor, cfg: MaskConfig, g: torch.Generator) -> torch.Tensor:
    """In a share `p` of the images (or volumes), each pixel becomes `value` with probability
    `fraction` (drawn for every channel, as the BPD code's `rand_like` mask)."""
    chosen = _chosen(x.shape[0], cfg.p, g)
    if not chosen:
        return x
    idx = torch.as_tensor(chosen, device=x.device)
    drop = (torch.rand((len(chosen), *x.shape[1:]), generator=g) < cfg.fraction).to(x.device)
    x = x.clone()
    x[idx] = torch.where(drop, torch.as_tensor(cfg.value, dtype=x.dtype, device=x.device), x[idx])
    return x


def _augment_volumes(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """`augment_batch` for (N, C, D, H, W): each axis flipped with p 0.5 (`flip`), a rotation
    in the axial (H, W) plane, one zoom for all axes, a shift along each axis; intensity as 2D."""
    n = x.shape[0]
    x = x.float()
    if cfg.rotate or cfg.translate or cfg.scale or cfg.flip:
        angle = _uniform(n, math.radians(cfg.rotate), g)
        scale = 1 + _uniform(n, cfg.scale, g)
        flip = torch.where(torch.rand(n, 3, generator=g) < 0.5, -1.0, 1.0) if cfg.flip else torch.ones(n, 3)
        shift = _uniform(3 * n, 2 * cfg.translate, g).view(n, 3)
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        # affine_grid's coordinates are (x, y, z) = (W, H, D); a flip negates one input column.
        rot = torch.zeros(n, 3, 3)
        rot[:, 0, 0], rot[:, 0, 1] = cos, -sin
        rot[:, 1, 0], rot[:, 1, 1] = sin, cos
        rot[:, 2, 2] = 1 / scale
        theta = torch.cat([rot * flip.view(n, 1, 3), shift.view(n, 3, 1)], dim=2)
        grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if cfg.intensity:
        contrast = (1 + _uniform(n, cfg.intensity, g)).view(-1, 1, 1, 1, 1).to(x.device)
        brightness = _uniform(n, cfg.intensity / 2, g).view(-1, 1, 1, 1, 1).to(x.device)
        mean = x.mean(dim=(1, 2, 3, 4), keepdim=True)
        x = ((x - mean) * contrast + mean + brightness).clamp(0, 1)
    if cfg.crop is not None or cfg.blur is not None:
        _spatial_2d(x, "crop" if cfg.crop is not None else "blur")
    if cfg.mask is not None:
        x = pixel_mask(x, cfg.mask, g)
    return x


def cutmix(x: torch.Tensor, y: torch.Tensor, cfg: MixConfig, g: torch.Generator):
    """Paste a box from a shuffled partner; lambda is the area actually kept after clipping."""
    if x.dim() == 5:
        return _cutmix_volumes(x, y, cfg, g)
    n, _, h, w = x.shape
    lam = _beta(cfg.alpha, g)
    cut = math.sqrt(1 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(torch.randint(h, (1,), generator=g)), int(torch.randint(w, (1,), generator=g))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    perm = torch.randperm(n, generator=g).to(x.device)
    x = x.clone()
    x[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
    lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    return x, lam * y + (1 - lam) * y[perm], lam


def _cutmix_volumes(x: torch.Tensor, y: torch.Tensor, cfg: MixConfig, g: torch.Generator):
    """CutMix for (N, C, D, H, W): a box cut in all three dims; lambda is the volume kept."""
    n, _, *dims = x.shape
    lam = _beta(cfg.alpha, g)
    cut = (1 - lam) ** (1 / 3)
    centres = [int(torch.randint(s, (1,), generator=g)) for s in dims]
    box = []
    for s, c in zip(dims, centres):
        half = int(s * cut) // 2
        box.append(slice(max(c - half, 0), min(c + half, s)))
    perm = torch.randperm(n, generator=g).to(x.device)
    x = x.clone()
    region = (slice(None), slice(None), *box)
    x[region] = x[perm][region]
    pasted = math.prod(b.stop - b.start for b in box)
    lam = 1 - pasted / math.prod(dims)
    return x, lam * y + (1 - lam) * y[perm], lam


def mixup(x: torch.Tensor, y: torch.Tensor, cfg: MixConfig, g: torch.Generator):
    """Blend each image (or volume, any rank) with a shuffled partner by Beta(alpha, alpha)."""
    lam = _beta(cfg.alpha, g)
    perm = torch.randperm(x.shape[0], generator=g).to(x.device)
    return lam * x.float() + (1 - lam) * x[perm].float(), lam * y + (1 - lam) * y[perm], lam


def _beta(alpha: float, g: torch.Generator) -> float:
    """Beta(alpha, alpha) as a ratio of two seeded gammas (torch's Beta takes no generator)."""
    e = torch._standard_gamma(torch.full((2,), float(alpha)), generator=g)
    return float(e[0] / (e[0] + e[1]))


def mix_batch(x, y, cutmix_cfg: MixConfig | None, mixup_cfg: MixConfig | None, g: torch.Generator):
    """Apply CutMix or MixUp to this batch with each one's probability (one of them at most)."""
    options = [(f, c) for f, c in ((cutmix, cutmix_cfg), (mixup, mixup_cfg)) if c is not None]
    if not options:
        return x, y
    fn, cfg = options[int(torch.randint(len(options), (1,), generator=g))]
    if float(torch.rand(1, generator=g)) >= cfg.p:
        return x, y
    x, y, _ = fn(x, y, cfg, g)
    return x, y
