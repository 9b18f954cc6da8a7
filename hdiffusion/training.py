"""The training loop: one optimizer step at a time, with EMA, demo grids, metrics and checkpoints.

A global batch is cut into chunks, one per (accumulation step, process). Every random number of chunk c of
optimizer step t (noise, noise levels, label dropout, dropout) comes from generators seeded by (seed, t, c), and
which images chunk c holds is a function of (t, c) alone (data.StepBatchSampler). So a run resumed from the
checkpoint of step t continues exactly as if it had never stopped, without storing RNG states; and one process
with 2 accumulation steps computes the same step as 2 processes with 1 (bitwise on CPU, tested).

A step whose loss or gradients are not finite is skipped by every process alike and counted; too many in a row
stop the run (DivergedError). A signal saves and stops at the end of the next step (the processes agree on it one
step late, so that the host never waits for the GPU: StepGuard); a failed write stops with the last checkpoint
intact (StorageError). Exit codes: errors.py.
"""

import copy
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .config import load_config
from .augmentation import augment_batch
from .data import StepBatchSampler, build_dataset, describe_dataset, infinite_loader, to_unit_range
from .denoiser import Denoiser
from .ema import ema_decay, ema_update, local
from .errors import PREEMPTED_EXIT_CODE, DivergedError, StorageError, UsageError, reported_as_storage_error
from .evaluation import TrainingEvaluator, mark_best
from .flops import count_macs
from .images import make_grid
from .models import compile_blocks, make_model
from .noise import get_sigmas_karras, make_sigma_density, sample_sigmas
from .optim import make_optimizer, set_learning_rates
from .sampling import sample_dpmpp_2m
from .sharding import gradient_sync, load_optimizer_state, model_state, optimizer_state, shard_model

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
    max_nonfinite_steps: int = 10
    deterministic: bool = False
    fsdp: bool = False

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
    if "self_attns" in model_config:  # HDiT; other model types have no attention backend key
        model_config["self_attns"] = [{k: v for k, v in attn.items() if k != "backend"}
                                      for attn in model_config["self_attns"]]
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


def _metrics_step(line):
    try:
        return json.loads(line)["step"] if line.endswith("\n") else None
    except (ValueError, TypeError, KeyError):
        return None


def drop_metrics_after(metrics_file, step):
    """On resume, forget metrics logged after the checkpoint (those steps are about to be run again), and a last
    line cut short by a kill or a full disk."""
    if metrics_file.exists():
        lines = metrics_file.read_text().splitlines(keepends=True)
        kept = [line for line in lines if (_metrics_step(line) is not None and _metrics_step(line) <= step)]
        if len(kept) != len(lines):
            ckpt.atomic_write(metrics_file, lambda tmp: Path(tmp).write_text("".join(kept)))


def append_metrics(metrics_file, record):
    with open(metrics_file, "a") as f:
        f.write(json.dumps(record) + "\n")


class SignalFlag:
    """Remembers SIGINT/SIGTERM so the loop can save and stop at the end of the current step; a second signal
    stops at once (as a kill would: the last checkpoint stays intact). Restores the previous handlers on exit."""

    def __enter__(self):
        self.received = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc_info):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.received is not None:
            self.__exit__()
            signal.raise_signal(signum)
        self.received = signal.Signals(signum).name


def any_process(accelerator, flag):
    """True on every process if `flag` is true on any of them."""
    if accelerator.num_processes == 1:
        return bool(flag)
    return accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), "sum").item() > 0


