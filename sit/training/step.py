"""One training step: a batch -> what the model learns -> the transport's loss (plus loss terms, or an
`Objective` in its place) -> AdamW (GradScaler, clipping) -> EMA. train.py's loop and benchmarks/bench.py
both run exactly this."""
from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from sit.latents import as_latent_space, recorded_latent_space
from sit.speed import autocast, compile_model
from sit.training.optimizer import make_optimizer, update_ema
from sit.training.lr_schedule import LRSchedule
from sit.training.sharding import Sharding, full_tensor
from sit.training.terms import LossTerm, ModelWithTerms, Objective, StepView, in_optimizer_order, term_parameters
from transport import Transport


@dataclass
class TrainStep:
    """What a training step works with. model: the raw SiT (what checkpoints hold); ddp_model: what the step
    calls (DDP, FSDP2 or the model; with terms a ModelWithTerms); vae: the latent space (None: pixels, or
    SD-VAE's with from_features); steps_done: the run's optimizer steps so far (the lr schedule's input)."""
    model: torch.nn.Module
    ddp_model: torch.nn.Module
    ema: torch.nn.Module
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    transport: Transport
    device: torch.device
    vae: Any = None
    from_features: bool = False
    precision: str = "fp32"
    ema_decay: float = 0.9999
    max_grad_norm: Optional[float] = None
    sharding: Sharding = Sharding()
    terms: Sequence[LossTerm] = ()
    lr_schedule: Optional[LRSchedule] = None
    steps_done: int = 0
    objective: Optional[Objective] = None  # the primary loss in place of the transport's (None: the transport's)

    @classmethod
    def create(cls, model: torch.nn.Module, *, transport: Transport, device: torch.device, lr: float,
               ddp_model: Optional[torch.nn.Module] = None, ema_state: Optional[dict] = None,
               grad_checkpointing: bool = False, compile_blocks: bool = False, vae: Any = None,
               from_features: bool = False, precision: str = "fp32", ema_decay: float = 0.9999,
               max_grad_norm: Optional[float] = None, sharding: Sharding = Sharding(),
               terms: Sequence[LossTerm] = (), weight_decay: float = 0.0,
               lr_schedule: Optional[LRSchedule] = None, objective: Optional[Objective] = None) -> "TrainStep":
        """The step for `model` (on `device`) as train.py builds it: the EMA copy (ema_state: weights to
        restore), gradient checkpointing, --compile, AdamW over the SiT's and the terms' parameters and the
        precision's GradScaler; with FSDP the model and EMA are sharded before compiling and before AdamW."""
        ema = deepcopy(model).requires_grad_(False).eval()  # after DDP's broadcast: the same start on every rank
        if ema_state is not None:
            ema.load_state_dict(ema_state)
        model.grad_checkpointing = grad_checkpointing
        sharding.shard(model, ema)
        if compile_blocks:
            compile_model(model)  # after the EMA's deepcopy (see compile_model); DDP calls the compiled blocks
        # the paper: AdamW, constant lr 1e-4, no weight decay (the defaults of --lr, --lr-schedule, --weight-decay)
        terms = in_optimizer_order(terms)
        opt = make_optimizer(model, lr=lr, weight_decay=weight_decay, extra=term_parameters(terms, own_group=False),
                             groups=[{"params": list(term.parameters()), **term.optimizer_options}
                                     for term in terms if term.optimizer_options and any(True for _ in term.parameters())])
        if ddp_model is None:  # one process: the model itself (with loss terms, the SiT and their heads)
            ddp_model = ModelWithTerms(model, terms) if terms else model
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")  # a pass-through unless fp16
        return cls(model=model, ddp_model=ddp_model, ema=ema, opt=opt, scaler=scaler, transport=transport,
                   device=device, vae=vae, from_features=from_features, precision=precision,
                   ema_decay=ema_decay, max_grad_norm=max_grad_norm, sharding=sharding, terms=tuple(terms),
                   lr_schedule=lr_schedule, objective=objective)

    def trained_parameters(self) -> list[torch.nn.Parameter]:
        """What AdamW updates and clipping sees: the SiT's parameters, then the loss terms'."""
        return list(self.model.parameters()) + term_parameters(self.terms)


