"""Training SiT: train.py's library, one concern per module.

settings    TrainConfig, resolved once from the flags and the checkpoint; the checks before heavy work
experiment  experiment folders, which checkpoint to start from, wandb
data        the image folder or cached latents, and the resumable loader
network     the SiT to train (fresh, resumed or fine-tuned), DDP, EMA and optimizer -> a TrainStep
step        one training step (latents -> loss -> AdamW with GradScaler and clipping -> EMA)
terms       loss terms beside the transport loss (StepView, LossTerm, ModelWithTerms: what DDP wraps)
repa        representation alignment as a loss term: the projector (its head) and the alignment loss
registry    the features a run can switch on (loss terms), one table
ema, optimizer, rng, signals, monitor   EMA update; AdamW and GradScaler; RNG state; SIGTERM; loss and divergence
decoder     the VAE a run holds and when it is loaded
preview, fid   EMA preview grids; FID while training
loop        the training loop and its checkpoints
launch      plan_training (checks, no heavy work) and run_training (join the ranks, train)
"""
