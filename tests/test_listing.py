"""sit.data.listing: torchvision ImageFolder's classes and order for a plain folder; links, loops,
duplicates and FIFOs listed once or skipped (never opened), counted in one warning line."""
import os

from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from conftest import make_image_folder
from sit.data.images import TrainImageFolder
from sit.data.listing import IMAGE_EXTENSIONS, list_image_folder


def nested_folder(tmp_path) -> str:
    """3 classes x 2 images, plus a sub-folder with an upper-case extension and a text file."""
    root = make_image_folder(str(tmp_path / "data"), num_classes=3, per_class=2, size=8)
    os.makedirs(os.path.join(root, "class1", "deeper", "z"))
    for name in ("deeper/a.PNG", "deeper/z/b.png"):
        with open(os.path.join(root, "class1", "0.png"), "rb") as source, open(os.path.join(root, "class1", name), "wb") as copy:
            copy.write(source.read())
    (tmp_path / "data" / "class1" / "notes.txt").write_text("not an image")
    return root


def test_a_plain_folder_lists_exactly_as_torchvision(tmp_path):
    root = nested_folder(tmp_path)
    assert IMAGE_EXTENSIONS == IMG_EXTENSIONS
    classes, class_to_idx = find_classes(root)
    listing = list_image_folder(root)
    assert listing.classes == classes
    assert listing.samples == make_dataset(root, class_to_idx, extensions=IMG_EXTENSIONS)
    assert listing.warning() is None


def test_loops_duplicates_other_classes_and_fifos_are_skipped_and_counted(tmp_path):
    root = nested_folder(tmp_path)
    plain = list_image_folder(root).samples
    class0, class1 = os.path.join(root, "class0"), os.path.join(root, "class1")
    os.symlink(".", os.path.join(class0, "loop"))                          # class0/loop -> .
    os.symlink("..", os.path.join(class0, "up"))                           # class0/up -> .. (the root)
    os.symlink(os.path.join("..", "class2"), os.path.join(class0, "other"))  # into another class's folder
    os.symlink(os.path.join("..", "class0", "0.png"), os.path.join(class1, "again.png"))  # a second link to a file
    os.symlink("nowhere.png", os.path.join(class0, "dangling.png"))
    os.mkfifo(os.path.join(class0, "pipe.png"))
    listing = list_image_folder(root)
    assert listing.samples == plain  # no image twice, none under another class's label, nothing hung
    assert listing.skipped == {"loop": 2, "other_class": 1, "not_regular": 2, "duplicate": 1}
    warning = listing.warning()
    assert "\n" not in warning
    assert warning.startswith(f"--data-path {root}: skipped 6 entries, each real image file is read once: ")
    assert f"2 folder link to a folder holding it, the root or above (a loop), e.g. {os.path.join(class0, 'loop')}" in warning
    assert f"1 the same real file listed again, e.g. {os.path.join(class1, 'again.png')}" in warning
    assert f"1 folder link into another class's folder, e.g. {os.path.join(class0, 'other')}" in warning
    assert f"2 not a regular file (FIFO, socket, device or dangling link), e.g. {os.path.join(class0, 'dangling.png')}" in warning


def test_links_to_files_and_folders_outside_the_root_are_read_once(tmp_path):
    root = make_image_folder(str(tmp_path / "data"), num_classes=2, per_class=1, size=8)
    elsewhere = make_image_folder(str(tmp_path / "elsewhere"), num_classes=1, per_class=2, size=8)
    os.symlink(os.path.join(elsewhere, "class0"), os.path.join(root, "class1", "more"))
    os.symlink(os.path.join(elsewhere, "class0"), os.path.join(root, "class1", "more_again"))
    os.symlink(os.path.join(root, "class0"), os.path.join(root, "class2"))  # a class folder that is another's
    listing = list_image_folder(root)
    assert listing.classes == ["class0", "class1", "class2"]  # as torchvision: class2 keeps its label, empty
    assert listing.samples == [(os.path.join(root, "class0", "0.png"), 0), (os.path.join(root, "class1", "0.png"), 1),
                               (os.path.join(root, "class1", "more", "0.png"), 1),
                               (os.path.join(root, "class1", "more", "1.png"), 1)]
    assert listing.skipped == {"again": 2}  # more_again and class2: folders listed by another path, no loops


def test_a_link_out_of_the_folder_listed_twice_is_called_a_second_path_not_a_loop(tmp_path):
    """Two links to one folder outside the root (as a/etc -> /etc, b/etc -> /etc), and inside it a link to
    a sibling folder (as /etc/xdg/systemd/user -> /etc/systemd/user): each folder is read once and the
    warning says the skipped links reach a folder already listed; only a link to the root or above, or to a
    folder holding it, is a loop."""
    root = make_image_folder(str(tmp_path / "data"), num_classes=2, per_class=1, size=8)
    outside = make_image_folder(str(tmp_path / "etc"), num_classes=2, per_class=1, size=8)
    os.symlink(os.path.join(outside, "class0"), os.path.join(outside, "class1", "sibling"))
    for name in ("class0", "class1"):
        os.symlink(outside, os.path.join(root, name, "etc"))
    listing = list_image_folder(root)
    assert listing.skipped == {"again": 2}
    assert [path for path, _ in listing.samples] == [os.path.join(root, "class0", "0.png"),
                                                     os.path.join(root, "class0", "etc", "class0", "0.png"),
                                                     os.path.join(root, "class0", "etc", "class1", "0.png"),
                                                     os.path.join(root, "class1", "0.png")]
    warning = listing.warning()
    assert "loop" not in warning, warning
    assert (f"2 folder link to a folder already listed by another path, e.g. "
            f"{os.path.join(root, 'class0', 'etc', 'class1', 'sibling')}") in warning
    os.symlink("/", os.path.join(root, "class1", "slash"))
    assert list_image_folder(root).skipped == {"again": 2, "loop": 1}  # / holds the root: a loop


def test_the_training_folder_carries_the_listing_warning(tmp_path):
    root = make_image_folder(str(tmp_path / "data"), num_classes=1, per_class=2, size=8)
    assert TrainImageFolder(root, 8).listing_warning is None
    os.symlink(".", os.path.join(root, "class0", "loop"))
    dataset = TrainImageFolder(root, 8)
    assert len(dataset) == 2 and dataset.listing_warning == list_image_folder(root).warning()
