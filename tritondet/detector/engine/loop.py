"""The training loop: :func:`train` runs a :class:`~.train_config.TrainConfig` step after step of its schedule.

Shape shorthand: B images per batch and process, each ``[3, H_i, W_i]``.

``tritondet train`` (no arguments) runs :func:`train` with :class:`TrainConfig`'s defaults: it generates
the synthetic data set if missing, trains the CPU-friendly ``lite`` model (a narrow ResNet-like
backbone with an FPN, trained from scratch: no pretrained weights are ever downloaded), evaluates
on the val split with COCO AP and prints the table.

The recipe (Faster R-CNN paper Section 3.3 / torchvision's reference scripts): SGD, momentum 0.9,
weight decay 1e-4, a linear warm-up over ``warmup_iters`` from ``warmup_factor * lr``, then the learning
rate times ``gamma`` at each of ``lr_steps`` (fractions of the run). The run's progress is the larger of
``iteration / iterations`` and the elapsed fraction of the ``max_minutes`` budget, so a run cut short
by its budget still decays its learning rate before it stops. Gradients are clipped to
``clip_grad_norm``; on CUDA the forward pass runs under bf16 autocast (``amp``).

Outputs in ``output_dir``: ``checkpoint_<iteration>.pt`` every ``checkpoint_every`` iterations (joint
schedule) and ``last.pt`` (model, optimizer, iteration, elapsed time, random states, configs),
``log.csv`` (one row per ``log_every`` iterations, naming the schedule's step; the loss terms a step
does not train are empty), TensorBoard events when ``tensorboard`` is installed, ``loss_curves.png``,
``detections.png`` (a few val images with their detections), ``metrics.json``.

With ``masks`` (``tritondet train --masks``) the preset gets a mask branch
(:func:`~tritondet.detector.config.with_masks`): a :class:`~tritondet.detector.mask_rcnn.MaskRCNN`
trained on the data's instance masks with ``loss_mask`` as a fifth term (logged in ``log.csv``) and
evaluated with box and mask (segm) AP.

Schedules (``schedule``): ``"joint"`` (the default) trains everything at once on the sum of the four
losses (the paper's approximate joint training). ``"alternating"`` is the paper's 4-step alternating
training (Section 3.2), each step a training of its own (fresh SGD, warm-up and step decay over the
step) on :meth:`FasterRCNN.partial_losses <tritondet.detector.faster_rcnn.FasterRCNN.partial_losses>`:

1. ``rpn``: the backbone and the RPN, on the RPN's losses.
2. ``detector``: a separate detector (its own backbone, from the same initial weights) and its RoI
   head, on the RoI head's losses for step 1's proposals (step 1's model frozen, no gradients).
3. ``rpn_shared``: step 2's backbone frozen (the shared convolutions: no gradients, batch norm in eval
   mode), the RPN initialized from step 1's; only the RPN's own layers are fine-tuned.
4. ``detector_shared``: the shared convolutions still frozen, only the RoI head is fine-tuned, on the
   proposals of step 3's RPN.

The final model - step 2's backbone, step 3's RPN, step 4's RoI head - is saved as ``last.pt``, a
normal checkpoint; each step's model as ``step<k>.pt``. The budget is split by ``alternating_split``
(default 0.35, 0.35, 0.15, 0.15: steps 1 and 2 train a backbone from scratch, steps 3 and 4 only
fine-tune heads): step k runs ``round(iterations * split_k / sum(split))`` iterations and gets the
share ``split_k / sum(split_k..4)`` of the time left when it starts (a step ending early leaves more
to the next). The time left excludes the evaluation's reserve, re-estimated from the current step's
speed as in joint training: slow steps 1 and 2 reserve more, so the faster frozen-backbone steps 3
and 4 can end up with more than their share. Frozen RPNs propose with their test settings
(``post_nms_top_n[1]``), as the final model does. The alternating schedule runs in one process and
does not resume.

Multi-process: launched by ``torchrun --nproc_per_node N -m tritondet.cli train ...`` the run uses
``DistributedDataParallel`` (NCCL on CUDA, gloo on CPU), a ``DistributedSampler`` per rank (the
batch size is per process), logs and checkpoints on rank 0 only, and evaluates every rank's share of
the val split, gathered with :func:`~tritondet.detector.evaluate.gather_predictions`.

Speed on a CPU: the intra-op thread count is the faster of 1 and torch's default, timed on the training
iterations themselves and re-timed every two minutes (:class:`~.threads.ThreadChooser`; ``threads`` fixes
it), the convolutions run on channels-last maps, the SGD step and the gradient clipping are foreach
(fused) updates, and decoded training images stay in memory up to ``image_cache_mb``.

Reproducibility: ``seed`` fixes the model's initialization, the data order, the flips and the
detector's anchor/RoI sampling (rank r samples with ``seed + r``), so a CPU run with a fixed
``threads`` repeats exactly (the timed choice may differ between runs, and a different thread count
can change the order of floating-point sums). Resuming from a checkpoint taken at an epoch boundary
repeats the uninterrupted run exactly; from the middle of an epoch the skipped batches are re-drawn,
so the flips may differ.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .. import evaluate, visualize
from ..config import FasterRCNNConfig
from ..data import CocoDetection, DetectionTransform, make_data_loader
from ..data.errors import InputError
from ..faster_rcnn import LOSS_NAMES, convolution_memory_format
from ..mask_rcnn import MASK_LOSS_NAMES
from .checkpoints import model_description, restore_checkpoint, resume_checkpoint, save_checkpoint
from .distributed import average_buffers, init_distributed, is_distributed, max_over_ranks
from .schedule import Step, final_model, learning_rate, prepare_step, schedule_steps
from .threads import ThreadChooser, thread_candidates
from .train_config import TrainConfig, build_model, dataset_paths, model_config_of, resolve_device

# Progress-bar names of the loss terms.
_SHORT_NAMES = {
    "loss": "loss",
    "loss_objectness": "obj",
    "loss_rpn_box_reg": "rpn_box",
    "loss_classifier": "cls",
    "loss_box_reg": "box",
    "loss_mask": "mask",
}
# Evaluation time per val batch as a fraction of a training step's (inference only, no backward).
_INFERENCE_SHARE_OF_STEP = 0.5
# Seconds kept at the end of the budget for the last checkpoint and the plots.
_FINAL_WRITES_SECONDS = 20.0


def train(config: TrainConfig, model: nn.Module | None = None) -> dict:
    """Run the training described by ``config``; return ``{"model", "metrics", "iteration", "output_dir", ...}``.

    ``metrics`` is :func:`~tritondet.detector.evaluate.evaluate_coco`'s result (``None`` when
    ``evaluate`` is off). Works as a single process or under torchrun (see the module docstring).
    ``model``: a module to train instead of the ``config.model`` preset's (the training benchmark
    trains torchvision's ``FasterRCNN`` with this recipe); it must take ``(images, targets,
    generator=...)`` and return the four :data:`LOSS_NAMES` terms in training mode, and its checkpoints
    are not for :func:`~.checkpoints.load_checkpoint`.
    """
    default_threads = torch.get_num_threads()  # the thread chooser's changes end with the run
    try:
        run = _Run.start(config, model)
        try:
            for number, step in enumerate(run.steps, start=1):
                _begin_step(run, step, number)
                batches = _batches(run)
                stop = run.iteration - run.step_start >= step.iterations
                while not stop:
                    epoch, images, targets = next(batches)
                    losses, lr = _train_iteration(run, step, images, targets)
                    stop = _account(run, step, losses, len(images))
                    run.log.record(run, step.name, epoch, lr, force=stop)
                    _save_checkpoints(run, force=stop)
                batches.close()
                _end_step(run, step, number)
        finally:
            run.log.close()
        if run.alternating:
            run.model = final_model(run.steps)
        return _finish(run)
    finally:
        torch.set_num_threads(default_threads)


# ---------------------------------------------------------------------------------------------------------------------
# The run's state
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """Everything the steps of one training run share."""

    config: TrainConfig
    start_time: float
    device: torch.device
    rank: int
    world_size: int
    output_dir: Path
    train_set: CocoDetection
    val_set: CocoDetection
    loader: DataLoader
    num_workers: int
    model_config: FasterRCNNConfig
    model: nn.Module
    forward: nn.Module  # the model, wrapped in DistributedDataParallel under torchrun
    optimizer: torch.optim.Optimizer
    sampling: torch.Generator  # the detector's anchor/RoI sampling
    steps: list[Step]
    log: _TrainingLog
    iteration: int = 0
    trained_seconds: float = 0.0
    seconds_per_iteration: float | None = None  # running mean, to reserve time for the evaluation
    step_start: int = 0  # the iteration the current step started at (0 in joint training)
    step_seconds_start: float = 0.0
    progress: float = 0.0  # of the current step: the larger of its iterations' and its time's fraction
    trained_parameters: list[nn.Parameter] = field(default_factory=list)  # the current step's, clipped together
    thread_chooser: ThreadChooser | None = None  # on the CPU without config.threads

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def alternating(self) -> bool:
        return self.config.schedule == "alternating"

    @classmethod
    def start(cls, config: TrainConfig, model: nn.Module | None) -> _Run:
        """Join the process group, read the data, build (or resume) the model and open the logs."""
        start_time = time.monotonic()
        device = resolve_device(config.device)
        rank, world_size = init_distributed(device)
        if device.type == "cuda" and world_size > 1:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
            torch.cuda.set_device(device)
        output_dir = Path(config.output_dir)
        if rank == 0:
            output_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(config.seed)
        # Data first: the model's class count is the data set's.
        train_set, val_set = _datasets(config, rank)
        num_workers = config.num_workers if config.num_workers is not None else (2 if device.type == "cuda" else 0)
        loader = make_data_loader(
            train_set, config.batch_size, shuffle=True, num_workers=num_workers, seed=config.seed,
            distributed=world_size > 1, drop_last=True,
        )  # fmt: skip
        if len(loader) == 0:
            batch = f"{config.batch_size} images" + (f" on each of {world_size} processes" if world_size > 1 else "")
            raise InputError(
                f"{train_set.annotation_file}: the training set ({len(train_set)} images with annotations) is "
                f"smaller than one batch ({batch})"
            )
        if config.schedule == "alternating" and (world_size > 1 or model is not None):
            raise ValueError("schedule='alternating' runs in one process, on the model preset (no torchrun, no model=)")
        model_config = model_config_of(config, train_set.num_classes)
        torch.manual_seed(config.seed)  # the same initial weights on every rank, however the data was made
        model = (build_model(model_config) if model is None else model).to(device)
        # The weights in the layout the convolutions run in (the model converts its input): no reorder per call.
        model = model.to(memory_format=convolution_memory_format(device))
        sampling = torch.Generator(device=device).manual_seed(config.seed + rank)
        steps = schedule_steps(config, model)
        optimizer = _optimizer(config, (model,))
        resume = resume_checkpoint(config, device)
        iteration, trained_seconds = 0, 0.0
        if resume is not None:
            built = model_description(config.model, model_config.roi_heads.num_classes)
            iteration, trained_seconds = restore_checkpoint(*resume, model, optimizer, sampling, rank, built)
        forward = model
        if world_size > 1:
            ids = [device.index] if device.type == "cuda" else None
            forward = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        resumed_from = None if resume is None else iteration
        loss_names = LOSS_NAMES if model_config.mask is None else MASK_LOSS_NAMES
        log = _TrainingLog(output_dir, rank == 0 and config.progress, resumed_from, rank == 0, loss_names)
        thread_chooser = None
        if device.type == "cpu" and config.threads is not None:
            torch.set_num_threads(config.threads)
        elif device.type == "cpu":
            thread_chooser = ThreadChooser(thread_candidates(torch.get_num_threads()))
        return cls(
            config, start_time, device, rank, world_size, output_dir, train_set, val_set, loader, num_workers,
            model_config, model, forward, optimizer, sampling, steps, log, iteration, trained_seconds,
            thread_chooser=thread_chooser,
        )  # fmt: skip

    def snapshot(self, saved: nn.Module) -> dict:
        """The checkpoint entries besides the model and optimizer; a collective under torchrun (every rank calls it)."""
        average_buffers(saved)
        sampling_states = [self.sampling.get_state()]
        if is_distributed():
            sampling_states = [None] * self.world_size
            dist.all_gather_object(sampling_states, self.sampling.get_state())
        return {
            "iteration": self.iteration,
            "trained_seconds": self.trained_seconds,
            "rng": {"torch": torch.get_rng_state(), "sampling": sampling_states},
            "model_config": dataclasses.asdict(self.model_config),
            "train_config": dataclasses.asdict(self.config),
            "categories": list(self.train_set.categories),
            "label_to_category_id": dict(self.train_set.label_to_category_id),
        }


def _datasets(config: TrainConfig, rank: int) -> tuple[CocoDetection, CocoDetection]:
    """The train set (flipped) and the val set, at their files' sizes (the model resizes); under torchrun
    rank 0 generates the synthetic set, the others wait for it."""
    if rank == 0:
        dataset_paths(config)
    if is_distributed():
        dist.barrier()  # rank 0 generated it; the others find it complete
    train_images, train_annotations, val_images, val_annotations = dataset_paths(config)
    train_tf = DetectionTransform(train=True)
    on_bad = config.on_bad_data
    train_set = CocoDetection(
        train_images, train_annotations, train_tf, on_bad, remove_images_without_annotations=True, masks=config.masks,
        image_cache_bytes=config.image_cache_mb * 2**20,
    )  # fmt: skip
    return train_set, CocoDetection(val_images, val_annotations, on_bad=on_bad)


def _optimizer(config: TrainConfig, modules: tuple[nn.Module, ...]) -> torch.optim.SGD:
    """SGD over the parameters of ``modules`` that require gradients."""
    parameters = [p for module in modules for p in module.parameters() if p.requires_grad]
    # No weight decay on biases and batch-norm parameters (1-d), as torchvision's reference scripts can do;
    # the paper decays everything, but from scratch on small data the decayed norms slow training down.
    decay = [p for p in parameters if p.ndim > 1]
    no_decay = [p for p in parameters if p.ndim <= 1]
    return torch.optim.SGD(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        momentum=config.momentum,
        foreach=True,  # one fused update per parameter group; torch's default loops per tensor on the CPU
    )


# ---------------------------------------------------------------------------------------------------------------------
# The steps of the loop
# ---------------------------------------------------------------------------------------------------------------------


def _begin_step(run: _Run, step: Step, number: int) -> None:
    """Freeze what the step does not train (a fresh optimizer for an alternating step), open its progress bar."""
    if run.alternating:
        prepare_step(step)
        run.optimizer = _optimizer(run.config, step.trained)
    else:
        step.model.train()
    run.trained_parameters = [p for module in step.trained for p in module.parameters() if p.requires_grad]
    run.step_start = run.iteration if run.alternating else 0
    run.step_seconds_start = run.trained_seconds
    run.progress = (run.iteration - run.step_start) / step.iterations
    label = f"step {number}/4 {step.name}" if run.alternating else "train"
    run.log.begin_step(label, step.iterations, run.iteration - run.step_start)


def _batches(run: _Run) -> Iterator[tuple[int, list[Tensor], list[dict]]]:
    """``(epoch, images, targets)`` from the run's iteration on, epoch after epoch; the batches of the
    current epoch already trained are drawn again and skipped (their flips use up the same random numbers).

    A batch whose images were all skipped as unreadable is passed over in one process; under torchrun it
    is an error (the other ranks would wait for this one's gradients), as is a whole epoch of them."""
    epoch, skip = divmod(run.iteration, len(run.loader))
    while True:
        if run.world_size > 1:
            run.loader.sampler.set_epoch(epoch)
        else:
            run.loader.generator.manual_seed(run.config.seed * 100_003 + epoch)  # epoch e's order, resumable
        trained = False
        for batch_index, (images, targets) in enumerate(run.loader):
            if batch_index < skip:
                continue
            if not images and run.world_size > 1:
                raise InputError(f"{run.train_set.annotation_file}: every image of a batch is unreadable")
            if images:
                trained = True
                yield epoch, images, targets
        if not trained and skip == 0:
            raise InputError(f"{run.train_set.annotation_file}: no image of the training set could be read")
        skip = 0
        epoch += 1


def _train_iteration(
    run: _Run, step: Step, images: list[Tensor], targets: list[dict]
) -> tuple[dict[str, Tensor], float]:
    """One SGD iteration on a batch; the losses and the learning rate it used."""
    begin = time.monotonic()
    device = run.device
    images = [image.to(device, non_blocking=True) for image in images]
    fields = ("boxes", "labels", "masks")  # masks: only a Mask R-CNN run's data sets serve them
    targets = [{k: t[k].to(device) for k in fields if k in t} for t in targets]
    lr = learning_rate(run.config, run.iteration - run.step_start, run.progress)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=run.config.amp and device.type == "cuda"):
        if run.alternating:
            losses = step.model.partial_losses(images, targets, run.sampling, **step.losses)
        else:
            losses = run.forward(images, targets, generator=run.sampling)
    loss = sum(value.float() for name, value in losses.items() if name in MASK_LOSS_NAMES)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"iteration {run.iteration}: the loss is {float(loss)}; lower the lr")
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(run.trained_parameters, run.config.clip_grad_norm, foreach=True)  # as the SGD step
    run.optimizer.step()
    _record_time(run, time.monotonic() - begin)
    return losses, lr


