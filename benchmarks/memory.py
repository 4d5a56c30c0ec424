"""Memory per GPU of training a SiT with DDP and with FSDP2 (--sharding fsdp), computed on the CPU.

    python benchmarks/memory.py --model SiT-XL/2 --gpus 1 8 --local-batch-size 32 --precision bf16

Weights, gradients, AdamW state and EMA from the parameter counts; activations measured by running
the model's forward on fake tensors (memory_model.py beside this file says what is and is not counted).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models import MODEL_SHAPES, model_design  # noqa: E402
from sit.cli import DefaultsInHelp, positive_int, run_main  # noqa: E402
from sit.latents import LatentSpace, latent_space  # noqa: E402
from sit.speed import PRECISIONS  # noqa: E402
from memory_model import MemoryEstimate, training_memory  # noqa: E402  (benchmarks/memory_model.py)
from sit.training.sharding import SHARDINGS  # noqa: E402

# MemoryEstimate field -> column heading
COLUMNS = {"weights": "weights", "gradients": "grads", "optimizer": "AdamW", "ema": "EMA", "communication": "comm",
           "activations": "activ"}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=DefaultsInHelp)
    parser.add_argument("--model", choices=list(MODEL_SHAPES), default="SiT-XL/2", help="the SiT whose memory is computed")
    parser.add_argument("--image-size", type=positive_int, default=256, help="a multiple of the VAE's downsampling")
    parser.add_argument("--vae", type=str, default="ema",
                        help="the latent space trained on (train.py --vae: its channels and downsampling)")
    parser.add_argument("--num-classes", type=positive_int, default=1000, help="classes of the label embedding")
    parser.add_argument("--gpus", type=positive_int, nargs="+", default=[1, 8], help="world sizes to show")
    parser.add_argument("--local-batch-size", type=positive_int, default=32, help="images per GPU and step")
    parser.add_argument("--precision", choices=list(PRECISIONS), default="bf16", help="as train.py's --precision")
    parser.add_argument("--grad-checkpointing", action="store_true", help="as train.py's --grad-checkpointing")
    return parser.parse_args(argv)


def model_kwargs(name: str, image_size: int, num_classes: int, space: Optional[LatentSpace] = None) -> dict:
    """SiT constructor arguments of a --model on the latents of `space` (default: SD-VAE's)."""
    space = space or latent_space("ema")
    return dict(input_size=space.input_size(image_size), in_channels=space.channels, **model_design(name),
                num_classes=num_classes)


def gib(value: int) -> str:
    return f"{value / 2 ** 30:7.2f}"


def format_row(label: str, estimate: MemoryEstimate) -> str:
    return f"{label:14s} " + " ".join(gib(getattr(estimate, column)) for column in COLUMNS) + f" {gib(estimate.total)}"


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    space = latent_space(args.vae)
    space.check_image_size(args.image_size)
    kwargs = model_kwargs(args.model, args.image_size, args.num_classes, space)
    print(f"{args.model} at {args.image_size}px, {args.local_batch_size} images per GPU, --precision {args.precision}"
          f"{', --grad-checkpointing' if args.grad_checkpointing else ''}; GiB per GPU")
    print(f"{'sharding, GPUs':14s} " + " ".join(f"{heading:>7s}" for heading in COLUMNS.values()) + f" {'total':>7s}")
    for sharding in SHARDINGS:
        for world_size in args.gpus:
            estimate = training_memory(kwargs, world_size, sharding, args.precision, args.local_batch_size,
                                       args.grad_checkpointing)
            print(format_row(f"{sharding}, {world_size}", estimate), flush=True)


if __name__ == "__main__":
    sys.exit(run_main(main, "memory.py"))
