"""Lock files and written files in shared folders (trust boundaries): a results, sample or feature folder may
be writable by others, so `owner.lock` may be a link, a FIFO, a folder, a hard link or forged bytes, and the
name of a temporary or of latest.txt may have been planted as a link. Each ends in one line naming the lock
file (exit 2 from a script) or is replaced, never written through: no target of a link is changed or deleted.
"""
import contextlib
import json
import os
import signal
import subprocess
import tempfile

import pytest

from conftest import assert_names, make_image_folder
from sit.errors import RunFailure, UsageError
from sit.files import atomic_json, atomic_text, atomic_write, this_host
from sit.locks import LOCK_FILE, acquire_folder_lock, folder_locks_released
from sit.training.experiment import write_latest

VICTIM = b"another user's file: must never change\n"


@contextlib.contextmanager
def within_seconds(seconds: int):
    """Fail instead of hanging (a FIFO read by the old code blocks for ever)."""
    def expired(signum, frame):
        raise AssertionError(f"still blocked after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def victim_file(tmp_path, mode: int = 0o600) -> str:
    """A file in another folder, with VICTIM's bytes and `mode`."""
    os.makedirs(tmp_path / "elsewhere", exist_ok=True)
    path = str(tmp_path / "elsewhere" / "victim.txt")
    with open(path, "wb") as handle:
        handle.write(VICTIM)
    os.chmod(path, mode)
    return path


def assert_untouched(path: str, mode: int = 0o600) -> None:
    with open(path, "rb") as handle:
        assert handle.read() == VICTIM
    assert os.stat(path).st_mode & 0o777 == mode


def refused(folder: str) -> str:
    """The one line acquire_folder_lock refuses `folder` with (it must not take the lock)."""
    with within_seconds(20), folder_locks_released(), pytest.raises(UsageError) as error:
        acquire_folder_lock(folder, "the experiment folder", warn=pytest.fail)
    return assert_names(error.value, os.path.join(folder, LOCK_FILE))


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


#################################################################################
#                        owner.lock that is not a lock file                      #
#################################################################################

def test_a_lock_file_that_is_a_link_is_refused_and_its_target_is_not_written_or_deleted(tmp_path):
    folder = str(tmp_path / "shared")
    os.makedirs(folder)
    victim = victim_file(tmp_path)
    os.symlink(victim, os.path.join(folder, LOCK_FILE))
    assert_names(refused(folder), "symbolic link", "remove it")
    assert_untouched(victim)
    assert os.path.islink(os.path.join(folder, LOCK_FILE))  # the link is the user's to remove, not ours

    missing = str(tmp_path / "elsewhere" / "created.txt")  # a dangling link: its target is not created either
    os.remove(os.path.join(folder, LOCK_FILE))
    os.symlink(missing, os.path.join(folder, LOCK_FILE))
    assert_names(refused(folder), "symbolic link")
    assert not os.path.lexists(missing)


def test_a_lock_file_that_is_a_fifo_a_folder_or_a_hard_link_is_refused_in_one_line(tmp_path):
    folder = str(tmp_path / "shared")
    os.makedirs(folder)
    lock = os.path.join(folder, LOCK_FILE)
    os.mkfifo(lock)
    assert_names(refused(folder), "FIFO")
    os.remove(lock)
    os.mkdir(lock)
    assert_names(refused(folder), "folder")
    os.rmdir(lock)
    victim = victim_file(tmp_path, mode=0o644)
    os.link(victim, lock)  # another name of someone's file: writing the lock would write it
    assert_names(refused(folder), "2 names")
    assert_untouched(victim, mode=0o644)


@pytest.mark.parametrize("content", [
    json.dumps({"pid": "abc", "host": "HOST"}),
    json.dumps({"pid": 10 ** 30, "host": "HOST"}),
    json.dumps({"pid": -1, "host": "HOST"}),
    json.dumps({"pid": True, "host": "HOST"}),
    json.dumps({"pid": 1234}),
    json.dumps({"pid": 1234, "host": "a\nb"}),
    json.dumps({"pid": 1234, "host": "HOST", "started": "yesterday"}),
    json.dumps([1]),
    "not json\nat all",
    "\xff\xfe garbage",
    "[" * 4000,
    " " * 5000 + "{}",
], ids=["pid-abc", "pid-1e30", "pid-negative", "pid-bool", "no-host", "host-newline", "started-text", "list",
        "text", "bytes", "deep", "large"])
def test_a_forged_lock_is_refused_in_one_line_naming_it_and_left_as_it_is(tmp_path, content):
    folder = str(tmp_path / "shared")
    os.makedirs(folder)
    lock = os.path.join(folder, LOCK_FILE)
    data = content.replace("HOST", this_host()).encode("latin-1")
    with open(lock, "wb") as handle:
        handle.write(data)
    assert_names(refused(folder), "remove it")
    with open(lock, "rb") as handle:
        assert handle.read() == data


def test_a_dead_runs_lock_with_a_multi_line_command_is_taken_over_with_a_one_line_warning(tmp_path):
    folder = str(tmp_path / "shared")
    os.makedirs(folder)
    pid = dead_pid()
    with open(os.path.join(folder, LOCK_FILE), "w") as handle:
        json.dump({"pid": pid, "host": this_host(), "started": 1e300, "command": "train.py\n--resume\x1b[2J"}, handle)
    warnings = []
    with folder_locks_released():
        acquire_folder_lock(folder, "the experiment folder", warn=warnings.append)
    assert len(warnings) == 1
    assert_names(warnings[0], os.path.join(folder, LOCK_FILE), f"process {pid}", "taking it over")
    assert "\x1b" not in warnings[0]


@pytest.mark.parametrize("planted", ["link", "forged"])
def test_extract_features_refuses_a_planted_lock_with_exit_2_and_one_line(tmp_path, tiny_vae, capsys, planted):
    import extract_features
    from sit.cli import run_main

    data = make_image_folder(str(tmp_path / "data"), num_classes=2, per_class=2, size=16)
    features = tmp_path / "features"
    features.mkdir()
    lock = str(features / LOCK_FILE)
    victim = victim_file(tmp_path)
    if planted == "link":
        os.symlink(victim, lock)
    else:
        with open(lock, "w") as handle:
            json.dump({"pid": "abc", "host": this_host()}, handle)
    argv = ["--data-path", data, "--image-size", "16", "--vae", tiny_vae, "--block-size", "2", "--batch-size", "2",
            "--num-workers", "0", "--features-path", str(features)]
    code = run_main(lambda: extract_features.main(argv), "extract_features.py")
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert_names(err, "extract_features.py: error: ", lock)
    assert_untouched(victim)
    assert sorted(os.listdir(features)) == [LOCK_FILE]  # nothing written in the folder, the planted file kept


#################################################################################
#                      Written files whose names were planted                   #
#################################################################################

def test_latest_txt_and_records_planted_as_links_are_replaced_not_written_through(tmp_path):
    experiment = tmp_path / "experiment"
    experiment.mkdir()
    victim = victim_file(tmp_path)
    os.symlink(victim, experiment / "latest.txt")
    os.symlink(victim, experiment / "settings.json")
    path = write_latest(str(experiment), str(experiment / "checkpoints" / "0000002.pt"))
    atomic_json(str(experiment / "settings.json"), {"steps": 2})
    assert_untouched(victim)
    assert not os.path.islink(path) and not os.path.islink(experiment / "settings.json")
    assert open(path).read() == str(experiment / "checkpoints" / "0000002.pt") + "\n"
    assert json.load(open(experiment / "settings.json")) == {"steps": 2}


def test_a_temporary_name_planted_as_a_link_is_never_opened(tmp_path, monkeypatch):
    folder = tmp_path / "shared"
    folder.mkdir()
    victim = victim_file(tmp_path)
    names = iter(["planted", "fresh"])  # mkstemp's first choice is the name someone planted a link at
    monkeypatch.setattr(tempfile, "_get_candidate_names", lambda: names)
    planted = folder / f".tmp-{os.getpid()}@{this_host()}~planted.txt"
    os.symlink(victim, planted)
    atomic_text(str(folder / "marker.txt"), "2\n")
    assert_untouched(victim)
    assert os.path.islink(planted) and open(folder / "marker.txt").read() == "2\n"


def test_a_temporary_swapped_for_a_link_while_written_is_not_chmodded_or_renamed(tmp_path):
    folder = tmp_path / "shared"
    folder.mkdir()
    victim = victim_file(tmp_path)

    def write_then_swapped(tmp_path_: str) -> None:
        with open(tmp_path_, "w") as handle:
            handle.write("payload")
        os.remove(tmp_path_)  # what another user of a folder without the sticky bit can do meanwhile
        os.symlink(victim, tmp_path_)

    with pytest.raises(RunFailure) as error:
        atomic_write(str(folder / "out.png"), write_then_swapped, suffix=".png")
    assert_names(error.value, str(folder / "out.png"), "replaced")
    assert_untouched(victim)  # its mode too: os.chmod by name would have made it 0644
    assert os.listdir(folder) == []  # nothing renamed into place, the planted link removed (only the link)
