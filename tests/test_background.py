"""--background-checkpoints (sit/background.py): checkpoints written from a CPU copy in a
background thread.

Proves: the file holds the same records as a foreground write; the copy shares storages as the state
does and no later update reaches it; the loop waits for a write only before the next one (and at the
end); a write failing midway leaves the previous checkpoint, no partial file, and stops with the usual
line; a kill during a background write leaves no checkpoint under its name, and the resume from
background-written checkpoints (with --precision auto, stored resolved) equals a foreground run bitwise.
"""
import os
import threading
import time
import zipfile

import pytest
import torch

from conftest import make_image_folder
from sit.errors import RunFailure
from sit.speed import resolve_precision_choice
from sit.background import BackgroundWriter, cpu_snapshot
from test_faults import (PIXEL_TRAIN, checkpoint_tensors, kill_when_writing, leftovers, run, script,
                         sleeping_before_rename, start_patched)
from test_train import load, rank_run


def records(path: str) -> dict:
    """A torch.save file's zip records, without the archive folder (named after the temporary file)."""
    with zipfile.ZipFile(path) as archive:
        return {name.split("/", 1)[1]: archive.read(name) for name in archive.namelist()}


@pytest.fixture
def main_rank(monkeypatch):
    """The collectives of a one-process job, recording what rank 0 reports (whether it failed)."""
    import sit.distributed

    reported = []
    monkeypatch.setattr(sit.distributed, "any_rank", lambda failed, device, group=None: reported.append(failed) or failed)
    return reported


def background_run(tmp_path, seed: int = 0):
    torch.manual_seed(seed)
    training = rank_run(tmp_path, 0)
    training.writer = BackgroundWriter()
    return training


def test_cpu_snapshot_copies_and_shares_storages_as_the_state_does():
    base = torch.arange(6.0)
    state = {"a": base, "view": base[2:].view(2, 2), "pair": (torch.ones(2), 3), "list": [torch.zeros(1)], "n": "x"}
    snapshot, ready = cpu_snapshot(state)
    assert ready is None  # CPU: complete on return
    base.add_(100)  # a later optimizer step: the copy keeps the values of the moment it was taken
    assert torch.equal(snapshot["a"], torch.arange(6.0))
    assert torch.equal(snapshot["view"], torch.tensor([[2.0, 3.0], [4.0, 5.0]]))
    assert snapshot["view"].untyped_storage().data_ptr() == snapshot["a"].untyped_storage().data_ptr()
    assert snapshot["a"].untyped_storage().data_ptr() != base.untyped_storage().data_ptr()
    assert snapshot["pair"][1] == 3 and snapshot["n"] == "x" and torch.equal(snapshot["list"][0], torch.zeros(1))


def test_a_background_checkpoint_holds_the_same_records_as_a_foreground_one(tmp_path, main_rank):
    from sit.training.loop import save_checkpoint

    training = background_run(tmp_path)
    training.writer = None
    save_checkpoint(training)
    path = tmp_path / "checkpoints" / "0000003.pt"
    foreground = records(str(path))
    os.remove(path)
    training.writer = BackgroundWriter()
    save_checkpoint(training)
    training.finish_writes()
    assert records(str(path)) == foreground  # same pickle, same tensor bytes: torch.load gives the same state
    assert (tmp_path / "latest.txt").read_text().strip().endswith("0000003.pt")


def test_the_loop_waits_for_a_background_write_only_before_the_next_one(tmp_path, main_rank, monkeypatch):
    import sit.files
    from sit.training.loop import save_checkpoint

    events, gate, save = [], threading.Event(), sit.files._torch_save

    def gated_save(obj, path):
        step = obj["train_steps"]
        events.append(("start", step))
        gate.wait(timeout=60)
        save(obj, path)
        events.append(("end", step))

    monkeypatch.setattr(sit.files, "_torch_save", gated_save)
    training = background_run(tmp_path)
    save_checkpoint(training)
    time.sleep(0.2)
    assert events == [("start", 3)]  # returned while its write waits: the steps go on
    training.state.train_steps = 4
    threading.Timer(0.3, gate.set).start()
    save_checkpoint(training)  # waits for step 3's write first (the gate opens meanwhile)
    assert events[:2] == [("start", 3), ("end", 3)]  # step 3's write ended before step 4's began
    training.finish_writes()  # the end of a run
    assert events == [("start", 3), ("end", 3), ("start", 4), ("end", 4)]
    assert load(str(tmp_path / "checkpoints" / "0000004.pt"))["train_steps"] == 4


