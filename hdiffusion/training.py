"""The training loop: one optimizer step at a time, with EMA, demo grids, metrics and checkpoints.

A global batch is cut into chunks, one per (accumulation step, process). Every random number of chunk c of
optimizer step t (noise, noise levels, label dropout, dropout) comes from generators seeded by (seed, t, c), and
which images chunk c holds is a function of (t, c) alone (data.StepBatchSampler). So a run resumed from the
checkpoint of step t continues exactly as if it had never stopped, without storing RNG states; and one process
with 2 accumulation steps computes the same step as 2 processes with 1 (up to float summation order).
"""

import copy
import json
import math
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .config import load_config
from .augmentation import augment_batch
from .data import StepBatchSampler, build_dataset, describe_dataset, infinite_loader, to_unit_range
from .denoiser import Denoiser
from .ema import ema_decay, ema_update
from .errors import UsageError
from .evaluation import TrainingEvaluator, mark_best
from .flops import count_macs
from .images import make_grid
from .models import compile_blocks, make_model
from .noise import get_sigmas_karras, make_sigma_density, sample_sigmas
from .optim import make_optimizer, set_learning_rates
from .sampling import sample_dpmpp_2m

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped by a signal after saving a checkpoint; run again to resume


@dataclass
class TrainOptions:
    config: str
    name: str
    out_dir: str | None = None
    batch_size: int = 64
    grad_accum_steps: int = 1
    mixed_precision: str | None = None
    end_step: int | None = None
    save_every: int = 10000
    keep_last: int = 3
    demo_every: int = 500
    demo_steps: int = 50
    sample_n: int = 64
    evaluate_every: int = 0
    evaluate_n: int = 2000
    evaluate_with: str = "inception"
    inception_weights: str | None = None
    log_every: int = 10
    seed: int = 0
    resume: str | None = None
    lr: float | None = None
    grad_clip: float = 0.0
    num_workers: int = 4
    checkpointing: bool = False
    compile: bool = False
    log_with: tuple = ()
    wandb_project: str | None = None
    progress: bool = True

    @property
    def run_dir(self):
        return Path(self.out_dir or Path("runs") / self.name)


# Pure pieces of a step -----------------------------------------------------------------------------------

