"""A hostile world, injected on purpose: kills during writes, full disks (a small tmpfs), zip bombs and
forged array headers, absurd model configs, non-finite weights and samples, malformed train
checkpoints and feature folders, two writers on one folder, and stop signals under torchrun.

Every case ends the same way: one line naming the file or flag, a non-zero exit (or a clean 0 for a
stop signal after the checkpoint), nothing lost, nothing mixed. FIFOs and symlink loops in data folders
are the shared image reader's (issue 17) and are tested with it.

Full disks use a real tmpfs mounted for the test (root only); where mounting is impossible those tests
are skipped with the reason.
"""
import fcntl
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import zipfile
from typing import Optional

import numpy as np
import pytest
import torch

from conftest import REPO, assert_names, make_image_folder
import download
import models
import sit.archives
from sit.archives import zip_problem
from sit.checkpoint import TrainCheckpoint, check_train_checkpoint, load_model, model_config_problem
from sit.data.features import LatentFeatureDataset, open_arrays, open_token_array, read_meta, write_meta
from sit.errors import RunFailure, UsageError
from sit.files import (NoSpaceLeft, atomic_json, atomic_torch_save, atomic_write, held_by_another_process,
                       preallocate, remove_temporaries, this_host)
from sit.generation import generate_latents
from sit.config import GuidanceConfig
from sit.locks import LOCK_FILE, acquire_folder_lock, folder_locks_released, read_holder
from sit.log import create_logger
from sit.metrics.errors import MetricInputError
from sit.metrics.npz import open_npz, open_npz_images
from sit.training.experiment import checkpoint_to_start_from
from sit.training.rng import gather_rng_states
from sit.training.signals import StopSignal

TINY_SIT = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=1, num_heads=2, num_classes=2)
PIXEL_TRAIN = ["--vae", "none", "--image-size", "8", "--model", "SiT-S/2", "--model-config",
               json.dumps({"depth": 1, "hidden_size": 32, "num_heads": 2}), "--num-classes", "2",
               "--global-batch-size", "2", "--log-every", "1", "--num-workers", "0", "--sample-every", "100000"]


def script_env() -> dict:
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def script(name: str, *args: str, torchrun: int = 0) -> list:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"] if torchrun \
        else [sys.executable]
    return [*launcher, os.path.join(REPO, name), *args]


def run(command: list, cwd, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=script_env(), capture_output=True, text=True, timeout=timeout)


def one_error_line(result: subprocess.CompletedProcess, script_name: str) -> str:
    """The single `<script>: error: ...` line of stderr, asserting that no worker printed a traceback (under
    torchrun, torchrun's own report of a failed worker, a ChildFailedError, is the only one allowed)."""
    assert "--- Logging error ---" not in result.stderr, result.stderr[-3000:]
    for block in result.stderr.split("Traceback (most recent call last):")[1:]:
        assert "ChildFailedError" in block, result.stderr[-3000:]
    marker = f"{script_name}: error: "
    lines = [line[line.index(marker):] for line in result.stderr.splitlines() if marker in line]  # after a progress bar
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def leftovers(folder) -> list:
    """Temporary files anywhere under folder."""
    return [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names if name.startswith(".tmp-")]