def _record_time(run: _Run, seconds: float) -> None:
    """Count one more iteration of ``seconds``; update the running mean speed and the thread chooser."""
    if run.thread_chooser is not None:
        run.thread_chooser.observe(seconds)
    run.iteration += 1
    run.trained_seconds += seconds
    previous = run.seconds_per_iteration
    run.seconds_per_iteration = seconds if previous is None else 0.9 * previous + 0.1 * seconds


def _account(run: _Run, step: Step, losses: dict[str, Tensor], batch_images: int) -> bool:
    """Add the iteration's losses to the log, update the step's progress; whether the step is over.

    Progress is the larger of the step's iterations done and its share of the time budget used; the
    evaluation's time is reserved from the running speed, and an alternating step gets its share
    (``step.share``) of the time left when it started."""
    run.log.add(_loss_terms(losses), batch_images * run.world_size)
    run.progress = (run.iteration - run.step_start) / step.iterations
    if run.config.max_minutes is not None:
        deadline = run.start_time + 60 * run.config.max_minutes
        val_batches = math.ceil(len(run.val_set) / (run.config.batch_size * run.world_size))
        evaluation = _INFERENCE_SHARE_OF_STEP * val_batches * run.seconds_per_iteration if run.config.evaluate else 0.0
        budget_end = deadline - evaluation - _FINAL_WRITES_SECONDS
        spent = run.trained_seconds - run.step_seconds_start
        fraction = spent / max(step.share * (budget_end - (time.monotonic() - spent)), 1e-9)
        run.progress = max(run.progress, max_over_ranks(fraction))
    return run.iteration - run.step_start >= step.iterations or run.progress >= 1.0


