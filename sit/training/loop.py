"""The training loop (edm2's training_loop shape): set up the experiment, the VAE, the network and the
data, restore a resumed run exactly, then step, log, preview, measure FID and checkpoint until
--epochs, --max-steps or a stop signal. Every rank-0 write is agreed on by every rank (`on_main`).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch.utils.data import DataLoader

from sit.background import BackgroundWriter, cpu_snapshot
from sit.checkpoint import TrainCheckpoint
from sit.data.order import ResumableDistributedSampler
from sit.distributed import DistContext, agree, on_main
from sit.errors import RunFailure, UsageError
from sit.latents import PixelSpace
from sit.latents.statistics import LatentStatistics
from sit.metrics import FIDMonitor
from sit.progress import Progress
from sit.speed import configure_cpu_threads, configure_precision, precision_advice
from sit.training.data import TrainDataset, build_loader
from sit.training.decoder import RunVAE
from sit.training.experiment import StartPoint, open_experiment, write_latest
from sit.training.extensions import LoopExtension
from sit.training.fid import make_fid_monitor, measure_fid
from sit.training.monitor import LossMonitor, TrainingDiverged, check_health, log_first_loss, log_progress
from sit.training.network import build_train_step
from sit.training.preview import PREVIEW_LABELS, preview_inputs, save_preview
from sit.training.registry import loop_extensions, term_factories
from sit.training.rng import gather_rng_states, restore_rng
from sit.training.settings import TrainConfig
from sit.training.sharding import sampling_ema
from sit.training.signals import StopSignal
from sit.training.step import TrainStep, train_step
from sit.training.terms import TermContext, TermFactory


EPOCH_LOG_EVERY = 10  # "Beginning epoch N" every this many epochs (and at a run's first), not at each


@dataclass
class TrainState:
    """Where training stands: steps done in all, the current epoch and batches done in it."""
    train_steps: int = 0
    epoch: int = 0
    epoch_step: int = 0


@dataclass
class TrainingRun:
    """Everything the loop works with."""
    config: TrainConfig
    ctx: DistContext
    step: TrainStep
    vae: RunVAE
    dataset: TrainDataset
    loader: DataLoader
    sampler: ResumableDistributedSampler
    state: TrainState
    logger: logging.Logger
    experiment_dir: Optional[str]  # rank 0 only
    wandb_run: Any
    stop: StopSignal
    preview: tuple[torch.Tensor, torch.Tensor]  # fixed noise and labels of the sample grids
    monitor: LossMonitor
    term_factories: list[TermFactory]  # the loss terms (set up once: a rollback rebuilds them from these)
    last_saved_step: Optional[int] = None
    fid_monitor: Optional[FIDMonitor] = None  # with --fid-every
    extensions: list[LoopExtension] = field(default_factory=list)  # post-hoc EMA, self-healing, ... (registry)
    writer: Optional[BackgroundWriter] = None  # --background-checkpoints

    # Services for the loop extensions (sit.training.extensions)
    def write_on_main(self, what: str, path: Optional[str], write: Callable[[], None]) -> None:
        """Rank 0 writes a file (write()); on failure every rank stops with one line naming it."""

        def attempt() -> None:
            try:
                write()
            except OSError as error:
                message = f"cannot write the {what} {path} ({error})"
                self.logger.error(message)
                raise RunFailure(message) from error

        on_main(self.ctx, attempt)

    def finish_writes(self) -> None:
        """Wait for the background checkpoint write in flight (every rank; a failed one stops every rank)."""
        if self.writer is not None:
            self.write_on_main("checkpoint", self.writer.path, self.writer.wait)

    def settle_writes(self) -> None:
        """On a failure: let the write in flight finish, logging (not raising) its failure; no collective."""
        if self.writer is not None:
            try:
                self.writer.wait()
            except Exception as error:
                self.logger.error(f"cannot write the checkpoint {self.writer.path} ({error})")

    def check_health(self) -> None:
        """Every loss so far and every weight finite (TrainingDiverged otherwise; every rank alike)."""
        check_health(self.step.model, self.monitor, self.state.train_steps)

    def checkpoint(self) -> TrainCheckpoint:
        """The run's state as a checkpoint (a collective: every rank's RNG state is gathered)."""
        state, step = self.state, self.step
        rng = gather_rng_states(self.ctx.device)
        model_state, ema_state, opt_state = step.sharding.full_state_dicts(step.model, step.ema, step.opt)  # fsdp: to rank 0
        return TrainCheckpoint(model=model_state, ema=ema_state, opt=opt_state,
                               settings=self.config.settings(), model_config=dict(step.model.config),
                               train_steps=state.train_steps, epoch=state.epoch, epoch_step=state.epoch_step, rng=rng,
                               scaler=step.scaler.state_dict(), experiment_dir=self.experiment_dir,
                               wandb_id=self.wandb_run.id if self.wandb_run is not None else None,
                               extras={term.name: term.state_dict() for term in step.terms if term.state_dict()},
                               extensions={extension.name: extension.state_dict() for extension in self.extensions},
                               latent_statistics=self.vae.statistics.to_dict() if self.vae.statistics else None)

    def restore(self, saved: TrainCheckpoint) -> None:
        """Go on from a saved state (a rollback point) through the path a resume takes."""
        self.step = None  # let the diverged model, EMA and optimizer go before building their replacements
        start = StartPoint(f"the rollback point of step {saved.train_steps}", saved.to_dict())
        self.step = build_train_step(self.config, self.ctx, start, self.vae.module, self.logger, self.term_factories)
        self.step.ddp_model.train()
        for extension in self.extensions:
            extension.restore(self, saved.extensions.get(extension.name, {}))
        seed = self.config.data.global_seed * self.ctx.world_size + self.ctx.rank
        self.state = restore_progress(saved, self.step, self.ctx, seed, self.logger)
        self.monitor = new_monitor(self.extensions, self.state.train_steps + 1)


def save_checkpoint(run: TrainingRun) -> None:
    """Check health, gather every rank's RNG state, then rank 0 writes <step>.pt atomically (all ranks call
    this; a failed write stops every rank with one line)."""
    state = run.state
    run.check_health()
    checkpoint = run.checkpoint()
    path = os.path.join(run.experiment_dir, "checkpoints", f"{state.train_steps:07d}.pt") if run.ctx.is_main else None

    def write(saved: TrainCheckpoint) -> None:
        saved.save(path)
        run.logger.info(f"Saved checkpoint to {path}")
        write_latest(run.experiment_dir, path)  # <experiment>/latest.txt names it

    if run.writer is None:
        run.write_on_main("checkpoint", path, functools.partial(write, checkpoint))
    else:  # --background-checkpoints: one write at a time, from a CPU copy, while the steps go on
        run.finish_writes()
        if run.ctx.is_main:
            parts = [getattr(checkpoint, part.name) for part in dataclasses.fields(checkpoint)]
            copies, ready = cpu_snapshot(parts, pin=run.ctx.device.type == "cuda")
            run.writer.start(path, functools.partial(write, TrainCheckpoint(*copies)), ready)
    run.last_saved_step = state.train_steps
    for extension in run.extensions:
        extension.checkpoint_saved(run, checkpoint)


def save_samples(run: TrainingRun) -> None:
    """An EMA preview grid at samples/<step>.png (and to wandb), made by rank 0 (all ranks call this)."""
    path = os.path.join(run.experiment_dir, "samples", f"{run.state.train_steps:07d}.png") if run.ctx.is_main else None
    ema = sampling_ema(run.step.ema, run.ctx.device, everywhere=False)  # fsdp: gathered to rank 0

    def write() -> None:
        ready, decoder = run.vae.for_preview(run.logger)
        if not ready:
            return
        labels_file = os.path.join(run.experiment_dir, PREVIEW_LABELS)  # the grids' labels, row by row
        save_preview(ema, decoder, run.step.transport, run.preview, run.config.run.cfg_scale, path,
                     run.ctx.device, labels_file)
        run.logger.info(f"Saved EMA samples to {path} (their labels in {labels_file})")
        if run.wandb_run is not None:
            import wandb

            run.wandb_run.log({"samples": wandb.Image(path)}, step=run.state.train_steps)

    run.write_on_main("preview grid", path, write)


def log_fid(run: TrainingRun) -> None:
    """Measure FID of the EMA (every rank) and log it."""
    config, step = run.config, run.state.train_steps
    ema = sampling_ema(run.step.ema, run.ctx.device, everywhere=True)  # fsdp: gathered on every rank
    fid = measure_fid(ema, run.vae.for_fid(run.ctx), run.step.transport, run.fid_monitor, run.ctx,
                      num_images=config.fid.fid_num_samples,
                      batch_size=config.data.global_batch_size // run.ctx.world_size, num_steps=config.fid.fid_steps,
                      cfg_scale=config.fid.fid_cfg_scale, global_seed=config.data.global_seed,
                      precision=config.optim.precision)
    run.logger.info(f"(step={step:07d}) FID-{config.fid.fid_num_samples}: {fid:.4f}")
    if run.wandb_run is not None:
        run.wandb_run.log({"fid": fid}, step=step)
    for extension in run.extensions:
        extension.measured(run, "fid", fid)


def train_loop(run: TrainingRun) -> bool:
    """Train until --epochs, --max-steps or a stop signal; returns whether a signal stopped it."""
    config, state = run.config, run.state
    max_steps, every = config.optim.max_steps, config.run
    local_batch_size = config.data.global_batch_size // run.ctx.world_size
    finished = max_steps is not None and state.train_steps >= max_steps
    stopping = False
    total_steps = config.optim.epochs * (run.sampler.num_samples // local_batch_size)  # full epochs, drop_last
    progress = Progress("train", min(total_steps, max_steps or total_steps), "step", enabled=run.ctx.is_main,
                        initial=state.train_steps)
    first_step = state.train_steps + 1
    while not (finished or stopping) and state.epoch < config.optim.epochs:
        # A resumed epoch starts after the batches it had done; the order and flips depend on the epoch only.
        run.sampler.set_epoch(state.epoch, skip=state.epoch_step * local_batch_size)
        run.dataset.set_epoch(state.epoch)
        if state.epoch % EPOCH_LOG_EVERY == 0 or state.train_steps + 1 == first_step:  # short epochs: not every one
            run.logger.info(f"Beginning epoch {state.epoch}...")
        for *inputs, labels in run.loader:
            if any(extension.skips(state.epoch, state.epoch_step, state.train_steps + 1) for extension in run.extensions):
                state.epoch_step += 1  # e.g. a batch that made the loss diverge: read and dropped, never trained on
                continue
            run.monitor.add(train_step(run.step, inputs, labels))
            state.train_steps += 1
            state.epoch_step += 1
            step = state.train_steps
            for extension in run.extensions:
                extension.after_step(run)
            if step % every.log_every == 0:
                log_progress(run.monitor, step, config.data.global_batch_size, run.logger, run.wandb_run)
            elif step == first_step:
                log_first_loss(run.monitor, step, run.logger)
            progress.update_to(step)
            if step % every.sample_every == 0:
                save_samples(run)  # before the checkpoint, so that its RNG state follows everything
            if config.fid.fid_every is not None and step % config.fid.fid_every == 0:
                log_fid(run)
            for extension in run.extensions:
                extension.before_checkpoint(run)
            saved = step % every.ckpt_every == 0
            if saved:
                save_checkpoint(run)
            for extension in run.extensions:
                extension.step_done(run, saved)
            finished = max_steps is not None and step >= max_steps
            stopping = not finished and run.stop.agreed()  # the same answer on every rank
            if finished or stopping:
                break
        else:
            state.epoch, state.epoch_step = state.epoch + 1, 0
    progress.close()
    return stopping


def run_length(config: TrainConfig, batches_per_epoch: int) -> str:
    """How long the run trains, e.g. "for 1,000 steps (--max-steps; 1400 epochs would be 350,000)"."""
    epochs, max_steps = config.optim.epochs, config.optim.max_steps
    epoch_steps = epochs * batches_per_epoch
    if max_steps is not None and max_steps < epoch_steps:
        return f"for {max_steps:,} steps (--max-steps; {epochs} epochs would be {epoch_steps:,})"
    return f"for {epochs} epochs ({epoch_steps:,} steps)"


def restore_progress(saved: TrainCheckpoint, step: TrainStep, ctx: DistContext, seed: int,
                     logger: logging.Logger) -> TrainState:
    """Where a saved run stood, with its random streams and loss scale restored (a resume or a rollback)."""
    restore_rng(saved.rng, ctx, seed, saved.train_steps, logger)  # last: nothing may draw random numbers after this
    if saved.scaler:
        step.scaler.load_state_dict(saved.scaler)  # fp16: the loss scale continues too
    return TrainState(saved.train_steps, saved.epoch, saved.epoch_step)


def new_monitor(extensions: list[LoopExtension], first_step: int) -> LossMonitor:
    """The loss monitor from first_step on; extensions that inspect losses (a spike check) see each step's."""
    return LossMonitor(first_step, [extension.inspect_loss for extension in extensions if extension.inspects_losses])


