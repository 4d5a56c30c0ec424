"""Downloads with a bounded failure, the one way this project fetches a file: the local copy first, else
(hub files) one short probe without retries, whereas huggingface_hub would retry a dead connection for
~25 s, or (plain URLs) one request streamed to a file renamed into place when complete. HF_HUB_OFFLINE=1
uses local copies only; failures are a one-line `HubUnavailable` naming the file.
"""
from __future__ import annotations

import functools
import os
import urllib.request

from sit.errors import UsageError, error_line

URL_TIMEOUT_S = 60  # a plain URL's connection and each read of its body
CHUNK_BYTES = 1 << 20


class HubUnavailable(UsageError):
    """A hub file that is neither cached nor reachable; the caller says what to pass instead."""


class HubFileMissing(HubUnavailable):
    """The hub answered that the repository has no such file (so another file name may be tried)."""


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE (huggingface_hub's switch) asks for the cache only."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def cached_hub_file(repo_id: str, filename: str) -> str | None:
    """The cached copy of a hub file ("main") or None, asking no server (HubUnavailable: unreadable cache)."""
    import huggingface_hub
    from huggingface_hub.utils import LocalEntryNotFoundError

    try:
        return huggingface_hub.hf_hub_download(repo_id=repo_id, filename=filename, local_files_only=True)
    except LocalEntryNotFoundError:
        return None
    except Exception as error:
        raise HubUnavailable(f"could not fetch {repo_id}/{filename} ({error_line(error)})") from None


def probe_hub(repo_id: str, filename: str) -> None:
    """One request for the file's metadata, no retries; HubUnavailable when the hub does not answer with it."""
    import huggingface_hub
    from huggingface_hub import constants

    if hub_offline():
        raise HubUnavailable(f"{repo_id}/{filename} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) "
                             f"and HF_HUB_OFFLINE is set")
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    url = huggingface_hub.hf_hub_url(repo_id, filename)
    try:
        huggingface_hub.get_hf_file_metadata(url, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except Exception as error:  # network, HTTP status, missing repo or file: one line, no retry
        if isinstance(error, EntryNotFoundError) and not isinstance(error, LocalEntryNotFoundError):
            raise HubFileMissing(f"{url} does not exist ({error_line(error)})") from None  # the hub answered
        raise HubUnavailable(f"could not reach {url} ({error_line(error)})") from None


def hub_file(repo_id: str, filename: str) -> str:
    """The local path of a hub file: the cached copy, else downloaded after probe_hub; HubUnavailable."""
    cached = cached_hub_file(repo_id, filename)
    if cached is not None:
        return cached
    probe_hub(repo_id, filename)
    import huggingface_hub

    try:
        return huggingface_hub.hf_hub_download(repo_id=repo_id, filename=filename)
    except Exception as error:  # the connection dropped after the probe, a full disk, ...
        raise HubUnavailable(f"could not download {repo_id}/{filename} ({error_line(error)})") from None


def hub_folder(repo_id: str, filenames: tuple[str, ...]) -> str:
    """The local folder holding these files of one hub repository, each as hub_file gets it."""
    paths = [hub_file(repo_id, name) for name in filenames]
    folders = {os.path.dirname(path) for path in paths}
    if len(folders) > 1:  # cached at an older revision than a file just fetched: take all at the newest
        import huggingface_hub

        try:
            paths = [huggingface_hub.hf_hub_download(repo_id=repo_id, filename=name) for name in filenames]
        except Exception as error:
            raise HubUnavailable(f"could not download {repo_id} ({error_line(error)})") from None
    return os.path.dirname(paths[0])


def url_file(url: str, path: str, progress: bool = True) -> str:
    """`path` when it is there, else `url` downloaded to it (not with HF_HUB_OFFLINE: HubUnavailable)."""
    if os.path.isfile(path):
        return path
    if hub_offline():
        raise HubUnavailable(f"{path} is missing and HF_HUB_OFFLINE is set ({url} not tried)")
    return url_download(url, path, progress)


def url_download(url: str, path: str, progress: bool = True) -> str:
    """Stream `url` (http, https or file) atomically to `path` in one request, with a progress bar;
    HubUnavailable naming the URL (NoSpaceLeft for a full disk) leaves nothing at `path`."""
    from sit.files import NoSpaceLeft, atomic_write

    try:
        atomic_write(path, functools.partial(_stream_url, url, progress=progress), suffix=".part")
    except (HubUnavailable, NoSpaceLeft):  # a full disk is the machine's failure, not the download's
        raise
    except Exception as error:  # network errors, HTTP statuses, interrupted reads
        raise HubUnavailable(f"could not download {url} ({error_line(error, limit=160)})") from error
    return path


def _stream_url(url: str, path: str, progress: bool = True) -> None:
    """Write the bytes at `url` to `path`; HubUnavailable when fewer arrive than the server announced."""
    from tqdm import tqdm

    with open(path, "wb") as out, urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as response:
        length = response.headers.get("Content-Length")
        total = int(length) if length else None
        received = 0
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                  desc=os.path.basename(path), disable=not progress) as bar:
            for chunk in iter(functools.partial(response.read, CHUNK_BYTES), b""):
                out.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if total is not None and received != total:
        raise HubUnavailable(f"download of {url} was interrupted: got {received} of {total} bytes")
