"""EDM preconditioning and loss weightings (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models", Table 1 and Sec. 5).

The denoiser is D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma)), where F is the
network. Training minimises a weighted squared error of F against its effective target (EDM eq. 8), which
equals a weighted squared error of D against the clean image, since D - x0 = c_out (F - F_target).
"""

import torch
from torch import nn

WEIGHTINGS = ("karras", "soft-min-snr", "snr")


def edm_scalings(sigma, sigma_data):
    """The EDM preconditioning of Table 1: returns (c_skip, c_out, c_in, c_noise), each shaped like sigma."""
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2) ** 0.5
    c_in = 1 / (sigma**2 + sigma_data**2) ** 0.5
    c_noise = torch.log(sigma) / 4
    return c_skip, c_out, c_in, c_noise


def loss_weight(sigma, sigma_data, weighting, soft_min_snr_gamma=None):
    """The weight on the squared error of the network output F, per noise level sigma.

    Each weighting is defined on the error of the denoised image D (weight_D); since D - D* = c_out (F - F*),
    the weight on the error of F is weight_F = weight_D c_out^2, with c_out^2 = sigma^2 sd^2 / (sigma^2 + sd^2):
      karras:       weight_D = 1 / c_out^2, EDM's lambda(sigma) (Table 1)        weight_F = 1
      soft-min-snr: weight_D = 1 / (sigma^2 + 1/gamma), a soft min(SNR, gamma)  weight_F = c_out^2 / (sigma^2 + 1/gamma)
      snr:          weight_D = 1 / sigma^2 = SNR                                weight_F = sd^2 / (sigma^2 + sd^2)
    with SNR = 1 / sigma^2. soft-min-snr softens min-SNR (Hang et al. 2023) as in HDiT (Crowson et al. 2024);
    gamma defaults to sd^-2, giving weight_D = 1 / (sigma^2 + sd^2).
    """
    if weighting == "karras":
        return torch.ones_like(sigma)
    if weighting == "soft-min-snr":
        gamma = sigma_data**-2 if soft_min_snr_gamma is None else soft_min_snr_gamma
        if not gamma > 0:
            raise ValueError(f"soft_min_snr_gamma must be positive, got {gamma}")
        c_out_sq = sigma**2 * sigma_data**2 / (sigma**2 + sigma_data**2)
        return c_out_sq / (sigma**2 + 1 / gamma)
    if weighting == "snr":
        return sigma_data**2 / (sigma**2 + sigma_data**2)
    raise ValueError(f"unknown loss weighting {weighting!r}; expected one of {', '.join(WEIGHTINGS)}")


def _scaling_dtype(dtype):
    # Scalings in at least float32: a bf16 sigma would put ~1% error into c_skip and c_out.
    return torch.promote_types(dtype, torch.float32)


def _batch_sigma(sigma, x):
    """sigma as a [N] tensor on x's device, in at least float32; a scalar is broadcast over the batch."""
    if isinstance(sigma, torch.Tensor) and sigma.is_floating_point():
        sigma = sigma.to(device=x.device, dtype=_scaling_dtype(sigma.dtype))
    else:
        sigma = torch.as_tensor(sigma, device=x.device, dtype=_scaling_dtype(x.dtype))
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    if sigma.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a scalar or have shape [{x.shape[0]}], got {list(sigma.shape)}")
    return sigma


def _append_dims(t, ndim):
    """Reshapes a [N] tensor to [N, 1, ..., 1] with ndim dims, to broadcast over image dims."""
    return t.reshape(t.shape + (1,) * (ndim - t.ndim))


class Denoiser(nn.Module):
    """Wraps a network F into the EDM denoiser D(x; sigma) and its training loss.

    The network is called as inner_model(c_in * x, c_noise, **cond): it sees the scaled input and
    c_noise = ln(sigma) / 4, never sigma itself. Conditioning kwargs (class_cond, aug_cond, ...) pass through.
    """

    def __init__(self, inner_model, sigma_data=1.0, weighting="karras", soft_min_snr_gamma=None):
        super().__init__()
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown loss weighting {weighting!r}; expected one of {', '.join(WEIGHTINGS)}")
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be positive, got {sigma_data}")
        if soft_min_snr_gamma is not None and not soft_min_snr_gamma > 0:
            raise ValueError(f"soft_min_snr_gamma must be positive, got {soft_min_snr_gamma}")
        self.inner_model = inner_model
        self.sigma_data = float(sigma_data)
        self.weighting = weighting
        self.soft_min_snr_gamma = soft_min_snr_gamma

    def _scalings(self, sigma, ndim):
        c_skip, c_out, c_in, c_noise = edm_scalings(sigma, self.sigma_data)
        return _append_dims(c_skip, ndim), _append_dims(c_out, ndim), _append_dims(c_in, ndim), c_noise

    def forward(self, x, sigma, **cond):
        """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) (EDM eq. 7)."""
        sigma = _batch_sigma(sigma, x)
        c_skip, c_out, c_in, c_noise = self._scalings(sigma, x.ndim)
        return c_skip * x + c_out * self.inner_model(c_in * x, c_noise, **cond)

    def loss(self, x0, noise, sigma, **cond):
        """Per-sample loss [N]: weight_F(sigma) * mean over non-batch dims of (F - F_target)^2 (EDM eq. 8).

        F_target = (x0 - c_skip x) / c_out is the network output for which D(x; sigma) = x0. The error is
        taken in float32 (or wider) even when F comes out of bf16 autocast.
        """
        sigma = _batch_sigma(sigma, x0)
        c_skip, c_out, c_in, c_noise = self._scalings(sigma, x0.ndim)
        noised = x0 + _append_dims(sigma, x0.ndim) * noise
        target = (x0 - c_skip * noised) / c_out
        model_output = self.inner_model(c_in * noised, c_noise, **cond)
        error_dtype = torch.promote_types(_scaling_dtype(model_output.dtype), target.dtype)
        squared_error = (model_output.to(error_dtype) - target.to(error_dtype)) ** 2
        weight = loss_weight(sigma, self.sigma_data, self.weighting, self.soft_min_snr_gamma)
        return weight.to(error_dtype) * squared_error.flatten(1).mean(1)
