"""benchmarks/memory_model.py and benchmarks/memory.py: memory per GPU of DDP and FSDP training, from
closed forms (model state) and from the tensors autograd saves (activations; fake equals real)."""
import os
import sys

import pytest

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import memory as memory_script  # noqa: E402  (benchmarks/memory.py)
from memory_model import ParameterCounts, activation_memory, state_memory  # noqa: E402

XL = dict(input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16, num_classes=1000)
TINY = dict(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=3)


def block_parameters(width: int) -> int:
    """qkv, proj, fc1, fc2 (mlp ratio 4) and adaLN (6 x width) linears, weights and biases."""
    return sum(width * out + out for out in (3 * width, width, 4 * width)) + (4 * width * width + width) \
        + (width * 6 * width + 6 * width)


def test_sit_xl_2_parameter_counts():
    counts = ParameterCounts.of(XL)
    assert counts.total == 675_129_632  # SiT-XL/2: 675M parameters
    assert counts.total - counts.trainable == 256 * 1152  # the frozen pos_embed
    assert counts.block == block_parameters(1152)
    assert counts.root == counts.total - 28 * counts.block


def test_model_state_per_gpu_closed_forms():
    counts = ParameterCounts(total=1000, trainable=900, block=200, root=200)
    one = state_memory(counts, 1, "ddp", "bf16")
    assert one == dict(weights=4000, gradients=3600, optimizer=7200, ema=4000, communication=0)
    assert state_memory(counts, 8, "ddp", "bf16") == dict(one, communication=3600)  # DDP's gradient buckets
    fsdp = state_memory(counts, 8, "fsdp", "bf16")
    assert {key: fsdp[key] for key in one if key != "communication"} == dict(weights=500, gradients=450, optimizer=900,
                                                                             ema=500)
    assert fsdp["communication"] == 2 * 200 * (2 + 2 + 4) + 2 * 200  # two bf16 blocks, their grads and fp32 reduction
    assert state_memory(counts, 8, "fsdp", "fp32")["communication"] == 2 * 200 * (4 + 4) + 4 * 200


@pytest.mark.parametrize("precision, sharding", [("fp32", "ddp"), ("bf16", "ddp"), ("bf16", "fsdp"), ("fp16", "fsdp")])
def test_fake_tensor_activations_equal_real_ones(precision, sharding):
    for checkpointing in (False, True):
        fake = activation_memory(TINY, 3, precision, sharding, checkpointing, fake=True)
        assert fake == activation_memory(TINY, 3, precision, sharding, checkpointing, fake=False) > 0


def test_activation_memory_orders():
    full, checkpointed = (activation_memory(TINY, 4, "fp32", "ddp", flag) for flag in (False, True))
    assert checkpointed < full
    # autocast keeps bf16 copies of the fp32 weights for the backward; FSDP's bf16 weights need none
    assert activation_memory(TINY, 4, "bf16", "fsdp") < activation_memory(TINY, 4, "bf16", "ddp")


def test_memory_script_prints_a_row_per_sharding_and_world_size(capsys):
    memory_script.main(["--model", "SiT-S/8", "--image-size", "64", "--gpus", "1", "4", "--local-batch-size", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["sharding,", "GPUs", "weights", "grads", "AdamW", "EMA", "comm", "activ", "total"]
    rows = {line[:14].strip(): [float(value) for value in line[14:].split()] for line in lines[2:]}
    assert list(rows) == ["ddp, 1", "ddp, 4", "fsdp, 1", "fsdp, 4"]
    for values in rows.values():
        assert sum(values[:-1]) == pytest.approx(values[-1], abs=0.03)
    assert rows["fsdp, 4"][0] == pytest.approx(rows["ddp, 4"][0] / 4, abs=0.01)


def test_memory_script_models_the_latent_space_of_vae():
    from sit.errors import UsageError
    from sit.latents import latent_space

    default = memory_script.model_kwargs("SiT-S/8", 64, 10)
    pixels = memory_script.model_kwargs("SiT-S/8", 64, 10, latent_space("none"))
    assert (default["in_channels"], default["input_size"], pixels["in_channels"], pixels["input_size"]) == (4, 8, 3, 64)
    with pytest.raises(UsageError, match="multiple of 8"):
        memory_script.main(["--image-size", "60", "--vae", "ema"])
