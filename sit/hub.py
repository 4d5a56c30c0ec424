"""Files from the Hugging Face hub with a bounded failure: the local cache first; a file not cached is
fetched only after one short request (no retries) has reached the hub. Without it, huggingface_hub
retries a dead connection with backoff (about 25 s a file, a warning per retry) before failing.

`HF_HUB_OFFLINE=1` uses the cache only; `HF_ENDPOINT` and `HF_HUB_ETAG_TIMEOUT` (the probe's timeout,
in seconds) are huggingface_hub's own settings. Failures are `HubUnavailable` with a one-line message.
"""
from __future__ import annotations

import os

from sit.errors import UsageError, error_line


class HubUnavailable(UsageError):
    """A hub file that is neither cached nor reachable; the caller says what to pass instead."""


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE (huggingface_hub's switch) asks for the cache only."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def cached_hub_file(repo_id: str, filename: str) -> str | None:
    """The cached copy of a hub file (its "main" revision), or None when it is not cached; asks no server.
    Raises HubUnavailable when the cache cannot be read."""
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
    url = huggingface_hub.hf_hub_url(repo_id, filename)
    try:
        huggingface_hub.get_hf_file_metadata(url, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except Exception as error:  # network, HTTP status, missing repo or file: one line, no retry
        raise HubUnavailable(f"could not reach {url} ({error_line(error)})") from None


def hub_file(repo_id: str, filename: str) -> str:
    """The local path of a hub file: the cached copy, else downloaded after probe_hub.

    Raises HubUnavailable (one line) when it is not cached and cannot be fetched.
    """
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
    """The local folder holding these files of one hub repository (e.g. a diffusers model's config and
    weights), each cached or fetched as hub_file does; raises HubUnavailable."""
    paths = [hub_file(repo_id, name) for name in filenames]
    folders = {os.path.dirname(path) for path in paths}
    if len(folders) > 1:  # cached at an older revision than a file just fetched: take all at the newest
        import huggingface_hub

        try:
            paths = [huggingface_hub.hf_hub_download(repo_id=repo_id, filename=name) for name in filenames]
        except Exception as error:
            raise HubUnavailable(f"could not download {repo_id} ({error_line(error)})") from None
    return os.path.dirname(paths[0])