def _loss_terms(losses: dict[str, Tensor]) -> dict[str, float]:
    """The terms of :data:`MASK_LOSS_NAMES` present (an alternating step trains some, a Faster R-CNN has
    no ``loss_mask``) and their sum, ``loss``."""
    values = {name: float(losses[name].detach()) for name in MASK_LOSS_NAMES if name in losses}
    values["loss"] = sum(values.values())
    return values


def _save_checkpoints(run: _Run, force: bool) -> None:
    """Joint training: ``last.pt`` every ``checkpoint_every`` iterations and at the end (``force``), and a
    numbered copy at each ``checkpoint_every``. Alternating steps save their models at their end."""
    periodic = run.iteration % run.config.checkpoint_every == 0
    if run.alternating or not (periodic or force):
        return
    snapshot = run.snapshot(run.model)  # a collective under torchrun: every rank calls it
    if run.main:
        save_checkpoint(run.output_dir / "last.pt", run.model, run.optimizer, snapshot)
    if run.main and periodic:
        path = run.output_dir / f"checkpoint_{run.iteration:07d}.pt"
        save_checkpoint(path, run.model, run.optimizer, snapshot)


def _end_step(run: _Run, step: Step, number: int) -> None:
    """Close the step's progress bar; an alternating step saves its model (``step<k>.pt``, the last one
    also as ``last.pt``), loadable like a final one."""
    run.log.end_step()
    if not (run.alternating and run.main):
        return
    snapshot = run.snapshot(step.model)
    save_checkpoint(run.output_dir / f"step{number}.pt", step.model, run.optimizer, snapshot)
    if number == len(run.steps):
        save_checkpoint(run.output_dir / "last.pt", step.model, run.optimizer, snapshot)