def dead_pid() -> int:
    """The id of a process that has just ended (on Linux ids are not reused at once)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def tiny_model_state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = models.SiT(**TINY_SIT)
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter, std=0.05)
    return model


def sampling_checkpoint(path, model=None, **extra) -> str:
    model = model or tiny_model_state()
    state = model.state_dict()
    torch.save({"model": state, "ema": state, "args": {"vae": "none", "path_type": "Linear", "prediction": "velocity"},
                "model_config": model.config, **extra}, path)
    return str(path)


def train_checkpoint(path, steps: int = 1, **override) -> dict:
    """A real resumable checkpoint of a tiny pixel-space SiT after `steps` AdamW steps."""
    model = tiny_model_state()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for _ in range(steps):
        model(torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([0, 1])).square().mean().backward()
        optimizer.step()
    settings = {"vae": "none", "image_size": 8, "num_classes": 2, "global_batch_size": 2}
    checkpoint = TrainCheckpoint(model=model.state_dict(), ema=model.state_dict(), opt=optimizer.state_dict(),
                                 settings=settings, model_config=model.config, train_steps=steps,
                                 rng=gather_rng_states(torch.device("cpu"))).to_dict()
    checkpoint.update(override)
    torch.save(checkpoint, path)
    return checkpoint


@pytest.fixture
def small_disk(tmp_path):
    """Mount a fresh tmpfs of `size` bytes (returns its path); unmounted after the test. Skips where this
    machine cannot mount one (not root, or no mount permission in a container)."""
    mounted = []

    def mount(size: int, name: str = "disk") -> str:
        path = tmp_path / name
        path.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or 'mount failed'}): full disks untested")
        mounted.append(str(path))
        return str(path)

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", path], capture_output=True)


def fill(folder: str) -> None:
    """Write a filler file until the file system holding folder is full."""
    with open(os.path.join(folder, "filler"), "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError:
            pass


#################################################################################
#               Leftovers: temporary files know their owner                     #
#################################################################################

def test_temporary_names_carry_their_owner_and_only_dead_owners_files_are_removed(tmp_path):
    seen = []
    atomic_write(str(tmp_path / "out.txt"), lambda path: (seen.append(path), open(path, "w").write("x")), suffix=".txt")
    name = os.path.basename(seen[0])
    assert name.startswith(f".tmp-{os.getpid()}@{this_host()}~")  # its writer: this process on this host
    live = subprocess.Popen(["sleep", "60"])
    try:
        names = {"live": f".tmp-{live.pid}@{this_host()}~abcdefgh.pt", "dead": f".tmp-{dead_pid()}@{this_host()}~abcdefgh.pt",
                 "mine": f".tmp-{os.getpid()}@{this_host()}~abcdefgh.pt", "legacy": ".tmp-abcdefgh.pt",
                 "other_host": ".tmp-1@another-host.example~abcdefgh.pt", "other_suffix": f".tmp-{dead_pid()}@{this_host()}~x.png"}
        for file_name in names.values():
            open(tmp_path / file_name, "wb").close()
        assert [held_by_another_process(names[key]) for key in ("live", "dead", "mine", "legacy", "other_host")] == \
            [True, False, False, False, True]
        assert remove_temporaries(str(tmp_path), ".pt") == 3
        assert sorted(os.listdir(tmp_path)) == sorted(["out.txt", names["live"], names["other_host"], names["other_suffix"]])
    finally:
        live.kill()
        live.wait()


def sleeping_before_rename(suffix: str, skip: int = 0) -> str:
    """Python code that makes the atomic_write of the (skip+1)-th file whose temporary name ends in `suffix`
    stop (sleep) after writing it whole, just before the rename: a SIGKILL then leaves it behind."""
    return ("import time\n"
            "original, seen = os.replace, []\n"
            "def slow(path, destination):\n"
            f"    if os.path.basename(path).startswith('.tmp-') and path.endswith({suffix!r}):\n"
            "        seen.append(path)\n"
            f"        if len(seen) == {skip + 1}:\n"
            "            print('WRITING', path, flush=True); time.sleep(600)\n"
            "    original(path, destination)\n"
            "os.replace = slow\n")


def start_patched(code: str, script_name: str, args: list, cwd) -> subprocess.Popen:
    """Run a script in a fresh interpreter after `code` (sleeping_before_rename's patch)."""
    runner = (f"import os, sys, runpy\nsys.path.insert(0, {REPO!r})\n{code}"
              f"sys.argv = [{script_name!r}] + {args!r}\n"
              f"runpy.run_path({os.path.join(REPO, script_name)!r}, run_name='__main__')\n")
    return subprocess.Popen([sys.executable, "-c", runner], cwd=cwd, env=script_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def kill_when_writing(process: subprocess.Popen) -> str:
    """SIGKILL the process once it reports a write in progress; returns the temporary file's path."""
    for line in process.stdout:
        if "WRITING " in line:  # (a progress bar on stderr may precede it on the same line)
            process.kill()
            process.wait()
            return line.split("WRITING ", 1)[1].strip()
    raise AssertionError(f"the process ended (exit {process.wait()}) without writing")


def checkpoint_tensors(path: str) -> dict:
    checkpoint = download.load_checkpoint(path)
    return {f"{part}.{name}": tensor for part in ("model", "ema") for name, tensor in checkpoint[part].items()}


@pytest.mark.slow
def test_a_kill_during_a_checkpoint_write_leaves_nothing_after_resume_and_the_result_is_bit_identical(tmp_path):
    data = make_image_folder(str(tmp_path / "data"), num_classes=2, per_class=2, size=8)
    common = ["--data-path", data, *PIXEL_TRAIN, "--ckpt-every", "2", "--max-steps", "4"]
    straight = run(script("train.py", *common, "--results-dir", str(tmp_path / "straight")), tmp_path)
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = start_patched(sleeping_before_rename(".pt", skip=1), "train.py",
                           [*common, "--results-dir", str(tmp_path / "killed")], tmp_path)
    temporary = kill_when_writing(killed)  # the second checkpoint (step 4), whole, under its temporary name
    experiment = os.path.dirname(os.path.dirname(temporary))
    assert os.path.isfile(temporary)
    assert sorted(os.listdir(os.path.dirname(temporary))) == sorted(["0000002.pt", os.path.basename(temporary)])
    resumed = run(script("train.py", "--data-path", data, "--resume", "--results-dir", str(tmp_path / "killed"),
                         "--max-steps", "4", "--num-workers", "0"), tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "removed 1 unfinished files a killed run left" in resumed.stdout
    assert "owner.lock was left by process" in resumed.stdout  # the killed run's lock, taken over
    assert leftovers(experiment) == [] and not os.path.exists(os.path.join(experiment, LOCK_FILE))
    (straight_dir,) = os.listdir(tmp_path / "straight")
    reference = checkpoint_tensors(str(tmp_path / "straight" / straight_dir / "checkpoints" / "0000004.pt"))
    result = checkpoint_tensors(os.path.join(experiment, "checkpoints", "0000004.pt"))
    assert reference.keys() == result.keys() and all(torch.equal(reference[key], result[key]) for key in reference)


@pytest.mark.slow
def test_kills_while_writing_an_npz_or_a_feature_block_leave_nothing_and_reruns_are_bit_identical(tmp_path, tiny_vae):
    ckpt = sampling_checkpoint(tmp_path / "model.pt")
    flags = ["ODE", "--ckpt", ckpt, "--sampling-method", "euler", "--num-sampling-steps", "2", "--num-fid-samples", "6",
             "--per-proc-batch-size", "2"]
    killed = start_patched(sleeping_before_rename(".npz"), "sample_ddp.py", [*flags, "--sample-dir", "killed"], tmp_path)
    temporary = kill_when_writing(killed)
    assert os.path.dirname(temporary) == str(tmp_path / "killed")
    rerun = run(script("sample_ddp.py", *flags, "--sample-dir", "killed"), tmp_path)
    straight = run(script("sample_ddp.py", *flags, "--sample-dir", "straight"), tmp_path)
    assert rerun.returncode == straight.returncode == 0, rerun.stderr[-2000:]
    assert leftovers(tmp_path / "killed") == [] and not os.path.exists(temporary)
    (npz,) = [name for name in os.listdir(tmp_path / "killed") if name.endswith(".npz")]
    assert open(tmp_path / "killed" / npz, "rb").read() == open(tmp_path / "straight" / npz, "rb").read()

    data = make_image_folder(str(tmp_path / "data"), num_classes=2, per_class=3, size=16)
    extract = ["--data-path", data, "--image-size", "16", "--vae", tiny_vae, "--block-size", "2", "--batch-size", "2",
               "--num-workers", "0"]
    killed = start_patched(sleeping_before_rename(".txt", skip=1), "extract_features.py",
                           [*extract, "--features-path", "killed-features"], tmp_path)
    kill_when_writing(killed)  # the second block's marker: the block is written, not yet marked done
    rerun = run(script("extract_features.py", *extract, "--features-path", "killed-features"), tmp_path)
    straight = run(script("extract_features.py", *extract, "--features-path", "straight-features"), tmp_path)
    assert rerun.returncode == straight.returncode == 0, rerun.stderr[-2000:]
    assert "1 of this rank's 3 blocks already done" in rerun.stdout and leftovers(tmp_path / "killed-features") == []
    for name in ("mean.npy", "std.npy", "labels.npy"):
        assert open(tmp_path / "killed-features" / name, "rb").read() == open(tmp_path / "straight-features" / name, "rb").read()


def test_experiment_with_no_checkpoint_is_never_silently_skipped_by_resume(tmp_path):
    results = tmp_path / "results"
    older = results / "000-SiT-S-2-Linear-velocity-None" / "checkpoints"
    older.mkdir(parents=True)
    (older / "0000002.pt").write_bytes(b"x")
    (results / "001-SiT-S-2-Linear-velocity-None").mkdir()  # died before its first checkpoint
    with pytest.raises(UsageError) as error:
        checkpoint_to_start_from(None, "newest", str(results))
    newest, older_folder = results / "001-SiT-S-2-Linear-velocity-None", results / "000-SiT-S-2-Linear-velocity-None"
    assert_names(error.value, "--resume", str(newest), f"--resume {older_folder}")
    assert checkpoint_to_start_from(None, str(older_folder), str(results)) == str(older / "0000002.pt")


#################################################################################
#                                  Full disks                                   #
#################################################################################

def test_a_full_disk_is_one_line_naming_the_file_and_leaves_no_temporary(small_disk):
    disk = small_disk(1 << 20)
    target = os.path.join(disk, "checkpoints", "0000002.pt")
    with pytest.raises(NoSpaceLeft) as error:  # torch.save's "unexpected pos", recognised
        atomic_torch_save({"weights": torch.zeros(1 << 19)}, target)
    assert_names(error.value, target, "free")
    with pytest.raises(NoSpaceLeft) as error:
        atomic_json(os.path.join(disk, "big.json"), {"values": list(range(300_000))})
    assert_names(error.value, os.path.join(disk, "big.json"))
    assert leftovers(disk) == [] and not os.path.exists(target)
    with pytest.raises(NoSpaceLeft) as error:
        TrainCheckpoint(model={"w": torch.zeros(1 << 19)}, ema={}, opt={}, settings={}, model_config={},
                        train_steps=4).save(os.path.join(disk, "0000004.pt"))
    assert_names(error.value, os.path.join(disk, "0000004.pt"), "3.0 MiB")  # estimated before writing
    source = os.path.join(os.path.dirname(disk), "published.pt")  # beside the small disk, on the real one
    with open(source, "wb") as handle:
        handle.write(os.urandom(2 << 20))
    with pytest.raises(NoSpaceLeft) as error:  # exit 1, not the download's 2
        download.download_url(pathlib.Path(source).as_uri(), os.path.join(disk, "published.pt"), progress=False)
    assert_names(error.value, "published.pt")
    assert leftovers(disk) == [] and not os.path.exists(os.path.join(disk, "published.pt"))


def test_feature_arrays_are_preallocated_so_a_full_disk_is_no_sigbus(small_disk):
    disk = small_disk(1 << 20)
    meta = dict(image_size=64, vae="ema", num_images=200, classes=["a"], dtype="float32", block_size=8,
                latent_shape=[4, 8, 8], complete=False)  # 2 x 200 x 2 x 256 x 4 bytes: 800 KiB... plus labels
    os.makedirs(os.path.join(disk, "a"))
    with pytest.raises(NoSpaceLeft) as error:
        open_arrays(os.path.join(disk, "a"), dict(meta, num_images=1000), "w+")
    assert_names(error.value, os.path.join(disk, "a"), "3.9 MiB")  # estimated before writing
    sparse = os.path.join(disk, "sparse.npy")
    with open(sparse, "wb") as handle:
        handle.truncate(4 << 20)  # a sparse file, as numpy's memory map makes one: writes to it would SIGBUS
    with pytest.raises(NoSpaceLeft) as error:
        preallocate(sparse)
    assert_names(error.value, sparse)
    os.remove(sparse)
    os.makedirs(os.path.join(disk, "b"))
    mean, std, labels = open_arrays(os.path.join(disk, "b"), dict(meta, num_images=50), "w+")
    mean[:], labels[:] = 1.0, 1  # every block of the map is reserved: these writes cannot fault
    mean.flush()
    assert os.stat(os.path.join(disk, "b", "mean.npy")).st_blocks * 512 >= 50 * 2 * 256 * 4


def test_log_file_on_a_full_disk_warns_once_and_the_console_keeps_logging(small_disk, capsys):
    disk = small_disk(256 << 10)
    logger = create_logger(disk, is_main=True)
    fill(disk)
    for step in range(50):
        logger.info(f"(step={step:07d}) " + "x" * 2000)
    captured = capsys.readouterr()
    assert "--- Logging error ---" not in captured.err and "Traceback" not in captured.err
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning: cannot write")]
    assert len(warnings) == 1
    assert_names(warnings[0], os.path.join(disk, "log.txt"), "console")
    assert captured.out.count("(step=") == 50


@pytest.mark.slow
def test_train_on_a_full_disk_stops_with_one_line_at_start_and_at_a_checkpoint(tmp_path, small_disk):
    data = make_image_folder(str(tmp_path / "data"), num_classes=2, per_class=2, size=8)
    tiny = small_disk(64 << 10, "tiny")
    result = run(script("train.py", "--data-path", data, *PIXEL_TRAIN[:-2], "--model-config",
                        json.dumps({"depth": 4, "hidden_size": 64, "num_heads": 2}), "--results-dir", tiny), tmp_path)
    assert result.returncode == 1
    line = one_error_line(result, "train.py")
    assert_names(line, tiny, "free")
    assert os.listdir(tiny) == []  # refused before anything was written
    # room for the first checkpoint, then the disk fills up before the second
    disk = small_disk(8 << 20, "disk")
    process = subprocess.Popen(script("train.py", "--data-path", data, *PIXEL_TRAIN, "--results-dir", disk,
                                      "--ckpt-every", "2", "--max-steps", "100000"), cwd=tmp_path, env=script_env(),
                               text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for output in process.stdout:
        if "Saved checkpoint" in output:
            fill(disk)
            break
    stdout, stderr = process.communicate(timeout=120)
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    assert result.returncode == 1
    line = one_error_line(result, "train.py")
    # the disk is filled on the log line of step 2's save, which comes before that save's latest.txt: whichever
    # write found it full (step 2's latest.txt or step 4's checkpoint) is the file named
    assert re.search(rf"{re.escape(disk)}/000-[^ ]*/(checkpoints/0000004\.pt|latest\.txt)", line), line
    assert stderr.count("warning: cannot write") <= 1
    assert leftovers(disk) == []


@pytest.mark.slow
def test_sample_ddp_and_extract_features_on_a_full_disk_print_one_line(tmp_path, small_disk, tiny_vae):
    ckpt = sampling_checkpoint(tmp_path / "model.pt")
    disk = small_disk(64 << 10)
    result = run(script("sample_ddp.py", "ODE", "--ckpt", ckpt, "--sampling-method", "euler", "--num-sampling-steps", "2",
                        "--num-fid-samples", "2000", "--per-proc-batch-size", "4", "--sample-dir", disk), tmp_path,
                 timeout=300)
    assert result.returncode == 1
    assert_names(one_error_line(result, "sample_ddp.py"), disk, "2,000")
    # enough room at the start, full while sampling (2 processes): one line, not a traceback per rank
    roomy = small_disk(2 << 20, "roomy")
    with open(os.path.join(roomy, "filler"), "wb") as handle:
        handle.write(b"\0" * ((2 << 20) - (1400 << 10)))
    result = run(script("sample_ddp.py", "ODE", "--ckpt", ckpt, "--sampling-method", "euler", "--num-sampling-steps", "2",
                        "--num-fid-samples", "400", "--per-proc-batch-size", "8", "--sample-dir", roomy, torchrun=2),
                 tmp_path, timeout=300)
    assert result.returncode != 0
    assert_names(one_error_line(result, "sample_ddp.py"), roomy)
    data = make_image_folder(str(tmp_path / "data"), num_classes=2, per_class=8, size=128)
    features = small_disk(96 << 10, "features")  # the arrays of 16 images of 128 px take 512 KiB
    result = run(script("extract_features.py", "--data-path", data, "--features-path", os.path.join(features, "f"),
                        "--image-size", "128", "--vae", tiny_vae, "--num-workers", "0", "--float32"), tmp_path)
    assert result.returncode == 1  # not -7 (SIGBUS)
    assert_names(one_error_line(result, "extract_features.py"), features, "16 images")


#################################################################################
#                        Hostile checkpoints and arrays                         #
#################################################################################

def deflated_record(archive_path: str, name: str, claimed: int, head: bytes = b"") -> None:
    """Append to a zip archive a deflated record of 3 MiB (head, then zeros) whose headers claim `claimed`
    bytes: what a real 3 GiB of zeros compresses to, made without spending a minute deflating them."""
    with zipfile.ZipFile(archive_path, "a", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(name, head + b"\0" * ((3 << 20) - len(head)))
    with zipfile.ZipFile(archive_path) as archive:
        offset = archive.getinfo(name).header_offset
    raw = bytearray(open(archive_path, "rb").read())
    central = raw.rindex(b"PK\x01\x02")  # the last record's central directory entry
    for field in (offset + 22, central + 24):  # uncompressed size: local header, central directory
        raw[field: field + 4] = min(claimed, 0xFFFFFFFF).to_bytes(4, "little")
    open(archive_path, "wb").write(bytes(raw))


def test_a_checkpoint_that_inflates_to_3_gib_is_refused_from_its_central_directory(tmp_path, monkeypatch):
    path = str(tmp_path / "bomb.pt")
    torch.save({"w": torch.zeros(4)}, path)
    deflated_record(path, "bomb/data/1", (3 << 30) - 1)  # claims 3 GiB
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: pytest.fail("torch.load ran before the file was judged"))
    with pytest.raises(download.CheckpointError) as error:
        download.load_checkpoint(path)
    assert_names(error.value, path, "bomb/data/1", "3.0 GiB")
    stored = str(tmp_path / "stored.pt")
    torch.save({"w": torch.zeros(1 << 16)}, stored)
    assert zip_problem(stored, whole_in_memory=True) is None
    monkeypatch.setattr(sit.archives, "available_memory", lambda: 1000)
    assert zip_problem(stored, whole_in_memory=True).startswith("loading it takes 256.")


def test_an_npz_claiming_3_gib_of_images_is_refused_before_any_read(tmp_path):
    forged = str(tmp_path / "forged.npz")  # a real header claiming 20,000 images of 256 x 256, 1 KiB of data
    header = tmp_path / "arr_0.npy"
    with open(header, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {"descr": "|u1", "fortran_order": False, "shape": (16384, 256, 256, 3)})
        handle.write(b"\0" * 1024)
    with zipfile.ZipFile(forged, "w") as archive:
        archive.write(header, "arr_0.npy")
    for read in (open_npz_images, lambda path: open_npz(path).__enter__()):
        with pytest.raises(MetricInputError) as error:
            read(forged)
        assert_names(error.value, forged, "'arr_0'", "3.0 GiB", "1.0 KiB")  # claimed, stored
    bomb = str(tmp_path / "bomb.npz")
    with zipfile.ZipFile(bomb, "w") as archive:
        pass
    head = tmp_path / "head.npy"
    with open(head, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {"descr": "|u1", "fortran_order": False, "shape": (16384, 256, 256, 3)})
    deflated_record(bomb, "arr_0.npy", 3 << 30, head=head.read_bytes())
    with pytest.raises(MetricInputError) as error:
        open_npz_images(bomb)
    assert_names(error.value, bomb, "arr_0.npy", "3.0 GiB")


@pytest.mark.parametrize("change, words", [  # the key and value named, and the bound where one is broken
    ({"depth": 1_000_000}, ["depth 1000000", "[1, 1024]"]),
    ({"hidden_size": 10 ** 9}, ["hidden_size 1000000000", "[1, 65536]"]),
    ({"num_classes": 10 ** 12}, ["num_classes 1000000000000", "[1, 1e+07]"]),
    ({"input_size": 10 ** 6}, ["input_size 1000000", "[1, 4096]"]),
    ({"num_heads": 0}, ["num_heads 0", "[1, 4096]"]),
    ({"depth": "2"}, ["depth", "'2'"]),
    ({"depth": 2.0}, ["depth", "2.0"]),
    ({"learn_sigma": 1}, ["learn_sigma", "1"]),
    ({"mlp_ratio": float("nan")}, ["mlp_ratio nan"]),
    ({"evil": 1}, ["evil", "unknown"]),
    ({"num_heads": 3}, ["hidden_size 32", "num_heads 3"]),
    ({"depth": 1024, "hidden_size": 65536, "num_heads": 1}, ["79,178,749,444,120 parameters", "288.1 TiB"]),
])
def test_an_absurd_stored_model_config_is_refused_before_anything_is_allocated(change, words, tmp_path, monkeypatch):
    model = tiny_model_state()
    path = sampling_checkpoint(tmp_path / "absurd.pt", model=model)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["model_config"] = {**model.config, **change}
    torch.save(checkpoint, path)
    real_sit = models.SiT

    def shapes_only(*args, **kwargs):  # the parameter count builds SiT on the meta device: no memory
        if torch.empty(0).device.type != "meta":
            pytest.fail("a model was built")
        return real_sit(*args, **kwargs)

    monkeypatch.setattr(models, "SiT", shapes_only)
    with pytest.raises(download.CheckpointError) as error:
        load_model(path)
    assert_names(error.value, path, *words)


def test_a_sane_model_config_has_no_problem():
    assert model_config_problem({"depth": 1, "hidden_size": 32, "num_heads": 2}) is None


def test_non_finite_weights_are_refused_at_load_naming_the_tensor(tmp_path):
    model = tiny_model_state()
    with torch.no_grad():
        model.blocks[0].mlp.fc2.weight[3, 1] = float("nan")
        model.final_layer.linear.bias[0] = float("inf")
    path = sampling_checkpoint(tmp_path / "nan.pt", model=model)
    with pytest.raises(download.CheckpointError) as error:
        load_model(path)
    assert_names(error.value, path, "blocks.0.mlp.fc2.weight (NaN)")  # the first bad tensor


def test_a_sampler_whose_values_turn_non_finite_stops_naming_the_step_and_t():
    model = tiny_model_state()
    calls = []
    forward = model.forward

    def blows_up_at_the_third_call(x, t, y):
        calls.append(float(t[0]))
        out = forward(x, t, y)
        return out * float("inf") if len(calls) == 3 else out

    model.forward = blows_up_at_the_third_call
    from sit.config import ODEConfig, TransportConfig, build_sample_fn
    sample_fn = build_sample_fn(TransportConfig(), ODEConfig(sampling_method="euler", num_steps=5))
    z, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
    with pytest.raises(RunFailure) as error:
        generate_latents(sample_fn, model, z, y, GuidanceConfig(), stop_on_non_finite=True)
    assert_names(error.value, f"step 3 of {len(calls)}", f"t = {calls[2]:.4f}")
    calls.clear()
    model.forward = forward
    assert torch.isfinite(generate_latents(sample_fn, model, z, y, GuidanceConfig(), stop_on_non_finite=True)).all()


@pytest.mark.slow
def test_sample_ddp_with_exploding_finite_weights_stops_with_one_line(tmp_path):
    model = tiny_model_state()
    with torch.no_grad():
        model.final_layer.linear.weight.fill_(3e38)  # finite, but every output overflows
        model.final_layer.adaLN_modulation[-1].bias.fill_(1.0)
    path = sampling_checkpoint(tmp_path / "explodes.pt", model=model)
    result = run(script("sample_ddp.py", "ODE", "--ckpt", path, "--sampling-method", "euler", "--num-sampling-steps", "3",
                        "--num-fid-samples", "4", "--per-proc-batch-size", "2", "--sample-dir", str(tmp_path / "s")), tmp_path)
    assert result.returncode == 1
    assert_names(one_error_line(result, "sample_ddp.py"), "images 0..1", "step 1 of 2", "t = 0.0000")


@pytest.mark.parametrize("damage, words", [  # what is wrong, with the numbers that tell it where they matter
    (lambda c: c.update(train_steps=-5), ["train_steps", "-5"]),
    (lambda c: c.update(epoch=True), ["epoch", "True"]),
    (lambda c: c["opt"]["state"][1].update(exp_avg=torch.zeros(7)),
     ["exp_avg of parameter 1", "(7,)", "(32, 3, 2, 2)"]),
    (lambda c: c["opt"].pop("param_groups"), ["optimizer state", "param_groups"]),
    (lambda c: c["opt"]["param_groups"][0].update(params=[0, 1]), ["optimizer state", "2 in all", "22 parameters"]),
    (lambda c: c.update(rng=[{"cpu": torch.zeros(3, dtype=torch.uint8)}]), ["CPU RNG state of rank 0", "5056 bytes"]),
    (lambda c: c.update(rng="seed"), ["RNG states", "list"]),
    (lambda c: c.update(model={"w": "not a tensor"}), ["model", "tensors"]),
    (lambda c: c.update(scaler={"scale": "big"}), ["loss scaler"]),
])
def test_a_malformed_train_checkpoint_is_refused_in_one_line_on_resume(damage, words, tmp_path):
    checkpoint = train_checkpoint(tmp_path / "good.pt")
    check_train_checkpoint(checkpoint, "good.pt")  # a real one passes
    damage(checkpoint)
    with pytest.raises(UsageError) as error:
        check_train_checkpoint(checkpoint, "bad.pt")
    assert_names(error.value, "bad.pt", *words)


def test_resume_refuses_absurd_counters_before_joining_the_job(tmp_path, monkeypatch):
    import train
    import sit.training.launch

    monkeypatch.setattr(sit.training.launch, "setup_distributed", lambda: pytest.fail("joined the job"))
    data = make_image_folder(str(tmp_path / "data"), num_classes=2, per_class=2, size=8)
    folder = tmp_path / "results" / "000-SiT-S-2-Linear-velocity-None" / "checkpoints"
    folder.mkdir(parents=True)
    path = folder / "0000001.pt"
    settings = {**vars(train.parse_args(["--data-path", data, *PIXEL_TRAIN])[0]), "global_batch_size": 2}
    train_checkpoint(path, settings=settings, args=settings, epoch_step=1000)
    with pytest.raises(UsageError) as error:
        train.main(["--data-path", data, "--resume", str(folder.parent), "--num-workers", "0"])
    assert_names(error.value, str(path), "epoch_step 1000", "2 batches")


def test_a_corrupt_feature_meta_is_one_line_and_allocates_nothing(tmp_path):
    folder = str(tmp_path / "features")
    os.makedirs(folder)
    meta = dict(image_size=32, vae="ema", num_images=4, classes=["a", "b"], dtype="float32", block_size=4,
                latent_shape=[4, 4, 4], complete=True)
    open_arrays(folder, meta, "w+")
    write_meta(folder, meta)
    assert read_meta(folder) == meta
    path = os.path.join(folder, "meta.json")
    cases = [  # each names meta.json, the folder to delete (the fix), and what is wrong
        ("{\"image_size\": 32,", ["JSON"]),
        (dict(meta, num_images=10 ** 9), ["num_images", "1000000000"]),
        (dict(meta, num_images=5), ["mean.npy", "(4, 2, 4, 4, 4)", "(5, 2, 4, 4, 4)"]),
        (dict(meta, latent_shape=[4, 100000, 100000]), ["latent_shape", "[4, 4, 4]"]),
        (dict(meta, dtype="object"), ["dtype", "'object'"]),
        ([1, 2], ["JSON object"]),
    ]
    for content, words in cases:
        with open(path, "w") as handle:
            handle.write(content if isinstance(content, str) else json.dumps(content))
        with pytest.raises(UsageError) as error:
            LatentFeatureDataset(folder)
        assert_names(error.value, path, f"delete {folder}", *words)


def test_feature_tokens_are_judged_with_the_other_arrays(tmp_path):
    folder = str(tmp_path / "features")
    os.makedirs(folder)
    meta = dict(image_size=32, vae="ema", num_images=4, classes=["a", "b"], dtype="float32", block_size=4,
                latent_shape=[4, 4, 4], complete=True, repa_encoder="encoder.pt", repa_tokens_shape=[16, 8])
    open_arrays(folder, meta, "w+")
    open_token_array(folder, meta, "w+")
    write_meta(folder, meta)
    assert read_meta(folder) == meta
    path, tokens = os.path.join(folder, "meta.json"), os.path.join(folder, "repa_tokens.npy")
    write_meta(folder, dict(meta, repa_tokens_shape="16x8"))
    with pytest.raises(UsageError) as error:
        LatentFeatureDataset(folder, with_tokens=True)
    assert_names(error.value, path, f"delete {folder}", "repa_tokens_shape", "'16x8'")
    write_meta(folder, dict(meta, repa_tokens_shape=[16, 9]))
    with pytest.raises(UsageError) as error:
        LatentFeatureDataset(folder, with_tokens=True)
    assert_names(error.value, "repa_tokens.npy", "(4, 2, 16, 8)", "(4, 2, 16, 9)")  # held, meta.json's
    write_meta(folder, meta)
    os.truncate(tokens, os.path.getsize(tokens) // 2)  # a copy cut short
    with pytest.raises(UsageError) as error:
        LatentFeatureDataset(folder, with_tokens=True)
    assert_names(error.value, path, "repa_tokens.npy")


#################################################################################
#                           Two runs, one place                                 #
#################################################################################

def holder_of(folder: str) -> Optional[dict]:
    """The holder named by a folder's lock file while a live process holds it, else None."""
    try:
        fd = os.open(os.path.join(folder, LOCK_FILE), os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return read_holder(fd)
    finally:
        os.close(fd)
    return None


HOLD_LOCK = ("import sys, time\nsys.path.insert(0, {repo!r})\nfrom sit.locks import acquire_folder_lock\n"
             "acquire_folder_lock({folder!r}, 'the folder', print)\nprint('HELD', flush=True)\ntime.sleep(120)\n")


def test_a_folder_has_one_writer_and_a_dead_writers_lock_is_taken_over_with_a_warning(tmp_path):
    folder = str(tmp_path / "experiment")
    os.makedirs(folder)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK.format(repo=REPO, folder=folder)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "HELD"
        assert holder_of(folder)["pid"] == holder.pid
        with pytest.raises(UsageError) as error:
            acquire_folder_lock(folder, "the experiment folder", warn=pytest.fail)
        assert_names(error.value, folder, f"process {holder.pid}", this_host(), "in use")
    finally:
        holder.kill()
        holder.wait()
    warnings = []  # killed: its lock file stays, naming a pid that no longer runs
    with folder_locks_released():
        acquire_folder_lock(folder, "the experiment folder", warn=warnings.append)
        assert holder_of(folder)["pid"] == os.getpid()
    assert len(warnings) == 1 and warnings[0].startswith("warning: ")
    assert_names(warnings[0], os.path.join(folder, LOCK_FILE), f"process {holder.pid}", this_host(), "taking it over")
    assert not os.path.exists(os.path.join(folder, LOCK_FILE))  # released on leaving the block
    with open(os.path.join(folder, LOCK_FILE), "w") as handle:
        json.dump({"pid": 1, "host": "another-host.example", "started": 0, "command": "train.py"}, handle)
    with pytest.raises(UsageError) as error:
        acquire_folder_lock(folder, "the experiment folder", warn=pytest.fail)
    assert_names(error.value, os.path.join(folder, LOCK_FILE), "another-host.example")


@pytest.mark.slow
def test_a_second_train_resume_on_a_running_experiment_is_refused_in_one_line(tmp_path):
    data = make_image_folder(str(tmp_path / "data"), num_classes=2, per_class=2, size=8)
    common = ["--data-path", data, *PIXEL_TRAIN, "--results-dir", str(tmp_path / "results")]
    assert run(script("train.py", *common, "--max-steps", "2", "--ckpt-every", "2"), tmp_path).returncode == 0
    first = subprocess.Popen(script("train.py", *common, "--resume", "--max-steps", "100000", "--ckpt-every", "100000"),
                             cwd=tmp_path, env=script_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for line in first.stdout:
            if "(step=0000004)" in line:
                break
        second = run(script("train.py", *common, "--resume", "--max-steps", "100000"), tmp_path)
        assert second.returncode == 2
        line = assert_names(one_error_line(second, "train.py"), f"process {first.pid}", "in use")
        assert re.search(r"000-[^ ]*-Linear-velocity-None ", line), line
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 0


def test_a_sample_folder_records_its_settings_and_refuses_a_rerun_with_other_weights(tmp_path):
    import sample_ddp

    ckpt = tmp_path / "model.pt"
    sampling_checkpoint(ckpt)
    flags = ["ODE", "--ckpt", str(ckpt), "--sampling-method", "euler", "--num-sampling-steps", "2", "--num-fid-samples",
             "4", "--per-proc-batch-size", "2", "--sample-dir", str(tmp_path / "samples")]
    sample_ddp.main(flags[:-4] + ["--num-fid-samples", "2"] + flags[-4:-2] + flags[-2:])  # 2 of 4 images, as a killed run
    (folder,) = [entry.path for entry in os.scandir(tmp_path / "samples") if entry.is_dir()]
    with open(os.path.join(folder, "settings.json")) as handle:
        recorded = json.load(handle)
    assert recorded["checkpoint_sha256"] and recorded["num_sampling_steps"] == 2 and "num_images" not in recorded
    sampling_checkpoint(ckpt, model=tiny_model_state(seed=1))  # other weights, same path
    with pytest.raises(UsageError) as error:
        sample_ddp.main(flags)
    line = assert_names(error.value, "weights")
    assert f"--ckpt {ckpt}" in line or (folder in line and "checkpoint_sha256" in line), line
    assert sorted(name for name in os.listdir(folder) if name.endswith(".png")) == ["000000.png", "000001.png"]
    os.remove(f"{folder}.json")  # no finished batch's record: the folder's own record still refuses
    os.remove(f"{folder}.npz")
    with pytest.raises(UsageError) as error:
        sample_ddp.main(flags)
    assert_names(error.value, folder, "checkpoint_sha256")


def test_a_second_sampler_never_removes_the_temporary_npz_of_a_live_first(tmp_path):
    from sit.sampling import folder as sample_folder

    folder = str(tmp_path / "samples" / "run")
    os.makedirs(folder)
    live = subprocess.Popen(["sleep", "60"])
    try:
        suffix = sample_folder.npz_temporary_suffix(folder)
        writing = tmp_path / "samples" / f".tmp-{live.pid}@{this_host()}~abcdefgh{suffix}"
        killed = tmp_path / "samples" / f".tmp-{dead_pid()}@{this_host()}~abcdefgh{suffix}"
        writing.write_bytes(b"half an npz")
        killed.write_bytes(b"a killed build's")
        assert sample_folder.remove_stale_temporary_files(folder) == 1
        assert writing.exists() and not killed.exists()
    finally:
        live.kill()
        live.wait()


#################################################################################
#                         Signals and exit codes                                #
#################################################################################

def test_torchruns_forwarded_copy_of_a_signal_is_not_a_second_signal(monkeypatch):
    stop = StopSignal()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    stop.handle(signal.SIGINT, None)  # from the terminal
    stop.handle(signal.SIGINT, None)  # torchrun's forwarded copy
    assert stop.received == "SIGINT"
    with pytest.raises(KeyboardInterrupt, match="second SIGINT"):
        stop.handle(signal.SIGINT, None)  # the user's second Ctrl-C
    plain = StopSignal()
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    plain.handle(signal.SIGTERM, None)
    with pytest.raises(KeyboardInterrupt, match="second SIGTERM"):
        plain.handle(signal.SIGTERM, None)  # no launcher forwards to a plain process


@pytest.mark.slow
def test_ctrl_c_to_a_torchrun_job_saves_and_every_worker_exits_0(tmp_path):
    """Two workers started as torchrun starts them, each sent SIGINT twice (the terminal's and torchrun's
    forwarded copy): both save, say so, and exit 0. Then a real torchrun job sent Ctrl-C as a terminal
    sends it (to the whole process group): no worker traceback, and torchrun's own exit status."""
    data = make_image_folder(str(tmp_path / "data"), num_classes=2, per_class=2, size=8)
    args = ["--data-path", data, *PIXEL_TRAIN, "--max-steps", "100000", "--ckpt-every", "100000"]
    port = 29500 + os.getpid() % 1000
    workers = []
    for rank in range(2):
        env = dict(script_env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), LOCAL_WORLD_SIZE="2")
        workers.append(subprocess.Popen(script("train.py", *args, "--results-dir", str(tmp_path / "manual")), cwd=tmp_path,
                                        env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for line in workers[0].stdout:
        if "(step=0000002)" in line:
            break
    for worker in workers:
        worker.send_signal(signal.SIGINT)
        worker.send_signal(signal.SIGINT)
    outputs = [worker.communicate(timeout=120)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs
    assert "Stopped cleanly by SIGINT after saving the checkpoint: every process exits 0" in outputs[0]
    assert not any("Traceback" in output for output in outputs)

    job = subprocess.Popen(script("train.py", *args, "--results-dir", str(tmp_path / "torchrun"), torchrun=2), cwd=tmp_path,
                           env=script_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           start_new_session=True)
    for line in job.stdout:
        if "(step=0000002)" in line:
            break
    os.killpg(job.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    output = job.communicate(timeout=180)[0]
    assert "Stopped cleanly by SIGINT after saving the checkpoint" in output
    assert "KeyboardInterrupt" not in output and "second SIGINT" not in output
    # torchrun itself ends with its SignalException (exit 1) whatever its workers did: see docs/reliability.md
    assert job.returncode == 1 and "SignalException" in output