def train_with_extensions(run: TrainingRun) -> bool:
    """train_loop; a divergence that an extension recovers from (a rollback) goes on training."""
    while True:
        try:
            stopped = train_loop(run)
            for extension in run.extensions:
                extension.loop_done(run)
            return stopped
        except TrainingDiverged as error:
            if not any(extension.recover(run, error) for extension in run.extensions):
                raise


def check_channels(step: TrainStep, vae: RunVAE, dataset: TrainDataset) -> None:
    """The model's input channels are what the data gives: pixels, VAE latents or cached latents."""
    if vae.lazy:
        channels, what = dataset.meta["latent_shape"][0], "features have"
    elif vae.module is None:
        channels, what = PixelSpace.channels, "pixels have"
    else:
        channels, what = vae.module.channels, "VAE has"
    if channels != step.model.config["in_channels"]:
        raise UsageError(f"the {what} {channels} channels, the model {step.model.config['in_channels']}")


def train(config: TrainConfig, *, ctx: DistContext, dataset: TrainDataset, start: StartPoint, warnings: list[str],
          stop: StopSignal, latent_statistics: Optional[LatentStatistics] = None) -> None:
    """Set up (experiment, VAE, model, data), restore a resumed run, train, save the final checkpoint.
    The order below is the order of the random draws (model init, a resumed run's RNG restore last)."""
    configure_precision(config.optim.precision)  # default tf32, as the original: TF32 matmuls on GPUs
    seed = config.data.global_seed * ctx.world_size + ctx.rank
    torch.manual_seed(seed)
    experiment = open_experiment(ctx, config, start)
    logger = experiment.logger
    for warning in warnings:
        logger.warning(f"warning: {warning}")
    threads = configure_cpu_threads(ctx.device)  # on a CPU: OMP_NUM_THREADS, else the cores shared by the processes
    if threads:
        logger.info(threads)
        logger.info(precision_advice(config.optim.precision, ctx.device))  # the CPU's bf16 units, measured
    vae = RunVAE.at_start(ctx, config.model.vae, from_features=config.data.feature_path is not None,
                          statistics=latent_statistics)
    feature_meta = dataset.meta if config.data.feature_path is not None else None  # cached latents' meta.json
    factories = term_factories(config.features, TermContext(config.model.image_size, feature_meta, ctx, logger))
    step = build_train_step(config, ctx, start, vae.module, logger, factories)
    check_channels(step, vae, dataset)
    loader, sampler = build_loader(config, dataset, ctx, seed)
    logger.info(f"Dataset contains {len(dataset):,} images in {len(dataset.classes)} classes "
                f"({config.data.data_path or config.data.feature_path})")
    fid = config.fid
    fid_monitor = None
    if fid.fid_every is not None:  # every rank builds one, and stops if any rank could not
        fid_monitor = agree(ctx, lambda: make_fid_monitor(fid.fid_ref, ctx.device, fid.fid_inception_weights))
    state, saved = TrainState(), {}
    if start.resuming:
        resumed = TrainCheckpoint.from_dict(start.checkpoint)
        state, saved = restore_progress(resumed, step, ctx, seed, logger), resumed.extensions
    extensions = loop_extensions(config, step.model, saved)
    run = TrainingRun(config=config, ctx=ctx, step=step, vae=vae, dataset=dataset, loader=loader, sampler=sampler,
                      state=state, logger=logger, experiment_dir=experiment.folder, wandb_run=experiment.wandb_run,
                      stop=stop, preview=preview_inputs(config.data.global_seed, step.model.config),
                      monitor=new_monitor(extensions, state.train_steps + 1), term_factories=factories,
                      fid_monitor=fid_monitor,
                      last_saved_step=state.train_steps if start.resuming else None, extensions=extensions,
                      writer=BackgroundWriter() if config.run.background_checkpoints else None)
    for extension in extensions:
        extension.start(run)

    step.ddp_model.train()  # enables label dropout for classifier-free guidance
    logger.info(f"Training {run_length(config, sampler.num_samples // (config.data.global_batch_size // ctx.world_size))}...")
    try:
        stopped = train_with_extensions(run)
        state, step = run.state, run.step  # a rollback replaces them
        if stopped:
            logger.info(f"Received {stop.received or 'a stop signal on another rank'}: stopping at step {state.train_steps}")
        for extension in run.extensions:
            extension.end(run)
        if state.train_steps > 0 and run.last_saved_step != state.train_steps:
            save_checkpoint(run)
    except BaseException:
        run.settle_writes()
        raise
    run.finish_writes()
    step.ddp_model.eval()  # disables label dropout
    if run.wandb_run is not None:
        run.wandb_run.finish()
    if ctx.is_main and run.last_saved_step is not None:
        num_classes = config.model.num_classes  # sample.py's default labels are ImageNet's: name some of this model's
        labels = "" if num_classes >= 1000 else f" --class-labels {','.join(map(str, range(min(num_classes, 8))))}"
        mode = "MeanFlow --num-sampling-steps 2" if run.step.model.config.get("mean_flow") else "ODE"
        logger.info(f"Newest checkpoint in {run.experiment_dir}/latest.txt; sample it with `python sample.py {mode} "
                    f"--ckpt {run.experiment_dir}{labels}` (an experiment folder: its newest checkpoint)")
    logger.info("Done!")
