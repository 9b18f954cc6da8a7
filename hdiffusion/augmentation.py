"""Non-leaking geometric augmentation (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models", Sec. 5, after the ADA pipeline of Karras et al. 2020), on batches of tensors.

Each image gets one affine warp composed of an x-flip, a y-flip, an isotropic scaling, a rotation, an
anisotropic scaling and a translation, each applied with probability `p` (`model.augment_prob`). The network is
told what was done through a 9-d conditioning vector `aug_cond` and samples with `aug_cond = 0`, the identity,
so the augmentations cannot leak into the generated images. The vector is k-diffusion's:

    [x-flip, y-flip, a_scale, cos(rotation) - 1, sin(rotation), a_aniso cos(2 phi), a_aniso sin(2 phi), t_x, t_y]

with flips in {0, 1}, the scale 2^(0.2 a_scale), the anisotropy 2^(0.2 a_aniso) along the axis at angle phi
and 2^(-0.2 a_aniso) across it, and a translation of (t_x W / 8, t_y H / 8) pixels; a_scale, a_aniso, t_x, t_y
are standard normal and both angles uniform on [-pi, pi). Two choices differ from k-diffusion: the rotation
covers the whole circle (k-diffusion's draw covers [0, pi)), and the anisotropy axis is encoded by twice its
angle, so that the vector determines the warp (`augmentation_matrix` rebuilds it from the vector alone): an axis
is the same at phi and phi + pi, and with phi itself (a_aniso, phi) and (-a_aniso, phi + pi) would give one
vector for two different warps.

All parameters of a batch are drawn at once from one generator on the images' device, and the warp is one
`grid_sample` over the batch, so augmentation runs on the GPU in the training step, and its random numbers
come from the chunk's generator like every other random number of the step (training.py).
"""

import math

import torch
import torch.nn.functional as F

AUG_COND_FEATURES = 9
SCALE_BASE = 2**0.2  # isotropic scale 2^(0.2 a_scale), a_scale ~ N(0, 1) (EDM's scale_std = 0.2)
ANISO_BASE = 2**0.2  # anisotropic scale 2^(0.2 a_aniso) (EDM's aniso_std = 0.2)
TRANSLATE_STD = 1 / 8  # translation standard deviation, as a fraction of the image side (k-diffusion's a_trans)


def sample_aug_cond(n, p, generator, device=None):
    """The conditioning vectors [n, 9] of n random augmentations, each part applied with probability p.

    Always draws the same amount of random numbers, whatever p, so later draws from the generator do not
    depend on p.
    """
    applied = torch.rand([n, 6], generator=generator, device=device) < p  # x-flip, y-flip, scale, rot, aniso, trans
    coins = torch.rand([n, 2], generator=generator, device=device) < 0.5
    angles = (torch.rand([n, 2], generator=generator, device=device) * 2 - 1) * math.pi
    normals = torch.randn([n, 4], generator=generator, device=device)
    applied = applied.float()
    x_flip, y_flip = (coins.float() * applied[:, :2]).unbind(1)
    scale = normals[:, 0] * applied[:, 2]
    rotation = angles[:, 0] * applied[:, 3]
    phi, aniso = angles[:, 1], normals[:, 1] * applied[:, 4]
    t_x, t_y = (normals[:, 2:] * applied[:, 5:]).unbind(1)
    return torch.stack([x_flip, y_flip, scale, torch.cos(rotation) - 1, torch.sin(rotation),
                        aniso * torch.cos(2 * phi), aniso * torch.sin(2 * phi), t_x, t_y], dim=1)