def _finish(run: _Run) -> dict:
    """Evaluate on the val split, draw the plots and write ``metrics.json``; the run's result."""
    result = {
        "iteration": run.iteration,
        "trained_seconds": run.trained_seconds,
        "output_dir": str(run.output_dir),
        "model": run.model,
        "metrics": None,
        "threads": torch.get_num_threads(),
    }
    if run.config.evaluate:
        val_loader = make_data_loader(
            run.val_set, run.config.batch_size, shuffle=False, num_workers=run.num_workers,
            distributed=run.world_size > 1,
        )  # fmt: skip
        result["metrics"] = evaluate.evaluate_model(run.model, val_loader, device=run.device)
    if run.main and run.config.plots:
        visualize.plot_loss_curves(run.log.csv_path, run.output_dir / "loss_curves.png")
        categories = list(run.train_set.categories)
        out_path = run.output_dir / "detections.png"
        visualize.plot_val_detections(run.model.eval(), run.val_set, categories, run.device, out_path)
    result["total_seconds"] = time.monotonic() - run.start_time
    if run.main:
        saved = {k: v for k, v in result.items() if k != "model"}
        (run.output_dir / "metrics.json").write_text(json.dumps(saved, indent=1, default=str) + "\n")
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Logs: log.csv, TensorBoard, the progress bar
# ---------------------------------------------------------------------------------------------------------------------


