"""The tensors of a TorchScript archive (what torch.jit.save writes), read without running anything from it:
only `<archive>/data.pkl` is unpickled, each `__torch__.*` class becoming a plain record (`ScriptObject`),
tensors rebuilt from `<archive>/data/<key>`'s bytes, any other global refused; `code/` is never compiled."""
from __future__ import annotations

import collections
import io
import pickle
import re
import zipfile
from typing import Any, Optional

import torch

# The storage classes TorchScript pickles name -> the dtype of their bytes.
STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class TorchScriptArchiveError(ValueError):
    """The file is a TorchScript archive this reader cannot (or will not) read; the message says why."""


class ScriptObject:
    """A module (or other object) of the archive: its TorchScript class name and attributes, no behaviour."""

    qualified_name = "?"

    def __setstate__(self, state: Any) -> None:
        """BUILD's state: a dict of attribute name -> value for scripted modules."""
        self.state = state


def rebuild_tensor(storage: torch.Tensor, storage_offset: int, size: tuple, stride: tuple,
                   requires_grad: bool = False, backward_hooks: Any = None, metadata: Any = None) -> torch.Tensor:
    """The tensor `torch._utils._rebuild_tensor_v2` would make: a strided view of a flat storage (numel,)."""
    return storage.as_strided(tuple(size), tuple(stride), storage_offset)


def rebuild_list(values: Any, *type_tag: Any) -> Any:
    """torch.jit._pickle's list builders and type tags: the value itself."""
    return values


# (module, name) -> what the pickle gets for it; anything else is refused.
SAFE_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor,
    **{("torch.jit._pickle", name): rebuild_list
       for name in ("build_intlist", "build_doublelist", "build_boollist", "build_tensorlist", "restore_type_tag")},
}


class ArchiveUnpickler(pickle.Unpickler):
    """Unpickles `<archive>/data.pkl` with only SAFE_GLOBALS, ScriptObject records and storages read from the zip."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(archive.read(f"{prefix}data.pkl")))
        self.archive = archive
        self.prefix = prefix
        self.storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("__torch__."):
            unmangled = re.sub(r"\.___torch_mangle_\d+", "", module)  # TorchScript's suffix for same-named classes
            return type(name, (ScriptObject,), {"qualified_name": f"{unmangled}.{name}"})
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        if (module, name) in SAFE_GLOBALS:
            return SAFE_GLOBALS[(module, name)]
        raise TorchScriptArchiveError(f"it names {module}.{name}, which a plain TorchScript module does not need")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        """('storage', dtype, key, location, numel) -> the flat tensor (numel,) of `<archive>/data/<key>`."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)):
            raise TorchScriptArchiveError(f"unexpected storage reference {pid!r:.80}")
        _, dtype, key, _, numel = pid
        if key not in self.storages:
            raw = bytearray(self.archive.read(f"{self.prefix}data/{key}"))
            flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            if flat.numel() != numel:
                raise TorchScriptArchiveError(f"storage {key} holds {flat.numel()} values, the pickle says {numel}")
            self.storages[key] = flat
        return self.storages[key]


def archive_prefix(archive: zipfile.ZipFile) -> Optional[str]:
    """The folder inside a zip that holds a TorchScript archive (`<name>/` with data.pkl and code/), or None."""
    names = archive.namelist()
    prefixes = (name[: -len("data.pkl")] for name in names if name.endswith("data.pkl") and name.count("/") == 1)
    return next((prefix for prefix in prefixes if any(other.startswith(prefix + "code/") for other in names)), None)


def is_torchscript_archive(path: str) -> bool:
    """Whether `path` is a zip holding a TorchScript archive (torch.save's zips have no code/ folder)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return archive_prefix(archive) is not None


def flatten_tensors(node: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
    """Every tensor attribute under a ScriptObject, by dotted path (`layers.conv.weight`)."""
    state = getattr(node, "state", None)
    if not isinstance(state, dict):
        return
    for name, value in state.items():
        if isinstance(value, torch.Tensor):
            tensors[prefix + name] = value
        elif isinstance(value, ScriptObject):
            flatten_tensors(value, f"{prefix}{name}.", tensors)


def read_torchscript_tensors(path: str) -> tuple[str, dict[str, torch.Tensor]]:
    """(the root module's class name, its tensors by dotted path); TorchScriptArchiveError when the file is
    not an archive or its pickle names anything beyond modules, tensors and plain containers."""
    with zipfile.ZipFile(path) as archive:
        prefix = archive_prefix(archive)
        if prefix is None:
            raise TorchScriptArchiveError("it is not a TorchScript archive (no data.pkl beside a code/ folder)")
        if f"{prefix}byteorder" in archive.namelist() and archive.read(f"{prefix}byteorder").strip() != b"little":
            raise TorchScriptArchiveError("its tensors are stored big-endian")
        try:
            root = ArchiveUnpickler(archive, prefix).load()
        except (pickle.UnpicklingError, KeyError, EOFError, RuntimeError) as error:
            raise TorchScriptArchiveError(f"its module pickle is unreadable ({type(error).__name__}: "
                                          f"{error})") from None
    if not isinstance(root, ScriptObject):
        raise TorchScriptArchiveError(f"its root is a {type(root).__name__}, not a scripted module")
    tensors: dict[str, torch.Tensor] = {}
    flatten_tensors(root, "", tensors)
    return root.qualified_name, tensors
