"""``magnetar download NAME``: fetch a DeepSeek V4 Flash GGUF from the Hugging Face hub.

The files are the ones antirez/ds4's download_model.sh fetches. huggingface_hub
finds each file (size, sha256, signed download URL) and moves the bytes with
``http_get``, the transfer ``hf_hub_download`` runs (retries, HTTP Range resume,
redirects, proxies and certificates). ``hf_hub_download`` itself is not called
because it deletes its partial file when a run stops (huggingface_hub 2.x,
``_download_to_tmp_and_move``), and these files are 80-170 GB. What is ours: the
disk-space check before the first byte, ``<file>.part`` kept in the models folder
so the next run continues it, the sha256 computed as the bytes arrive, a lock so
two runs never append to one file, and the progress bar.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import re
import shutil
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from huggingface_hub import get_hf_file_metadata, hf_hub_url
from huggingface_hub.file_download import http_get
from huggingface_hub.utils import (EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError,
                                   build_hf_headers, silent_tqdm)
from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                           TransferSpeedColumn)

from magnetar.agent.models import KNOWN, models_dir
from magnetar.runtime import MagnetarError, UsageError

REPO_ID = "antirez/deepseek-v4-gguf"
REVISION = "main"
REMOTE = {
    "q2-imatrix": "DeepSeek-V4-Flash-IQ2XXS-w2Q2K-AProjQ8-SExpQ8-OutQ8-chat-v2-imatrix.gguf",
    "q4-imatrix": "DeepSeek-V4-Flash-Q4KExperts-F16HC-F16Compressor-F16Indexer-Q8Attn-Q8Shared-Q8Out-chat-v2-imatrix.gguf",
    "q2": "DeepSeek-V4-Flash-IQ2XXS-w2Q2K-AProjQ8-SExpQ8-OutQ8-chat-v2.gguf",
    "q4": "DeepSeek-V4-Flash-Q4KExperts-F16HC-F16Compressor-F16Indexer-Q8Attn-Q8Shared-Q8Out-chat-v2.gguf",
    "mtp": "DeepSeek-V4-Flash-MTP-Q4K-Q8_0-F32.gguf",
}
CHOICES = tuple(REMOTE)
DEFAULT_ENDPOINT = "https://huggingface.co"
CHUNK = 1 << 20


@dataclass
class Remote:
    url: str             # where the bytes are (a signed CDN URL on the real hub)
    size: int
    sha256: str | None   # None when the hub gives no LFS hash (a small, non-LFS file)
    headers: dict[str, str]


def _locate(endpoint: str, filename: str) -> Remote:
    url = hf_hub_url(REPO_ID, filename, revision=REVISION, endpoint=endpoint)
    try:
        meta = get_hf_file_metadata(url)
    except RepositoryNotFoundError:
        raise MagnetarError(f"repository {REPO_ID} not found on {endpoint}",
                            "check HF_ENDPOINT; a private mirror may need HF_TOKEN") from None
    except EntryNotFoundError:
        raise MagnetarError(f"{filename} not found in {REPO_ID} on {endpoint}",
                            "the file may have been renamed; update magnetar") from None
    except HfHubHTTPError as err:
        raise MagnetarError(f"the hub refused {url}: {str(err).splitlines()[0]}") from None
    except Exception as err:  # the transport's errors (requests, httpx) depend on the huggingface_hub version
        raise MagnetarError(f"cannot reach {endpoint}: {err}",
                            "check the network (and HF_ENDPOINT), then run the same command again") from None
    if meta.size is None:
        raise MagnetarError(f"{url} did not say how big the file is", "check HF_ENDPOINT")
    # For LFS files the hub's etag is the file's sha256; for others it is a git hash we cannot use.
    sha = meta.etag if meta.etag and re.fullmatch(r"[0-9a-f]{64}", meta.etag) else None
    headers = build_hf_headers()
    if urlsplit(meta.location).netloc != urlsplit(url).netloc:
        headers.pop("authorization", None)  # a signed CDN URL: the token must not leave the hub
    return Remote(meta.location, meta.size, sha, headers)


class Part:
    """The ``.part`` file, opened for appending, and the sha256 of what it holds.

    ``http_get`` writes to it like a file; when a server ignores the Range request it
    rewinds to where the download began (0: the file holds only this download) and
    truncates, which starts the hash over too."""

    def __init__(self, file, advance):
        self.file, self.advance = file, advance
        self.sha, self.done = hashlib.sha256(), 0
        file.seek(0)
        while block := file.read(CHUNK):  # what an earlier run left
            self.sha.update(block)
            self.done += len(block)
            advance(len(block))

    def write(self, block: bytes) -> None:
        self.file.write(block)
        self.sha.update(block)
        self.done += len(block)
        self.advance(len(block))

    def tell(self) -> int:
        return self.done

    def seek(self, offset: int) -> None:
        if offset != 0:  # http_get only rewinds to where this download began
            raise ValueError(f"cannot rewind a hashed download to {offset}")

    def truncate(self) -> None:
        self.advance(-self.done)
        self.file.truncate(0)
        self.sha, self.done = hashlib.sha256(), 0


def _transfer(part: Part, remote: Remote) -> None:
    """Append to ``part`` until it holds the file; http_get retries a dropped connection
    from the byte it stopped at. Its ``expected_size`` stays unset: given a size over 50 GB it
    refuses plain HTTP up front (pointing at hf_xet, which cannot continue a partial file);
    size and hash are checked by the caller."""
    try:
        # silent_tqdm: our bar is driven by Part's writes
        http_get(remote.url, part, resume_size=part.done, headers=remote.headers, tqdm_class=silent_tqdm)
    except Exception as err:  # httpx, HTTP status and size errors all end the same way: resume later
        last = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise MagnetarError(f"download stopped at {part.done:,} of {remote.size:,} bytes: {last}",
                            "run the same command again to resume") from None


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def _progress(label: str) -> Progress | None:
    console = Console(stderr=True)
    if not console.is_terminal:  # logs and pipes get the summary lines only
        return None
    return Progress(TextColumn(label), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), console=console, transient=True)


def download(args: argparse.Namespace) -> int:
    name = args.name
    if name not in REMOTE:
        raise UsageError(f"unknown model {name!r}", f"choose one of: {', '.join(CHOICES)}")
    folder = Path(args.dir).expanduser() if getattr(args, "dir", None) else models_dir()
    endpoint = (getattr(args, "endpoint", None) or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    filename = REMOTE[name]
    remote = _locate(endpoint, filename)
    final = folder / KNOWN[name][0]
    # Only verified files ever get this name, so a matching size means done.
    if final.is_file() and final.stat().st_size == remote.size:
        print(f"{name} is already downloaded: {final} ({_gb(remote.size)})")
        return 0

    folder.mkdir(parents=True, exist_ok=True)
    part_path = final.with_name(final.name + ".part")
    have = part_path.stat().st_size if part_path.is_file() else 0
    need, free = remote.size - min(have, remote.size), shutil.disk_usage(folder).free
    if need > free:
        raise MagnetarError(f"not enough disk space in {folder}: {name} needs {need:,} more bytes "
                            f"({_gb(need)}), {free:,} bytes ({_gb(free)}) are free",
                            "free some space or pass --dir")
    print(f"downloading {name} ({_gb(remote.size)}) from {endpoint}/{REPO_ID}\n  {filename} -> {final}")
    if have:
        print(f"  resuming: {_gb(have)} already in {part_path}")

    bar = _progress(name)
    with open(part_path, "a+b") as file, bar or nullcontext():
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MagnetarError(f"another download is writing {part_path}", "wait for it to finish") from None
        task = bar.add_task(name, total=remote.size) if bar else None
        part = Part(file, lambda n: bar.advance(task, n) if bar else None)
        if part.done > remote.size:  # not a prefix of this file
            part.truncate()
        try:
            _transfer(part, remote)
        except KeyboardInterrupt:
            print(f"\nstopped; {_gb(part.done)} kept in {part_path}: run the same command to resume",
                  file=sys.stderr)
            raise
        file.flush()
        got = part.sha.hexdigest()
        problem = (f"got {part.done:,} bytes, the hub says {remote.size:,}" if part.done != remote.size
                   else f"sha256 {got}, the hub says {remote.sha256}" if remote.sha256 not in (None, got)
                   else None)
        if problem:
            part_path.unlink()  # bad bytes would poison the next resume
            raise MagnetarError(f"{filename}: {problem}; the partial file was removed",
                                "run the same command again to download it afresh")
        os.fsync(file.fileno())
        os.replace(part_path, final)  # still under our lock, so nobody appends meanwhile
    check = "sha256 verified" if remote.sha256 else "size verified, the hub gave no sha256"
    print(f"saved {final} ({_gb(remote.size)}, {check})")
    return 0