def augmentation_matrix(aug_cond, size):
    """[N, 3, 3] affine maps from output to input pixel coordinates (origin at the image center, x right, y
    down; skimage's inverse map), rebuilt from the conditioning vectors alone.

    The map is F S R A T: flips F = diag(1 - 2 x_flip, 1 - 2 y_flip), scale S, rotation R by -angle,
    anisotropy A = R(phi) diag(k, 1/k) R(-phi), translation T (k-diffusion's order). A is computed from
    (a cos 2 phi, a sin 2 phi) as exp(ln(k) B) with B = [[cos 2 phi, sin 2 phi], [sin 2 phi, -cos 2 phi]]:
    B^2 = I, so A = cosh(ln k) I + sinh(ln k) B, which is R(phi) diag(k, 1/k) R(-phi).
    """
    height, width = size
    c = aug_cond.float()
    x_flip, y_flip, scale, cos_m1, sin, aniso_c, aniso_s, t_x, t_y = c.unbind(1)
    ones = torch.ones_like(scale)

    flip = torch.diag_embed(torch.stack([1 - 2 * x_flip, 1 - 2 * y_flip], 1))
    cos = cos_m1 + 1
    rotate = SCALE_BASE ** scale[:, None, None] * torch.stack([torch.stack([cos, sin], 1),
                                                              torch.stack([-sin, cos], 1)], 1)
    log_k = math.log(ANISO_BASE)
    r = log_k * torch.hypot(aniso_c, aniso_s)  # |ln k|
    sinhc = torch.where(r > 0, torch.sinh(r) / torch.where(r > 0, r, ones), ones)  # sinh(r) / r
    b_c, b_s = log_k * aniso_c * sinhc, log_k * aniso_s * sinhc
    aniso = torch.cosh(r)[:, None, None] * torch.eye(2, device=c.device) + torch.stack(
        [torch.stack([b_c, b_s], 1), torch.stack([b_s, -b_c], 1)], 1)

    linear = flip @ rotate @ aniso
    shift = torch.stack([t_x * TRANSLATE_STD * width, t_y * TRANSLATE_STD * height], 1)
    matrix = torch.zeros([c.shape[0], 3, 3], device=c.device)
    matrix[:, :2, :2] = linear
    matrix[:, :2, 2] = (linear @ shift[:, :, None])[:, :, 0]
    matrix[:, 2, 2] = 1
    return matrix


def warp(images, matrix, mode="bicubic"):
    """Resample images [N, C, H, W] through pixel-space maps [N, 3, 3] (output -> input), reflecting at the
    borders (skimage's mode='reflect' in k-diffusion)."""
    n, _, height, width = images.shape
    # grid_sample's coordinates run from -1 to 1 across the image (align_corners=False), so a pixel offset x from
    # the center is x / (W / 2): conjugate the map by D = diag(W / 2, H / 2).
    half = torch.tensor([width / 2, height / 2], device=images.device)
    theta = torch.cat([matrix[:, :2, :2] * half[None, None, :] / half[None, :, None],
                       matrix[:, :2, 2:] / half[None, :, None]], dim=2)
    grid = F.affine_grid(theta, [n, 1, height, width], align_corners=False)
    return F.grid_sample(images, grid.to(images.dtype), mode=mode, padding_mode="reflection", align_corners=False)


def augment(images, p, generator):
    """Augment float images [N, C, H, W]; returns (images, aug_cond [N, 9]). Images drawn no augmentation come
    back bit for bit (the warp is skipped for them)."""
    aug_cond = sample_aug_cond(images.shape[0], p, generator, images.device)
    warped = warp(images, augmentation_matrix(aug_cond, images.shape[-2:]))
    identity = (aug_cond == 0).all(dim=1)
    return torch.where(identity[:, None, None, None], images, warped), aug_cond


def random_flip(images, generator):
    """Mirror each image left-right with probability 1/2 (plain, unconditioned data augmentation)."""
    flip = torch.rand([images.shape[0]], generator=generator, device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def augment_batch(images, augment_prob, flip, generator):
    """The training step's augmentation: (images, aug_cond or None).

    With augment_prob > 0 the non-leaking pipeline (its x-flip replaces the plain flip); else, with `flip`, a
    plain random left-right flip; else nothing, and no random numbers drawn.
    """
    if augment_prob > 0:
        return augment(images, augment_prob, generator)
    if flip:
        return random_flip(images, generator), None
    return images, None