class StepGuard:
    """Skips the optimizer steps whose loss or gradients are not finite, and lets the processes agree on stopping,
    without making the host wait for the GPU at every step.

    Whether a step is finite stays a tensor on the device: the fused optimizer takes it as found_inf, as it would
    from a gradient scaler, and leaves the weights and its state as they were; the counts of skipped steps are
    tensors too. The host reads them, with the processes' agreement on a stop request, one step late (`exchange`),
    when the GPU has finished that step: it never waits for the step it has just queued, so the GPU never idles
    while the host prepares the next one.
    """

    def __init__(self, accelerator, in_a_row=0, total=0):
        self.accelerator, self.device = accelerator, accelerator.device
        self.in_a_row = torch.tensor(in_a_row, device=self.device)
        self.total = torch.tensor(total, device=self.device)
        self.pending = None

    def check(self, step_loss, model, check_gradients):
        """A 0-d bool tensor: the step's loss is finite on every process, and so are its gradients (all-reduced,
        the same everywhere; under fp16 their overflows are the gradient scaler's to skip). Counts it."""
        finite = torch.isfinite(step_loss)
        # This process's gradients (of a sharded model, its shards, some empty): the reduce below makes it global.
        grads = [g for g in (local(p.grad) for p in model.parameters() if p.grad is not None) if g.numel()]
        if check_gradients and grads:
            finite &= torch.isfinite(torch.nn.utils.get_total_norm(grads, float("inf")))  # max |g|: NaN, inf stay
        if self.accelerator.num_processes > 1:
            finite = self.accelerator.reduce(finite.float(), "sum") == self.accelerator.num_processes
        self.in_a_row = torch.where(finite, 0, self.in_a_row + 1)
        self.total = self.total + (~finite).long()
        return finite

    def exchange(self, stop_requested):
        """Queue this step's state and return the previous step's, read now: (a stop requested on any process,
        non-finite steps in a row, non-finite steps in all), or None at the first step of the run."""
        flag = torch.full((), float(stop_requested), device=self.device)  # a fill, not a host-to-device copy
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, "sum")
        state = torch.stack([flag, self.in_a_row.float(), self.total.float()])
        previous, self.pending = self.pending, self.copy_to_host(state)
        if previous is None:
            return None
        state, copied = previous
        if copied is not None:
            copied.synchronize()
        stop, in_a_row, total = state.tolist()
        return stop > 0, int(in_a_row), int(total)

    @staticmethod
    def copy_to_host(state):
        """(state in host memory, a CUDA event marking the copy done or None off CUDA). The copy is queued behind
        this step's work; reading it later through its event waits for this step only. A plain read (tolist) at
        the next step would wait for everything queued by then, that next step included, leaving the GPU idle
        while the host prepares the step after it (in128_E on H200s: the host waited there 10 ms of each ~100 ms
        step on one GPU and 19 ms on two, on average)."""
        if state.device.type != "cuda":
            return state, None
        copy = state.to("cpu", non_blocking=True)  # into page-locked memory: asynchronous
        copied = torch.cuda.Event()
        copied.record()
        return copy, copied


def settle_collectives(accelerator):
    """A barrier, and under gloo a pause, before train() returns or raises.

    Under gloo a worker thread frees a finished collective's tensors after the call has returned, and needs the GIL
    to do so; if the process group is destroyed (with the DDP model) before then, its destructor waits for that
    thread while holding the GIL: a deadlock at exit. The barrier releases the GIL until every earlier collective
    is done, but the worker can still be freeing the barrier's own work (which holds the earlier ones) when it
    returns: the pause lets it finish. Measured with a 2-process script shaped like the loop's end: 6 hangs in 30
    runs with neither, 0 in 60 with both (also with two such runs at once on two cores)."""
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1 and torch.distributed.get_backend() == "gloo":
        time.sleep(0.1)


def step_unless(optimizer, finite):
    """optimizer.step(), which leaves the weights and its state as they are where `finite` is false.

    accelerate's wrapper holds the torch optimizer; a gradient scaler (fp16) sets found_inf itself."""
    inner = getattr(optimizer, "optimizer", optimizer)
    inner.found_inf = (~finite).float()
    optimizer.step()


def writing_into(run_dir):
    """Writes into the run folder fail with one line (StorageError) that says which checkpoint is intact."""

    def advice():
        try:
            latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / ckpt.LATEST).read_text().strip()
            intact = f"the last checkpoint, {latest}, is intact"
        except OSError:
            intact = "no checkpoint was written yet"
        return f"{intact}. Free space or make the folder writable, then run the same command again to resume"

    return reported_as_storage_error(run_dir, advice)