@dataclass
class StepResult:
    """A step's denoising loss (0-dim, on the device), the gradient norm before clipping, each term's mean."""
    loss: torch.Tensor
    grad_norm: Optional[torch.Tensor] = None
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


@torch.no_grad()
def training_latents(step: TrainStep, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """What the model learns, (N, C, L, L), from a batch's inputs: [images (N, 3, H, W) in [-1, 1]] encoded
    (pixels without a VAE) or, with from_features, the cached posterior [mean, std] (N, C, L, L) each, drawn
    with the same torch.randn as encoding: training from features equals training from images."""
    device = step.device
    if step.from_features:
        space = as_latent_space(step.vae, none=recorded_latent_space(None))
        mean, std = (tensor.to(device, non_blocking=True) for tensor in inputs[:2])  # [2:]: the terms'
        return space.sample_posterior(mean, std)
    (images,) = inputs
    images = images.to(device, non_blocking=True)
    return as_latent_space(step.vae).encode(images, sample=True, precision=step.precision)  # pixels: images


def train_step(step: TrainStep, inputs: Sequence[torch.Tensor], labels: torch.Tensor) -> StepResult:
    """One optimisation step on a batch (see training_latents) with labels (N,), under the --precision
    autocast; with max_grad_norm the gradients are clipped (the norm before is returned); with an lr
    schedule AdamW's first group takes this step's lr first."""
    latents = training_latents(step, inputs)
    labels = labels.to(step.device, non_blocking=True)
    term_inputs = [term.batch_inputs(inputs, step.device, step.precision) for term in step.terms]
    with autocast(step.precision, step.device):
        if step.objective is not None:
            per_sample, logged = step.objective.losses(step, latents, labels)
            loss = total = per_sample.mean()
            term_losses = {name: value.mean() for name, value in logged.items()}
        elif not step.terms:
            loss = step.transport.training_losses(step.ddp_model, latents, dict(y=labels))["loss"].mean()
            total, term_losses = loss, {}
        else:
            loss, total, term_losses = losses_with_terms(step, latents, labels, term_inputs)
    step.opt.zero_grad(set_to_none=True)
    step.scaler.scale(total).backward()
    grad_norm = None
    if step.max_grad_norm is not None:
        step.scaler.unscale_(step.opt)
        grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(step.trained_parameters(), step.max_grad_norm))
    if step.lr_schedule is not None:
        step.opt.param_groups[0]["lr"] = step.lr_schedule.lr(step.steps_done)
    step.scaler.step(step.opt)
    step.scaler.update()
    step.steps_done += 1
    update_ema(step.ema, step.model, decay=step.ema_decay)
    return StepResult(loss, grad_norm, term_losses)


def losses_with_terms(step: TrainStep, latents: torch.Tensor, labels: torch.Tensor,
                      term_inputs: list) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(the transport's loss, the optimised total, each term's loss by name) of one forward of the
    model with its terms' heads. The transport draws noise and t exactly as without terms."""
    heads = {}

    def output_only(x, t, **kwargs):
        output, heads_out = step.ddp_model(x, t, **kwargs)
        heads.update(heads_out)
        return output

    out = step.transport.training_losses(output_only, latents, dict(y=labels))
    loss = total = out["loss"].mean()
    named = {}
    for term, ready in zip(step.terms, term_inputs):
        view = StepView(output=out["pred"], x_t=out["x_t"], t=out["t"], target=out["target"], latents=latents,
                        labels=labels, head=heads.get(term.name), inputs=ready)
        for name, value in term.losses(view).items():
            named[name] = value.mean()
            total = total + term.weight * named[name]
    return loss, total, named
