"""From a checkpoint to images: load the denoiser, draw one image per seed with any sampler, write PNGs."""

import inspect
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_for_inference
from .config import validate_config
from .denoiser import Denoiser
from .errors import UsageError, reported_as_storage_error
from .guidance import cfg_denoiser, choose_classes
from .models import make_model
from .noise import SCHEDULES
from .sampling import SAMPLERS, make_noise_sampler


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


# Parsing what users type ---------------------------------------------------------------------------------

MAX_SEED, MAX_IMAGES = 2**32 - 1, 10_000_000


def parse_seeds(text):
    """StyleGAN-style seed lists: '0-63', '0-3,10,20-22' (ranges inclusive) -> a list of distinct seeds."""
    seeds = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise UsageError(f"--seeds {text!r}: {part.strip()!r} is not a seed or a range like 0-63")
        first, last = int(match[1]), int(match[2] or match[1])
        if last < first:
            raise UsageError(f"--seeds {text!r}: the range {first}-{last} runs backwards")
        if last > MAX_SEED:
            raise UsageError(f"--seeds {text!r}: seeds go from 0 to {MAX_SEED}")
        if len(seeds) + last - first >= MAX_IMAGES:
            raise UsageError(f"--seeds {text!r}: more than {MAX_IMAGES:,} seeds")
        seeds.extend(range(first, last + 1))
    if len(set(seeds)) != len(seeds):
        repeated = sorted({s for s in seeds if seeds.count(s) > 1})
        raise UsageError(f"--seeds {text!r}: seed {repeated[0]} appears more than once")
    return seeds


def parse_grid(text, n):
    """(columns, count) of --grid: 'auto' -> a near-square grid of all n images; 'CxR' -> C columns and R rows,
    filled with the first C * R images in seed order."""
    if text == "auto":
        return None, n
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if not match or int(match[1]) < 1 or int(match[2]) < 1:
        raise UsageError(f"--grid {text!r}: expected COLUMNSxROWS, e.g. 8x8")
    columns, rows = int(match[1]), int(match[2])
    if columns * rows > n:
        raise UsageError(f"--grid {text}: needs {columns * rows} images, but only {n} are sampled")
    return columns, columns * rows


def parse_interval(text):
    """--cfg-interval 'LO,HI' -> (lo, hi)."""
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"--cfg-interval {text!r}: expected two noise levels LO,HI, e.g. 0.28,2.9") from None
    if not 0 <= lo <= hi:
        raise UsageError(f"--cfg-interval {text!r}: needs 0 <= LO <= HI")
    return lo, hi


# Sampling ------------------------------------------------------------------------------------------------

def sampler_parameters(name):
    return inspect.signature(SAMPLERS[name]).parameters


def make_sigmas(schedule, steps, sigma_min, sigma_max, rho=None, device="cpu"):
    """The schedule's steps + 1 sigmas, ending in 0."""
    if schedule not in SCHEDULES:
        raise UsageError(f"unknown schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")
    options = {}
    if rho is not None:
        if "rho" not in inspect.signature(SCHEDULES[schedule]).parameters:
            raise UsageError(f"--rho applies to the karras and polyexponential schedules, not {schedule}")
        options["rho"] = rho
    try:
        return SCHEDULES[schedule](steps, sigma_min, sigma_max, device=device, **options)
    except ValueError as error:
        raise UsageError(f"schedule {schedule}: {error}") from None


