"""A Hub file as a seekable, read-only binary file, fetched in HTTP range requests: reading a GGUF's header
this way costs the header's bytes, not the file's (`dsv4 plan REPO:TAG` before a download).

Reads are served from one window of the file; a miss fetches the range asked for, at least `block` bytes, and
the window grows (doubling, up to MAX_WINDOW) while the reads go forward, so a multi-megabyte tokenizer takes a
handful of requests. Every byte fetched counts against a `FetchBudget` shared by the files of one plan, so a
hostile header cannot make us download the file. URLs, auth and retries are those of `dsv4cli.hub`.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import httpx2
from huggingface_hub import hf_hub_url
from huggingface_hub.utils import build_hf_headers

from dsv4cli import hub
from dsv4cli.errors import DownloadError, IntegrityError, PlanError

BLOCK = 64 << 10
MAX_WINDOW = 8 << 20
DEFAULT_BUDGET = 256 << 20  # far above any real header (a 129k-token vocabulary is a few MB)


@dataclass
class FetchBudget:
    """Bytes fetched so far by the files of one job, and the most it may fetch."""

    limit: int = DEFAULT_BUDGET
    fetched: int = 0
    requests: int = 0

    def charge(self, n: int, *, what: str) -> None:
        if self.fetched + n > self.limit:
            raise PlanError(
                f"{what}: reading the GGUF headers would fetch more than {self.limit} bytes",
                hint="the header is far larger than any real model's; download the files to plan them",
            )
        self.fetched += n
        self.requests += 1


class HubRangeFile(io.RawIOBase):
    """`listing.repo`'s file `remote` at the listing's commit, read through range requests."""

    def __init__(
        self, client: httpx2.Client, listing: hub.RepoListing, remote: hub.RemoteFile, budget: FetchBudget
    ) -> None:
        super().__init__()
        self.name = f"{listing.repo}/{remote.path}"
        self._client, self._listing, self._remote, self._budget = client, listing, remote, budget
        self._pos = 0
        self._start, self._data = 0, b""
        self._window = BLOCK

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._remote.size}[whence]
        if base + offset < 0:
            raise ValueError(f"{self.name}: seek before the start")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        want = min(len(buffer), self._remote.size - self._pos)
        if want <= 0:
            return 0
        end = self._start + len(self._data)
        if not (self._start <= self._pos and self._pos + want <= end):
            if not self._start <= self._pos <= end:  # a jump, not reading on: read ahead little again
                self._window = BLOCK
            size = min(max(want, self._window), self._remote.size - self._pos)
            self._start, self._data = self._pos, self._fetch(self._pos, size)
            self._window = min(MAX_WINDOW, self._window * 2)  # reading on from here: read ahead further
        offset = self._pos - self._start
        buffer[:want] = self._data[offset : offset + want]
        self._pos += want
        return want

    def _fetch(self, start: int, size: int) -> bytes:
        self._budget.charge(size, what=self.name)
        return hub.with_retries(lambda: self._get(start, size), what=self.name)

    def _get(self, start: int, size: int) -> bytes:
        listing = self._listing
        url = hf_hub_url(listing.repo, self._remote.path, revision=listing.revision, endpoint=hub.endpoint())
        headers = {
            **build_hf_headers(token=hub.token(), library_name="dsv4"),
            "Accept-Encoding": "identity",
            "Range": f"bytes={start}-{start + size - 1}",
        }
        try:
            with self._client.stream("GET", url, headers=headers) as response:
                hub.check_status(response, self._listing, self._remote)
                if response.status_code != 206:  # a 200 is the whole file: never read it
                    raise DownloadError(
                        f"{self.name}: the server ignored the byte range (HTTP {response.status_code})",
                        hint="plan after `dsv4 pull`, or use a server that answers range requests",
                    )
                m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", response.headers.get("Content-Range", "").strip())
                if not m or int(m[1]) != start or int(m[2]) != start + size - 1:
                    raise IntegrityError(
                        f"{self.name}: asked for bytes {start}-{start + size - 1}, "
                        f"got {response.headers.get('Content-Range')!r}"
                    )
                data = bytearray()
                for chunk in response.iter_raw():
                    if len(data) + len(chunk) > size:
                        raise IntegrityError(f"{self.name}: the server sent more than the {size} bytes asked for")
                    data += chunk
        except hub.BROKEN_REDIRECT as e:
            raise DownloadError(f"{self.name}: {type(e).__name__}: {e}") from e
        except httpx2.TransportError as e:
            raise hub.TransientError(f"{type(e).__name__}: {e or 'connection lost'}") from e
        if len(data) < size:
            raise hub.TransientError(f"connection closed after {len(data)} of {size} bytes")
        return bytes(data)
