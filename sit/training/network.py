"""The network being trained: a fresh SiT, a resumed one, or published/bare weights to fine-tune,
wrapped for DDP or sharded by FSDP2 (--sharding), with its EMA and optimizer restored; ready as a `TrainStep`."""
from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import download
from models import SiT, model_config_from_state_dict, model_name_for_config
from sit.checkpoint import extras_of
from sit.distributed import DistContext
from sit.errors import UsageError
from sit.latents import image_size_for
from sit.training.experiment import StartPoint
from sit.training.lr_schedule import WARMUP_COSINE, schedule_of
from sit.training.registry import model_options, step_objective
from sit.training.settings import TrainConfig
from sit.training.sharding import Sharding
from sit.training.step import TrainStep
from sit.training.terms import LossTerm, ModelWithTerms, TermFactory, in_optimizer_order


def describe_weights(weights: dict) -> str:
    """What a state dict's shapes say it is, for error messages."""
    try:
        config = model_config_from_state_dict(weights)
    except (ValueError, KeyError):
        return "not SiT weights"
    name = model_name_for_config(config) or f"a custom SiT (depth {config['depth']}, width {config['hidden_size']})"
    return (f"{name} at image size {image_size_for(config['input_size'], config['in_channels'])} "
            f"with {config['num_classes']} classes")


def build_model(config: TrainConfig, start: StartPoint) -> SiT:
    """The SiT to train, on the CPU: the checkpoint's config and weights when resuming, bare weights
    loaded for fine-tuning, else freshly initialised (from the torch RNG)."""
    checkpoint = start.checkpoint
    kwargs = dict(checkpoint["model_config"]) if start.resuming else {**config.model.sit_kwargs(),
                                                                       **model_options(config.features)}
    try:
        model = SiT(**kwargs)
    except (ValueError, AssertionError, TypeError) as error:
        raise UsageError(f"cannot build the model {kwargs}: {error}") from None
    if checkpoint is None:
        return model
    weights = checkpoint["model"] if "model" in checkpoint else download.state_dict_of(checkpoint)
    if model.r_embedder is not None and not any(key.startswith("r_embedder.") for key in weights):
        # a velocity model's weights start a MeanFlow model: its r-embedder keeps its zero start (u = v at step 0)
        weights = {**weights, **{f"r_embedder.{key}": value for key, value in model.r_embedder.state_dict().items()}}
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError:
        model_settings = config.model
        raise UsageError(f"the weights in {start.source} do not fit {model_settings.model} at --image-size "
                         f"{model_settings.image_size} with --num-classes {model_settings.num_classes}; they are "
                         f"{describe_weights(weights)}") from None
    return model


def build_terms(model: SiT, factories: Sequence[TermFactory], start: StartPoint) -> list[LossTerm]:
    """The run's loss terms for this SiT (built after it, from the torch RNG), each with the checkpoint's
    state when resuming; a checkpoint without a term's state cannot resume with that term."""
    terms = [factory(model) for factory in factories]
    saved = extras_of(start.checkpoint) if start.resuming else {}
    for term in terms:
        if start.resuming and term.name not in saved and any(True for _ in term.parameters()):
            raise UsageError(f"{start.source} was trained without the {term.name} loss term; it cannot be switched on "
                             f"in a resumed run: start a new experiment")
        if term.name in saved:
            term.load_state_dict(saved[term.name])
    return terms


def warn_cosine_length(optim: Any, checkpoint: dict, logger: logging.Logger) -> None:
    """A warmup-cosine run resumed with another --max-steps than its checkpoint's: the cosine's length changes."""
    args = checkpoint.get("args")
    held = args.get("max_steps") if isinstance(args, dict) else None
    if optim.lr_schedule == WARMUP_COSINE and held is not None and held != optim.max_steps:
        logger.warning(f"warning: --max-steps {optim.max_steps} replaces the checkpoint's {held}: the cosine of "
                       f"--lr-schedule {WARMUP_COSINE} now decays to step {optim.max_steps}, so the lr from step "
                       f"{checkpoint['train_steps']} on differs from an uninterrupted run's")


def build_train_step(config: TrainConfig, ctx: DistContext, start: StartPoint, vae: Any,
                     logger: logging.Logger, term_factories: Sequence[TermFactory] = ()) -> TrainStep:
    """Model, DDP or FSDP2, EMA and AdamW (the checkpoint's state when resuming; --lr rules either way); with
    loss terms also their parameters, trained beside the model (DDP wraps both)."""
    checkpoint: Optional[dict] = start.checkpoint
    optim = config.optim
    sharding = Sharding(optim.sharding, optim.precision)
    model = build_model(config, start).to(ctx.device)
    terms = [term.to(ctx.device) for term in in_optimizer_order(build_terms(model, term_factories, start))]
    refusals = [term.sharding_refusal() for term in terms] if sharding.sharded else []
    if any(refusals):
        raise UsageError(f"--sharding fsdp: {next(filter(None, refusals))}; use --sharding ddp")
    ddp_model = sharding.wrap(ModelWithTerms(model, terms) if terms else model, ctx)
    step = TrainStep.create(model, ddp_model=ddp_model, ema_state=checkpoint.get("ema") if checkpoint else None,
                            transport=config.transport.build(config.time.schedule()), device=ctx.device, lr=optim.lr,
                            grad_checkpointing=optim.grad_checkpointing, compile_blocks=optim.compile, vae=vae,
                            from_features=config.data.feature_path is not None, precision=optim.precision,
                            ema_decay=optim.ema_decay, max_grad_norm=optim.max_grad_norm, sharding=sharding,
                            terms=terms, weight_decay=optim.weight_decay, lr_schedule=schedule_of(optim),
                            objective=step_objective(config.features))
    if start.resuming:
        try:  # judged before (sit.checkpoint.check_train_checkpoint); what torch still refuses is one line too
            sharding.load_optimizer(step.model, step.opt, checkpoint["opt"])
        except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as error:
            detail = str(error).splitlines()[0][:200] if str(error) else ""
            raise UsageError(f"cannot resume {start.source}: its optimizer state does not load "
                             f"({type(error).__name__}: {detail})") from None
        # the state holds the old lr and weight decay; --lr and --weight-decay (the checkpoint's unless given) rule
        # the SiT's group (a term's own group keeps its own options); --lr-schedule's lr continues from the step
        step.opt.param_groups[0]["lr"] = optim.lr
        step.opt.param_groups[0]["weight_decay"] = optim.weight_decay
        step.steps_done = checkpoint["train_steps"]
        warn_cosine_length(optim, checkpoint, logger)
        logger.info(f"Resumed from {start.source} at step {checkpoint['train_steps']} "
                    f"(epoch {checkpoint['epoch']}, batch {checkpoint['epoch_step']})")
    elif checkpoint is not None:
        logger.info(f"Fine-tuning the weights of {start.source} from step 0 with a fresh optimizer")
    logger.info(f"SiT parameters: {sum(param.numel() for param in model.parameters()):,} ({model.config})"
                + (f"; sharded over {ctx.world_size} ranks (FSDP2)" if sharding.sharded else ""))
    return step