@torch.no_grad()
def generate(denoiser, config, seeds, steps=50, class_labels=None, device="cpu", autocast_dtype=None, *,
             sampler="dpmpp_2m", schedule="karras", sigma_min=None, sigma_max=None, rho=None, cfg_scale=1.0,
             cfg_interval=None, sampler_options=None):
    """One image per seed; image i depends only on seeds[i] (and its class), never on the batch it is in.

    The initial noise of image i is drawn on the CPU from seeds[i] (so it is the same on every device), and every
    later draw of a stochastic sampler comes from seeds[i] too (make_noise_sampler: an integer hash, so the same
    on every device up to float rounding). `class_labels`: a LongTensor with one label per seed for
    class-conditional models (None otherwise). sigma_min / sigma_max default to the model's; cfg_scale != 1
    guides towards the class (cfg_denoiser), within cfg_interval if given. `sampler_options`: extra keyword
    arguments of the sampler (eta, s_churn, ...).
    """
    if sampler not in SAMPLERS:
        raise UsageError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLERS)}")
    model_config, num_classes = config["model"], config["dataset"]["num_classes"]
    shape = (model_config["input_channels"], *model_config["input_size"])
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(device)
    sigmas = make_sigmas(schedule, steps, model_config["sigma_min"] if sigma_min is None else sigma_min,
                         model_config["sigma_max"] if sigma_max is None else sigma_max, rho, device)
    model = denoiser
    if cfg_scale != 1:
        if not num_classes or class_labels is None:
            raise UsageError("--cfg-scale needs a class-conditional model and a class per image")
        model = cfg_denoiser(denoiser, cfg_scale, null_class=num_classes, interval=cfg_interval)
    extra_args = {} if class_labels is None else {"class_cond": class_labels.to(device)}
    options = dict(sampler_options or {})
    if "noise_sampler" in sampler_parameters(sampler):
        options["noise_sampler"] = make_noise_sampler(sampler, seeds, shape, sigmas, device=device)
    with torch.autocast(torch.device(device).type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        images = SAMPLERS[sampler](model, noise * sigmas[0], sigmas, extra_args=extra_args, disable=True, **options)
    return images.float().clamp(-1, 1)


# The sample.py run ---------------------------------------------------------------------------------------

@dataclass
class SampleOptions:
    checkpoint: str
    seeds: list
    out_dir: str = "samples"
    sampler: str = "dpmpp_2m"
    steps: int = 50
    schedule: str = "karras"
    sigma_min: float = None
    sigma_max: float = None
    rho: float = None
    eta: float = None
    churn: float = None
    cfg_scale: float = 1.0
    cfg_interval: tuple = None
    class_label: int = None
    classes: list = None
    batch_size: int = 64
    grid: str = None  # None: no grid; "auto" or "CxR"
    ema: bool = True
    precision: str = "fp32"
    device: str = None
    progress: bool = True


def _sampler_options(options):
    """The sampler keyword arguments of --eta and --churn, refused for samplers without them."""
    names = {"eta": "eta", "churn": "s_churn"}
    chosen = {names[flag]: getattr(options, flag) for flag in names if getattr(options, flag) is not None}
    parameters = sampler_parameters(options.sampler)
    for flag, parameter in names.items():
        if parameter in chosen and parameter not in parameters:
            takers = [name for name in SAMPLERS if parameter in sampler_parameters(name)]
            raise UsageError(f"--{flag} applies to {', '.join(takers)}; not to {options.sampler}")
    return chosen


def _describe(options, sigmas_range, num_steps):
    lo, hi = sigmas_range
    if options.sampler == "dpm_adaptive":
        return f"dpm_adaptive (adaptive steps from sigma {hi:g} to {lo:g}; --steps and --schedule unused)"
    if options.sampler == "dpm_fast":
        return f"dpm_fast ({num_steps} model evaluations, steps even in log sigma from {hi:g} to {lo:g})"
    return f"{num_steps} {options.sampler} steps on the {options.schedule} schedule (sigma {hi:g} to {lo:g})"


def _read_pngs(paths):
    """PNG files written by save_images -> [N, C, H, W] in [-1, 1] that converts back to the same bytes."""
    from PIL import Image

    pixels = [np.asarray(Image.open(path)) for path in paths]
    images = torch.from_numpy(np.stack([p if p.ndim == 3 else p[..., None] for p in pixels]))
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1


def writing_into(out_dir):
    """Writes into --out-dir fail with one line (StorageError) that says what to do."""
    return reported_as_storage_error(out_dir, "free space or choose another --out-dir")


def sample_to_directory(options: SampleOptions) -> int:
    """sample.py: one PNG per seed (seedSSSSSS.png) in out_dir, and grid.png with --grid.

    Under `accelerate launch` the seeds are split between the processes, each writing its own files; the main
    process writes the grid from the files once all are done. Returns the exit code.
    """
    from accelerate import PartialState
    from tqdm.auto import tqdm

    from .images import make_grid, save_images

    if options.sampler not in SAMPLERS:
        raise UsageError(f"unknown sampler {options.sampler!r}; expected one of {', '.join(SAMPLERS)}")
    sampler_options = _sampler_options(options)
    columns, grid_count = parse_grid(options.grid, len(options.seeds)) if options.grid else (None, 0)
    # Several processes (accelerate launch) and no GPU: Accelerate needs cpu=True to pick gloo.
    state = PartialState(cpu=os.environ.get("LOCAL_RANK") is not None and not torch.cuda.is_available())
    device = torch.device(options.device) if options.device else state.device
    denoiser, config, step = load_denoiser(options.checkpoint, use_ema=options.ema, device=device)
    model_config, num_classes = config["model"], config["dataset"]["num_classes"]
    labels, classes_text = choose_classes(options.seeds, num_classes, options.class_label, options.classes)
    sigma_min = model_config["sigma_min"] if options.sigma_min is None else options.sigma_min
    sigma_max = model_config["sigma_max"] if options.sigma_max is None else options.sigma_max
    make_sigmas(options.schedule, options.steps, sigma_min, sigma_max, options.rho)  # bad values fail here, early
    if options.cfg_scale != 1 and not num_classes:
        raise UsageError("--cfg-scale needs a class-conditional model; this one is unconditional")

    state.print(f"{options.checkpoint}: step {step}, {'EMA' if options.ema else 'raw'} weights; "
                f"{len(options.seeds)} images, {_describe(options, (sigma_min, sigma_max), options.steps)}"
                + (f"; {classes_text}" if num_classes else "")
                + (f"; guidance scale {options.cfg_scale:g}" if options.cfg_scale != 1 else "")
                + (f" for sigma in [{options.cfg_interval[0]:g}, {options.cfg_interval[1]:g}]"
                   if options.cfg_scale != 1 and options.cfg_interval else "")
                + (f"; {state.num_processes} processes" if state.num_processes > 1 else ""))
    if options.cfg_scale != 1 and not config["dataset"].get("cond_dropout_rate"):
        state.print("note: this model was trained without label dropout (dataset.cond_dropout_rate = 0), so its "
                    "null class is untrained and guidance will not work well")

    out_dir = Path(options.out_dir)
    with writing_into(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
    autocast_dtype = torch.bfloat16 if options.precision == "bf16" else None
    indices = list(range(len(options.seeds)))
    with state.split_between_processes(indices) as mine:
        with tqdm(total=len(mine), unit="img", disable=not (options.progress and state.is_main_process)) as bar:
            for start in range(0, len(mine), options.batch_size):
                batch = mine[start:start + options.batch_size]
                seeds = [options.seeds[i] for i in batch]
                images = generate(denoiser, config, seeds, options.steps, None if labels is None else labels[batch],
                                  device, autocast_dtype, sampler=options.sampler, schedule=options.schedule,
                                  sigma_min=sigma_min, sigma_max=sigma_max, rho=options.rho,
                                  cfg_scale=options.cfg_scale, cfg_interval=options.cfg_interval,
                                  sampler_options=sampler_options)
                with writing_into(out_dir):
                    save_images(images, [out_dir / f"seed{s:06d}.png" for s in seeds])
                bar.update(len(seeds))
    state.wait_for_everyone()
    if options.grid and state.is_main_process:
        grid_seeds = options.seeds[:grid_count]
        with writing_into(out_dir):
            grid = make_grid(_read_pngs([out_dir / f"seed{s:06d}.png" for s in grid_seeds]), columns)
            grid.save(out_dir / "grid.png")
    state.print(f"wrote {len(options.seeds)} images to {out_dir}/" + (" and grid.png" if options.grid else ""))
    return 0
