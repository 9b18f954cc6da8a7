"""From a checkpoint to images: load the denoiser, draw one image per seed."""

import torch

from .checkpoint import load_for_inference
from .config import validate_config
from .denoiser import Denoiser
from .errors import UsageError
from .models import make_model
from .noise import get_sigmas_karras
from .sampling import sample_dpmpp_2m


def load_denoiser(path, use_ema=True, device="cpu"):
    """(denoiser, config, step) from a training checkpoint or an inference file."""
    state, config, step = load_for_inference(path, use_ema=use_ema)
    config = validate_config(config, f"{path} (stored config)")
    model = make_model(config["model"], config["dataset"]["num_classes"])
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise UsageError(f"{path}: weights do not match the stored config ({str(error).splitlines()[0]})") from None
    model.to(device).eval().requires_grad_(False)
    model_config = config["model"]
    denoiser = Denoiser(model, sigma_data=model_config["sigma_data"], weighting=model_config["loss_weighting"],
                        soft_min_snr_gamma=model_config["soft_min_snr_gamma"])
    return denoiser, config, step


@torch.no_grad()
def generate(denoiser, config, seeds, steps=50, class_labels=None, device="cpu", autocast_dtype=None):
    """One image per seed; image i depends only on seeds[i] (and its class), never on the batch it is in.

    `class_labels`: a LongTensor with one label per seed for class-conditional models (None otherwise).
    """
    model_config = config["model"]
    shape = (model_config["input_channels"], *model_config["input_size"])
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(device)
    sigmas = get_sigmas_karras(steps, model_config["sigma_min"], model_config["sigma_max"], device=device)
    extra_args = {} if class_labels is None else {"class_cond": class_labels.to(device)}
    with torch.autocast(torch.device(device).type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        images = sample_dpmpp_2m(denoiser, noise * sigmas[0], sigmas, extra_args=extra_args, disable=True)
    return images.float().clamp(-1, 1)


def random_classes(seeds, num_classes):
    """A class per seed, drawn from the seed itself so that it too is reproducible per image."""
    return torch.tensor([int(torch.randint(num_classes, (), generator=torch.Generator().manual_seed(s + 2**40)))
                         for s in seeds])