def test_a_background_write_failing_midway_keeps_the_previous_checkpoint_and_stops_with_one_line(tmp_path, main_rank,
                                                                                                 monkeypatch):
    import errno

    import sit.files
    from sit.training.loop import save_checkpoint

    training = background_run(tmp_path)
    save_checkpoint(training)
    previous = tmp_path / "checkpoints" / "0000003.pt"
    training.finish_writes()
    kept = records(str(previous))

    def half_then_failing_disk(obj, path):
        with open(path, "wb") as handle:
            handle.write(b"PK" + bytes(1000))  # part of a file...
        raise OSError(errno.EIO, "Input/output error")  # ...then the disk fails

    monkeypatch.setattr(sit.files, "_torch_save", half_then_failing_disk)
    training.state.train_steps = 6
    save_checkpoint(training)  # the failure comes later, in the background
    failed = tmp_path / "checkpoints" / "0000006.pt"
    with pytest.raises(RunFailure) as error:
        training.finish_writes()
    assert str(error.value) == f"cannot write the checkpoint {failed} ([Errno 5] Input/output error)"
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["0000003.pt"] and leftovers(tmp_path) == []
    assert records(str(previous)) == kept
    assert (tmp_path / "latest.txt").read_text().strip().endswith("0000003.pt")
    training.finish_writes()  # reported once: nothing in flight any more


@pytest.mark.slow
def test_a_kill_during_a_background_write_resumes_bit_identical_to_a_foreground_run(tmp_path):
    data = make_image_folder(str(tmp_path / "data"), num_classes=2, per_class=2, size=8)
    common = ["--data-path", data, *PIXEL_TRAIN, "--ckpt-every", "2", "--max-steps", "4", "--precision", "auto"]
    straight = run(script("train.py", *common, "--results-dir", str(tmp_path / "straight")), tmp_path)
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = start_patched(sleeping_before_rename(".pt", skip=1), "train.py",
                           [*common, "--background-checkpoints", "--results-dir", str(tmp_path / "killed")], tmp_path)
    temporary = kill_when_writing(killed)  # step 4's checkpoint, written in the background, before its rename
    folder = os.path.dirname(temporary)
    assert sorted(os.listdir(folder)) == sorted(["0000002.pt", os.path.basename(temporary)])
    resumed = run(script("train.py", "--data-path", data, "--resume", "--results-dir", str(tmp_path / "killed"),
                         "--max-steps", "4", "--num-workers", "0", "--precision", "auto", "--background-checkpoints"),
                  tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert leftovers(os.path.dirname(folder)) == []
    (straight_dir,) = os.listdir(tmp_path / "straight")
    for step in ("0000002.pt", "0000004.pt"):
        reference = checkpoint_tensors(str(tmp_path / "straight" / straight_dir / "checkpoints" / step))
        result = checkpoint_tensors(os.path.join(folder, step))
        assert reference.keys() == result.keys() and all(torch.equal(reference[key], result[key]) for key in reference)
    stored = load(os.path.join(folder, "0000004.pt"))["args"]
    assert stored["precision"] == resolve_precision_choice("auto", "cpu") != "auto"  # what ran, stored resolved
    assert stored["background_checkpoints"] is True


def test_on_another_failure_the_write_in_flight_finishes_and_its_own_error_is_only_logged(tmp_path, main_rank,
                                                                                          monkeypatch, caplog):
    import errno

    import sit.files
    from sit.training.loop import save_checkpoint

    def failing(obj, path):
        time.sleep(0.2)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(sit.files, "_torch_save", failing)
    training = background_run(tmp_path)
    save_checkpoint(training)
    with caplog.at_level("ERROR", logger="test"):
        training.settle_writes()  # the loop is already failing: no second exception over it
    path = tmp_path / "checkpoints" / "0000003.pt"
    assert caplog.messages == [f"cannot write the checkpoint {path} ([Errno 5] Input/output error)"]
    assert not path.exists() and leftovers(tmp_path) == []