class _TrainingLog:
    """The main process's ``log.csv``, TensorBoard events (when installed) and progress bar; one row of
    running means of the loss terms per ``log_every`` iterations. Other ranks only keep the running means.

    Resuming from iteration ``resumed_from``, the rows of the interrupted run up to that iteration are kept
    and the later ones (the iterations trained again) dropped, so each iteration has at most one row.
    ``loss_names``: the model's loss terms, a column each."""

    def __init__(
        self, output_dir: Path, progress: bool, resumed_from: int | None, main: bool, loss_names: tuple[str, ...]
    ) -> None:
        self.csv_path = output_dir / "log.csv"
        self.progress = progress
        self.main = main
        self.bar = self.writer = self.csv_file = None
        self._reset(time.monotonic())
        if not main:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(output_dir / "tensorboard")
        except ImportError:  # TensorBoard is optional
            self.writer = None
        # threads: the intra-op thread count the row's last iteration ran with (see ThreadChooser).
        fields = ("iteration", "step", "epoch", "lr", "loss", *loss_names, "images_per_s", "threads", "elapsed_s")
        kept = [] if resumed_from is None else _logged_rows(self.csv_path, resumed_from)
        temporary = self.csv_path.with_suffix(".tmp")
        with open(temporary, "w", newline="") as file:
            rows = csv.DictWriter(file, fields, extrasaction="ignore")
            rows.writeheader()
            rows.writerows(kept)
        temporary.replace(self.csv_path)
        self.csv_file = open(self.csv_path, "a", newline="")  # noqa: SIM115 - closed in close()
        self.rows = csv.DictWriter(self.csv_file, fields)

    def _reset(self, now: float) -> None:
        self.sums, self.counts = {}, {}
        self.images, self.interval_start = 0, now

    def begin_step(self, label: str, iterations: int, done: int) -> None:
        if self.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=iterations, initial=done, desc=label, dynamic_ncols=True)
        self._reset(time.monotonic())

    def add(self, terms: dict[str, float], images: int) -> None:
        for name, value in terms.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
            self.counts[name] = self.counts.get(name, 0) + 1
        self.images += images

    def record(self, run: _Run, step_name: str, epoch: int, lr: float, force: bool) -> None:
        """Write a row every ``log_every`` iterations, and at the end of a step (``force``); advance the bar."""
        if self.main and (run.iteration % run.config.log_every == 0 or force):
            self._write(run.iteration, step_name, epoch, lr, run.trained_seconds)
        if self.bar is not None:
            self.bar.update(1)

    def _write(self, iteration: int, step_name: str, epoch: int, lr: float, trained_seconds: float) -> None:
        now = time.monotonic()
        speed = self.images / max(now - self.interval_start, 1e-9)
        means = {name: self.sums[name] / self.counts[name] for name in self.sums}
        row = {"iteration": iteration, "step": step_name, "epoch": epoch, "lr": f"{lr:.6g}"}
        row["images_per_s"] = f"{speed:.3f}"
        row["threads"] = torch.get_num_threads()
        row.update({name: f"{value:.5f}" for name, value in means.items()})
        row["elapsed_s"] = f"{trained_seconds:.1f}"
        self.rows.writerow(row)
        self.csv_file.flush()
        if self.writer is not None:
            for name, value in means.items():
                self.writer.add_scalar(f"train/{name}", value, iteration)
            self.writer.add_scalar("train/lr", lr, iteration)
            self.writer.add_scalar("train/images_per_s", speed, iteration)
        if self.bar is not None:
            terms = {short: f"{means[name]:.3f}" for name, short in _SHORT_NAMES.items() if name in means}
            self.bar.set_postfix(**terms, img_s=f"{speed:.1f}", lr=f"{lr:.2g}")
        self._reset(now)

    def end_step(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self.end_step()
        if self.csv_file is not None:
            self.csv_file.close()
        if self.writer is not None:
            self.writer.close()


def _logged_rows(csv_path: Path, last_iteration: int) -> list[dict]:
    """The complete rows of ``csv_path`` (if any) up to ``last_iteration``; a row cut by a kill (no last
    column, ``elapsed_s``) is dropped."""
    if not csv_path.is_file():
        return []
    with open(csv_path, newline="") as file:
        rows = list(csv.DictReader(file))
    return [
        row
        for row in rows
        if row.get("elapsed_s") and row["iteration"].isdigit() and int(row["iteration"]) <= last_iteration
    ]