def chunk_seed(seed, step, chunk):
    """A well-mixed 63-bit seed for one (run seed, optimizer step, chunk of the global batch)."""
    return int(np.random.SeedSequence([seed, step, chunk]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def drop_labels(labels, num_classes, rate, generator):
    """Replace a fraction `rate` of labels by the null class `num_classes` (for classifier-free guidance)."""
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < rate
    return torch.where(drop, torch.full_like(labels, num_classes), labels)


def diffusion_loss(denoiser, images, labels, density, chunk, chunks, dataset_config, generator, aug_cond=None):
    """Mean loss of one chunk: noise levels stratified over all chunks of the global batch."""
    noise = torch.randn(images.shape, generator=generator, device=images.device)
    sigma = sample_sigmas(density, images.shape[0], chunk, chunks, generator=generator, device=images.device)
    cond = {} if aug_cond is None else {"aug_cond": aug_cond}
    if dataset_config["num_classes"]:
        cond["class_cond"] = drop_labels(labels, dataset_config["num_classes"], dataset_config["cond_dropout_rate"],
                                         generator)
    return denoiser.loss(images, noise, sigma, **cond).mean()


@torch.no_grad()
def sample_demo(denoiser, config, n, steps, seed, device):
    """n images from fixed noise with DPM-Solver++(2M); class-conditional models cycle through the classes."""
    model_config, num_classes = config["model"], config["dataset"]["num_classes"]
    generator = torch.Generator(device).manual_seed(seed)
    shape = (n, model_config["input_channels"], *model_config["input_size"])
    sigmas = get_sigmas_karras(steps, model_config["sigma_min"], model_config["sigma_max"], device=device)
    x = torch.randn(shape, generator=generator, device=device) * sigmas[0]
    extra_args = {"class_cond": torch.arange(n, device=device) % num_classes} if num_classes else {}
    return sample_dpmpp_2m(denoiser, x, sigmas, extra_args=extra_args, disable=True)


def weight_defining(model_config):
    """The model section without the keys that change how it runs but not its weights."""
    model_config = {k: v for k, v in model_config.items() if k != "checkpointing"}
    model_config["self_attns"] = [{k: v for k, v in attn.items() if k != "backend"} for attn in model_config["self_attns"]]
    return model_config


def model_differences(old, new, prefix="model"):
    """Keys whose weight-defining values differ between two model sections, as dotted paths."""
    old, new = weight_defining(old), weight_defining(new)
    keys = sorted(set(old) | set(new))
    return [f"{prefix}.{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def flat_config(config, prefix=""):
    """{'model.widths': '[256]', ...}: trackers (TensorBoard hparams) take only scalars and strings."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
    return flat


def drop_metrics_after(metrics_file, step):
    """On resume, forget metrics logged after the checkpoint: those steps are about to be run again."""
    if metrics_file.exists():
        lines = metrics_file.read_text().splitlines(keepends=True)
        kept = [line for line in lines if json.loads(line)["step"] <= step]
        if len(kept) != len(lines):
            ckpt.atomic_write(metrics_file, lambda tmp: Path(tmp).write_text("".join(kept)))


class SignalFlag:
    """Remembers SIGINT/SIGTERM so the loop can save and stop at the end of the current step."""

    def __init__(self):
        self.received = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name


# The loop ------------------------------------------------------------------------------------------------

def train(options: TrainOptions) -> int:
    """Train until `end_step` (or forever); returns the process exit code."""
    config = load_config(options.config)
    if options.lr is not None:
        config["optimizer"]["lr"] = options.lr
    run_dir = options.run_dir
    # Several processes (torchrun / accelerate launch) and no GPU: Accelerate needs cpu=True to pick gloo.
    multi_cpu = os.environ.get("LOCAL_RANK") is not None and not torch.cuda.is_available()
    accelerator = Accelerator(cpu=multi_cpu, mixed_precision=options.mixed_precision,
                              log_with=list(options.log_with) or None, project_dir=str(run_dir))
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    model_config, dataset_config = config["model"], config["dataset"]

    # Resume: an explicit --resume, else the run folder's latest checkpoint, else a fresh start.
    resume_path = options.resume or ckpt.latest_checkpoint(run_dir)
    state = ckpt.load_checkpoint(resume_path) if resume_path else None
    if state is not None:
        differences = model_differences(state.info["config"]["model"], model_config)
        if differences:
            raise UsageError(f"{state.path}: the checkpoint's model differs from {options.config}: "
                             + "; ".join(differences))

    # Data first: bad data should fail before any model is built.
    dataset = build_dataset(config, Path(options.config).parent, options.num_workers,
                            progress=accelerator.is_main_process and options.progress)
    start_step = state.info["step"] if state else 0
    sampler = StepBatchSampler(len(dataset), options.batch_size, options.grad_accum_steps, world, rank,
                               options.seed, start_step)
    batches = infinite_loader(dataset, sampler, options.num_workers)
    evaluator = None
    if options.evaluate_every:  # the feature extractor, and the dataset's statistics (cached on disk)
        evaluator = TrainingEvaluator(accelerator, config, dataset, options.evaluate_with, options.evaluate_n,
                                      options.seed, options.demo_steps, sampler.micro_batch,
                                      options.inception_weights, options.num_workers, options.progress)

    # Model, EMA, optimizer.
    torch.manual_seed(options.seed)
    model = make_model(model_config, dataset_config["num_classes"])
    model.checkpointing = options.checkpointing or model_config.get("checkpointing", False)
    ema_model = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer_config = config["optimizer"]
    param_groups = model.param_groups(optimizer_config["lr"], optimizer_config["weight_decay"],
                                      optimizer_config["mapping_lr_scale"])
    base_lrs = [group["lr"] for group in param_groups]
    optimizer = make_optimizer(optimizer_config, param_groups)
    if state is not None:
        model.load_state_dict(state.model)
        ema_model.load_state_dict(state.ema)
        optimizer.load_state_dict(state.optimizer)

    params = sum(p.numel() for p in model.parameters())
    gmac = count_macs(model, (model_config["input_channels"], *model_config["input_size"])) / 1e9
    accelerator.print(json.dumps(config, indent=1))
    accelerator.print(f"model: {params:,} parameters, {gmac:.3f} GMAC per image (one forward)")
    accelerator.print(f"{world} process(es) on {device}, mixed precision {accelerator.mixed_precision}, "
                      f"global batch {options.batch_size} = {world} x {options.grad_accum_steps} x "
                      f"{sampler.micro_batch}, {len(dataset):,} images")
    accelerator.print(f"data: {describe_dataset(dataset)}")
    if model_config["augment_prob"] > 0 and dataset_config["random_flip"]:
        accelerator.print("note: dataset.random_flip is off while model.augment_prob > 0: the augmentation's "
                          "x-flip, given to the model, replaces it")
    if state is not None:
        accelerator.print(f"resuming from {state.path} at step {start_step}")

    inner_model = model
    model, optimizer = accelerator.prepare(model, optimizer)
    if options.compile:
        compile_blocks(inner_model)  # in place, so the DDP wrapper runs the compiled layers
    ema_model.to(device)
    denoiser_args = dict(sigma_data=model_config["sigma_data"], weighting=model_config["loss_weighting"],
                         soft_min_snr_gamma=model_config["soft_min_snr_gamma"])
    denoiser = Denoiser(model, **denoiser_args)
    ema_denoiser = Denoiser(ema_model, **denoiser_args)
    density = make_sigma_density(model_config["sigma_sample_density"], model_config["sigma_data"])

    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if dataset.class_names:  # label i is class_names[i]
            (run_dir / "classes.json").write_text(json.dumps(dataset.class_names, indent=1) + "\n")
        if options.log_with:
            accelerator.init_trackers(options.wandb_project or options.name, config=flat_config(config))
    metrics_file = run_dir / "metrics.jsonl"
    if accelerator.is_main_process:
        drop_metrics_after(metrics_file, start_step)
    info = {"config": config, "options": asdict(options)}

    saved_step = start_step

    def save(step):
        nonlocal saved_step
        if step == saved_step:  # already saved: a new best FID saves its step before the regular save
            return
        saved_step = step
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            path = ckpt.save_checkpoint(run_dir, step, inner_model.state_dict(), ema_model.state_dict(),
                                        optimizer.state_dict(), info, options.keep_last)
            ckpt.save_inference_file(run_dir / "ema.safetensors", ema_model.state_dict(), config, step)
            tqdm.write(f"saved {path}")
        accelerator.wait_for_everyone()

    def demo(step):
        if accelerator.is_main_process:
            with accelerator.autocast():
                images = sample_demo(ema_denoiser, config, options.sample_n, options.demo_steps, options.seed, device)
            columns = dataset_config["num_classes"] or None
            make_grid(images, columns=columns).save(run_dir / f"demo_{step:08d}.png")

    def evaluate(step):
        start = time.perf_counter()
        scores, is_best = evaluator.evaluate(ema_denoiser, metrics_file)  # every process samples its share
        if accelerator.is_main_process:
            with open(metrics_file, "a") as f:
                f.write(json.dumps({"step": step, "kimg": step * options.batch_size / 1000, **scores}) + "\n")
            progress.set_description(evaluator.describe(scores))
            tqdm.write(f"step {step}: {evaluator.describe(scores)}{' (best so far)' if is_best else ''} "
                       f"in {time.perf_counter() - start:.1f} s")
        accelerator.log(scores, step=step)
        if is_best:  # keep this step's checkpoint as checkpoints/best, which --keep-last spares
            save(step)
            if accelerator.is_main_process:
                mark_best(run_dir, step)

    end_step = options.end_step if options.end_step is not None else math.inf
    if start_step >= end_step:
        accelerator.print(f"already at step {start_step} >= --end-step {end_step}; nothing to do")
        return 0
    stop = SignalFlag()
    chunks = world * options.grad_accum_steps
    progress = tqdm(initial=start_step, total=None if end_step == math.inf else end_step, unit="step",
                    disable=not (accelerator.is_main_process and options.progress), dynamic_ncols=True)
    step, loss_total, loss_count, images_since, timer = start_step, 0.0, 0, 0, time.perf_counter()
    model.train()
    while step < end_step:
        # One optimizer step over grad_accum_steps micro-batches.
        lr = set_learning_rates(optimizer, base_lrs, step, config["lr_sched"])
        for accum in range(options.grad_accum_steps):
            images, labels = (t.to(device, non_blocking=True) for t in next(batches))
            chunk = accum * world + rank  # the order StepBatchSampler cuts the global batch in
            seed = chunk_seed(options.seed, step, chunk)
            torch.manual_seed(seed)  # dropout
            generator = torch.Generator(device).manual_seed(seed)
            images, aug_cond = augment_batch(to_unit_range(images), model_config["augment_prob"],
                                             dataset_config["random_flip"], generator)
            last = accum == options.grad_accum_steps - 1
            with nullcontext() if last else accelerator.no_sync(model):
                loss = diffusion_loss(denoiser, images, labels, density, chunk, chunks, dataset_config, generator,
                                      aug_cond)
                accelerator.backward(loss / options.grad_accum_steps)
            loss_total += loss.detach()
            loss_count += 1
        if options.grad_clip > 0:
            accelerator.clip_grad_norm_(model.parameters(), options.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        decay = ema_decay(step, config["ema_sched"])
        ema_update(ema_model, inner_model, decay)
        step += 1
        images_since += options.batch_size
        progress.update(1)

        if step % options.log_every == 0 or step == end_step:
            loss_mean = accelerator.reduce(torch.as_tensor(loss_total / loss_count, device=device), "mean").item()
            elapsed = time.perf_counter() - timer
            record = {"step": step, "kimg": step * options.batch_size / 1000, "loss": loss_mean, "lr": lr,
                      "ema_decay": decay, "img_per_s": images_since / elapsed}
            if accelerator.is_main_process:
                with open(metrics_file, "a") as f:
                    f.write(json.dumps(record) + "\n")
                progress.set_postfix(loss=f"{loss_mean:.4f}", img_s=f"{record['img_per_s']:.1f}", lr=f"{lr:.2e}")
            accelerator.log(record, step=step)
            loss_total, loss_count, images_since, timer = 0.0, 0, 0, time.perf_counter()

        if options.demo_every and step % options.demo_every == 0:
            demo(step)
        if evaluator is not None and step % options.evaluate_every == 0:
            evaluate(step)
        stopping = stop.received is not None
        if world > 1:  # every process must agree to stop at the same step
            stopping = accelerator.reduce(torch.tensor(float(stopping), device=device), "sum").item() > 0
        if stopping or step % options.save_every == 0 or step == end_step:
            save(step)
        if stopping:
            progress.close()
            accelerator.print(f"received {stop.received or 'a stop signal'}: saved step {step}; "
                              f"run the same command again to resume")
            accelerator.end_training()
            return PREEMPTED_EXIT_CODE
    progress.close()
    accelerator.end_training()
    return 0