def layout_change_note(info, options, world):
    """A note when a run resumes with another global batch, or another number of chunks per step."""
    before = info["options"]
    if before["batch_size"] != options.batch_size:
        return (f"note: --batch-size {options.batch_size} differs from the checkpoint's {before['batch_size']}: "
                f"step t now takes the images at positions t x {options.batch_size} onwards of the data order")
    chunks_before, chunks = info["processes"] * before["grad_accum_steps"], world * options.grad_accum_steps
    if chunks_before != chunks:
        return (f"note: {world} process(es) x {options.grad_accum_steps} accumulation step(s) = {chunks} chunks per "
                f"step, the checkpoint's run had {chunks_before}: the same images every step, but noise is drawn "
                f"per chunk, so the run continues deterministically, not bit for bit as before")
    return None


def make_deterministic():
    """Bitwise-reproducible kernels where PyTorch has them (CPU kernels already are); others warn."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


# The loop ------------------------------------------------------------------------------------------------

def train(options: TrainOptions) -> int:
    """Train until `end_step` (or forever); returns the process exit code, or raises a RunError (errors.py)."""
    config = load_config(options.config)
    if options.lr is not None:
        config["optimizer"]["lr"] = options.lr
    if options.deterministic:
        make_deterministic()
    run_dir = options.run_dir
    # Several processes (torchrun / accelerate launch) and no GPU: Accelerate needs cpu=True to pick gloo.
    multi_cpu = os.environ.get("LOCAL_RANK") is not None and not torch.cuda.is_available()
    # DDP would broadcast the model's buffers from process 0 before every forward, a collective that makes each GPU
    # wait for the other processes' hosts; the buffers here are constants (Fourier features, RoPE frequencies),
    # equal on every process from the start (DDP syncs them once when it wraps the model).
    constant_buffers = DistributedDataParallelKwargs(broadcast_buffers=False)
    accelerator = Accelerator(cpu=multi_cpu, mixed_precision=options.mixed_precision,
                              kwargs_handlers=[constant_buffers], log_with=list(options.log_with) or None,
                              project_dir=str(run_dir))
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    if accelerator.distributed_type == DistributedType.FSDP:
        raise UsageError("accelerate's FSDP (--use_fsdp or an accelerate config with FSDP) is not used by train.py: "
                         "launch without it and pass --fsdp, which shards the model block by block")
    if options.fsdp and not torch.distributed.is_initialized():
        raise UsageError("--fsdp shards the model over the processes of a distributed launch (accelerate launch "
                         "--num_processes N with N >= 2, or torchrun); this is one process")
    if options.fsdp and accelerator.mixed_precision == "fp16":
        raise UsageError("--fsdp trains with --mixed-precision bf16 or no, not fp16 (its gradient scaler would "
                         "decide to skip a step on each process's shard alone)")
    model_config, dataset_config = config["model"], config["dataset"]

    # Resume: a checkpoint file named by --resume (used as it is, or refused), else the newest intact checkpoint
    # of the --resume folder or of the run folder, else a fresh start.
    if options.resume and not Path(options.resume).is_dir():
        state = ckpt.load_checkpoint(options.resume)
    else:
        state = ckpt.load_newest_intact(options.resume or run_dir, warn=accelerator.print)
        if state is None and options.resume:
            raise UsageError(f"{options.resume}: no checkpoint in this folder (expected checkpoints/{ckpt.LATEST})")
    if state is not None:
        stored = state.info["config"]
        differences = model_differences(stored["model"], model_config)
        if stored["dataset"]["num_classes"] != dataset_config["num_classes"]:  # the class embedding's size
            differences.append(f"dataset.num_classes: {stored['dataset']['num_classes']} -> "
                               f"{dataset_config['num_classes']}")
        if differences:
            raise UsageError(f"{state.path}: the checkpoint's model differs from {options.config}: "
                             + "; ".join(differences))

    # Data first: bad data should fail before any model is built.
    dataset = build_dataset(config, Path(options.config).parent, options.num_workers,
                            progress=accelerator.is_main_process and options.progress)
    start_step = state.info["step"] if state else 0
    sampler = StepBatchSampler(len(dataset), options.batch_size, options.grad_accum_steps, world, rank,
                               options.seed, start_step)
    batches = infinite_loader(dataset, sampler, options.num_workers, pin_memory=device.type == "cuda")
    evaluator = None
    if options.evaluate_every:  # the feature extractor, and the dataset's statistics (cached on disk)
        evaluator = TrainingEvaluator(accelerator, config, dataset, options.evaluate_with, options.evaluate_n,
                                      options.seed, options.demo_steps, sampler.micro_batch,
                                      options.inception_weights, options.num_workers, options.progress)

    # Model and EMA (sharded under --fsdp), then the optimizer over the parameters as they will be trained.
    torch.manual_seed(options.seed)
    model = make_model(model_config, dataset_config["num_classes"])
    model.checkpointing = options.checkpointing or model_config.get("checkpointing", False)
    ema_model = copy.deepcopy(model).requires_grad_(False).eval()
    params = sum(p.numel() for p in model.parameters())
    gmac = count_macs(model, (model_config["input_channels"], *model_config["input_size"])) / 1e9

    def does_not_fit(error):  # a config difference model_differences missed
        return UsageError(f"{state.path}: its weights do not fit the model of {options.config} "
                          f"({str(error).strip().splitlines()[0]})")

    if state is not None:
        try:
            model.load_state_dict(state.model)
            ema_model.load_state_dict(state.ema)
        except (RuntimeError, ValueError, KeyError) as error:
            raise does_not_fit(error) from None
    if options.fsdp:
        shard_model(model, device)
        shard_model(ema_model, device)
    optimizer_config = config["optimizer"]
    param_groups = model.param_groups(optimizer_config["lr"], optimizer_config["weight_decay"],
                                      optimizer_config["mapping_lr_scale"])
    base_lrs = [group["lr"] for group in param_groups]
    optimizer = make_optimizer(optimizer_config, param_groups)
    if state is not None:
        try:
            load_optimizer_state(model, optimizer, state.optimizer)
        except (RuntimeError, ValueError, KeyError) as error:
            raise does_not_fit(error) from None
    accelerator.print(json.dumps(config, indent=1))
    accelerator.print(f"model: {params:,} parameters, {gmac:.3f} GMAC per image (one forward)")
    accelerator.print(f"{world} process(es) on {device}{', sharded (FSDP)' if options.fsdp else ''}, mixed "
                      f"precision {accelerator.mixed_precision}, global batch {options.batch_size} = {world} x "
                      f"{options.grad_accum_steps} x {sampler.micro_batch}, {len(dataset):,} images")
    accelerator.print(f"data: {describe_dataset(dataset)}")
    if model_config["augment_prob"] > 0 and dataset_config["random_flip"]:
        accelerator.print("note: dataset.random_flip is off while model.augment_prob > 0: the augmentation's "
                          "x-flip, given to the model, replaces it")
    if state is not None:
        accelerator.print(f"resuming from {state.path} at step {start_step}")
        note = layout_change_note(state.info, options, world)
        if note:
            accelerator.print(note)

    inner_model = model
    if options.fsdp:  # sharded already; the loss runs under accelerator.autocast() below
        optimizer = accelerator.prepare(optimizer)
    else:
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
        with writing_into(run_dir):
            run_dir.mkdir(parents=True, exist_ok=True)
            removed = ckpt.remove_temporary_files(run_dir) + ckpt.remove_temporary_files(run_dir / "checkpoints")
            if removed:
                accelerator.print(f"removed {len(removed)} temporary file(s) of an interrupted write: "
                                  f"{', '.join(removed)}")
            (run_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            if dataset.class_names:  # label i is class_names[i]
                (run_dir / "classes.json").write_text(json.dumps(dataset.class_names, indent=1) + "\n")
        if options.log_with:
            accelerator.init_trackers(options.wandb_project or options.name, config=flat_config(config))
    metrics_file = run_dir / "metrics.jsonl"
    if accelerator.is_main_process:
        with writing_into(run_dir):
            drop_metrics_after(metrics_file, start_step)
    info = {"config": config, "options": asdict(options), "processes": world}

    # Non-finite steps are skipped and counted; the counts are saved, so a resumed run stops where the original
    # would have.
    guard = StepGuard(accelerator, *(state.info.get(key, 0) if state else 0
                                     for key in ("nonfinite_in_a_row", "nonfinite_total")))
    saved_step, last_checkpoint = start_step, state.path if state else None

    def save(step):
        nonlocal saved_step, last_checkpoint
        if step == saved_step:  # already saved: a new best FID saves its step before the regular save
            return
        accelerator.wait_for_everyone()
        failure = None
        # Full tensors; under --fsdp gathered onto the main process, which every process takes part in.
        states = model_state(inner_model), model_state(ema_model), optimizer_state(inner_model, optimizer)
        if accelerator.is_main_process:
            counts = {"nonfinite_in_a_row": int(guard.in_a_row), "nonfinite_total": int(guard.total)}
            model_weights, ema_weights, optimizer_weights = states
            try:
                with writing_into(run_dir):
                    ckpt.save_checkpoint(run_dir, step, model_weights, ema_weights, optimizer_weights,
                                         dict(info, **counts), options.keep_last)
                    ckpt.save_inference_file(run_dir / "ema.safetensors", ema_weights, config, step)
            except StorageError as error:
                failure = error
        if any_process(accelerator, failure is not None):  # every process stops, not only the writer
            raise failure or StorageError("the main process could not save a checkpoint (its message says why)")
        saved_step, last_checkpoint = step, run_dir / "checkpoints" / f"step_{step:08d}.safetensors"
        if accelerator.is_main_process:
            tqdm.write(f"saved {last_checkpoint}")
        accelerator.wait_for_everyone()

    def demo(step):
        if accelerator.is_main_process or options.fsdp:  # a sharded model runs on every process together
            with accelerator.autocast():
                images = sample_demo(ema_denoiser, config, options.sample_n, options.demo_steps, options.seed, device)
        if accelerator.is_main_process:
            columns = dataset_config["num_classes"] or None
            with writing_into(run_dir):
                make_grid(images, columns=columns).save(run_dir / f"demo_{step:08d}.png")

    def evaluate(step):
        start = time.perf_counter()
        scores, is_best = evaluator.evaluate(ema_denoiser, metrics_file)  # every process samples its share
        if accelerator.is_main_process:
            with writing_into(run_dir):
                append_metrics(metrics_file, {"step": step, "kimg": step * options.batch_size / 1000, **scores})
            progress.set_description(evaluator.describe(scores))
            tqdm.write(f"step {step}: {evaluator.describe(scores)}{' (best so far)' if is_best else ''} "
                       f"in {time.perf_counter() - start:.1f} s")
        accelerator.log(scores, step=step)
        if is_best:  # keep this step's checkpoint as checkpoints/best, which --keep-last spares
            save(step)
            if accelerator.is_main_process:
                with writing_into(run_dir):
                    mark_best(run_dir, step)

    end_step = options.end_step if options.end_step is not None else math.inf
    if start_step >= end_step:
        accelerator.print(f"already at step {start_step} >= --end-step {end_step}; nothing to do")
        return 0
    chunks = world * options.grad_accum_steps
    check_gradients = accelerator.mixed_precision != "fp16"
    progress = tqdm(initial=start_step, total=None if end_step == math.inf else end_step, unit="step",
                    disable=not (accelerator.is_main_process and options.progress), dynamic_ncols=True)
    step, images_since, timer = start_step, 0, time.perf_counter()
    loss_total, loss_count = torch.zeros((), device=device), torch.zeros((), dtype=torch.long, device=device)
    reported_nonfinite = int(guard.total)
    model.train()
    with SignalFlag() as stop, progress:
        while step < end_step:
            # One optimizer step over grad_accum_steps micro-batches.
            lr = set_learning_rates(optimizer, base_lrs, step, config["lr_sched"])
            step_loss = torch.zeros((), device=device)
            for accum in range(options.grad_accum_steps):
                images, labels = (t.to(device, non_blocking=True) for t in next(batches))
                chunk = accum * world + rank  # the order StepBatchSampler cuts the global batch in
                seed = chunk_seed(options.seed, step, chunk)
                torch.manual_seed(seed)  # dropout
                generator = torch.Generator(device).manual_seed(seed)
                images, aug_cond = augment_batch(to_unit_range(images), model_config["augment_prob"],
                                                 dataset_config["random_flip"], generator)
                last = accum == options.grad_accum_steps - 1
                with gradient_sync(accelerator, model, sync=last):
                    with accelerator.autocast():
                        loss = diffusion_loss(denoiser, images, labels, density, chunk, chunks, dataset_config,
                                              generator, aug_cond)
                    accelerator.backward(loss / options.grad_accum_steps)
                step_loss += loss.detach()

            # Apply it, or skip it (every process alike, decided on the device) when its loss or gradients are
            # not finite.
            decay = ema_decay(step, config["ema_sched"])
            finite = guard.check(step_loss, model, check_gradients)
            if options.grad_clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), options.grad_clip)
            step_unless(optimizer, finite)
            ema_update(ema_model, inner_model, decay, apply=finite)
            loss_total, loss_count = loss_total + torch.where(finite, step_loss, 0), loss_count + finite
            optimizer.zero_grad(set_to_none=True)
            step += 1
            images_since += options.batch_size
            progress.update(1)
            status = guard.exchange(stop.received is not None)  # the previous step's, read now: see StepGuard
            stopping, in_a_row, nonfinite_total = status or (False, 0, reported_nonfinite)
            if nonfinite_total > reported_nonfinite and accelerator.is_main_process:
                tqdm.write(f"step {step - 1}: non-finite loss or gradients; skipped ({in_a_row} in a row, "
                           f"{nonfinite_total} in all)")
            reported_nonfinite = nonfinite_total
            if in_a_row >= options.max_nonfinite_steps:  # before this step is logged or saved: it is discarded
                last_bad = step - 1  # the status is one step late
                settle_collectives(accelerator)
                raise DivergedError(
                    f"step {last_bad}: the loss or the gradients were non-finite in {in_a_row} steps in a row "
                    f"(steps {last_bad - in_a_row + 1} to {last_bad}, all skipped; --max-nonfinite-steps "
                    f"{options.max_nonfinite_steps}); the last good checkpoint is "
                    + (f"{last_checkpoint}: resume from it with a lower --lr, or check the data" if last_checkpoint
                       else "none: no checkpoint was saved yet; lower --lr, or check the data"))

            if step % options.log_every == 0 or step == end_step:
                count = int(loss_count)  # when 0, every step since the last line was skipped
                loss_mean = accelerator.reduce(loss_total / max(count, 1), "mean").item() / options.grad_accum_steps
                elapsed = time.perf_counter() - timer
                record = {"step": step, "kimg": step * options.batch_size / 1000, "loss": loss_mean if count else None,
                          "lr": lr, "ema_decay": decay, "img_per_s": images_since / elapsed,
                          "nonfinite_steps": int(guard.total)}
                if device.type == "cuda":  # this process's peak since the start (a counter on the host: no sync)
                    record["max_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                if accelerator.is_main_process:
                    with writing_into(run_dir):
                        append_metrics(metrics_file, record)
                    progress.set_postfix(loss=f"{loss_mean:.4f}" if count else "-",
                                         img_s=f"{record['img_per_s']:.1f}", lr=f"{lr:.2e}")
                accelerator.log({k: v for k, v in record.items() if v is not None}, step=step)
                loss_total, loss_count = torch.zeros_like(loss_total), torch.zeros_like(loss_count)
                images_since, timer = 0, time.perf_counter()

            if options.demo_every and step % options.demo_every == 0:
                demo(step)
            if evaluator is not None and step % options.evaluate_every == 0:
                evaluate(step)
            if stopping or step % options.save_every == 0 or step == end_step:
                save(step)
            if stopping:
                accelerator.print(f"received {stop.received or 'a stop signal'}: saved step {step}; "
                                  f"run the same command again to resume")
                accelerator.end_training()
                return PREEMPTED_EXIT_CODE
    status = guard.exchange(False)  # the last step's, so that its skip is reported too
    if status and status[2] > reported_nonfinite and accelerator.is_main_process:
        tqdm.write(f"step {step}: non-finite loss or gradients; skipped ({status[1]} in a row, {status[2]} in all)")
    settle_collectives(accelerator)
    accelerator.end_training()
    return 0
