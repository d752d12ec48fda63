"""A Hub file's bytes by range, for reading a GGUF's header without downloading the file (`dsv4 plan REPO:TAG`
before a pull): a `ByteSource` (name, size, `read_at`), the interface the bounded GGUF header parser reads from,
so a remote header is parsed by the same code as a local one.

Each `read_at` is one HTTP range request (the parser asks for about a MiB at a time and buffers); every byte
fetched counts against a `FetchBudget` shared by the shards of one plan, so a hostile header cannot make us
download the file, and all the reads of one plan share one deadline (DSV4_HUB_TIMEOUT), so a slow or silent
server cannot keep it waiting. URLs, auth and retries are those of `dsv4cli.hub.api`; a server that ignores the
range (a 200 with the whole file) is refused at once, before its body is read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import httpx2
from huggingface_hub import hf_hub_url
from huggingface_hub.utils import build_hf_headers

from dsv4cli.deadline import Deadline
from dsv4cli.errors import DownloadError, IntegrityError, PlanError
from dsv4cli.hub import api as hub

DEFAULT_BUDGET = 256 << 20  # far above any real header (a 129k-token vocabulary is a few MB)


@dataclass
class FetchBudget:
    """Bytes fetched so far by the files of one job, and the most it may fetch."""

    limit: int = DEFAULT_BUDGET
    fetched: int = 0
    requests: int = 0
    deadline: Deadline | None = None  # started by the first read

    def clock(self) -> Deadline:
        if self.deadline is None:
            self.deadline = Deadline(hub.hub_timeout())
        return self.deadline

    def charge(self, n: int, *, what: str) -> None:
        if self.fetched + n > self.limit:
            raise PlanError(
                f"{what}: reading the GGUF headers would fetch more than {self.limit} bytes",
                hint="the header is far larger than any real model's; download the files to plan them",
            )
        self.fetched += n
        self.requests += 1


class HubByteSource:
    """`listing.repo`'s file `remote` at the listing's commit, read by byte range."""

    def __init__(
        self, client: httpx2.Client, listing: hub.RepoListing, remote: hub.RemoteFile, budget: FetchBudget
    ) -> None:
        self.name = f"{listing.repo}/{remote.path}"
        self.size = remote.size
        self._client, self._listing, self._remote, self._budget = client, listing, remote, budget

    def read_at(self, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length), fewer only at the end of the file."""
        length = max(0, min(length, self.size - offset))
        if length == 0:
            return b""
        self._budget.charge(length, what=self.name)
        deadline = self._budget.clock()
        return hub.with_retries(lambda: self._get(offset, length, deadline), what=self.name, deadline=deadline)

    def _get(self, start: int, size: int, deadline: Deadline) -> bytes:
        listing = self._listing
        url = hf_hub_url(listing.repo, self._remote.path, revision=listing.revision, endpoint=hub.endpoint())
        headers = {
            **build_hf_headers(token=hub.token(), library_name="dsv4"),
            "Accept-Encoding": "identity",
            "Range": f"bytes={start}-{start + size - 1}",
        }
        try:
            timeout = httpx2.Timeout(deadline.left())
            with self._client.stream("GET", url, headers=headers, timeout=timeout) as response:
                hub.check_status(response, self._listing, self._remote)
                whole = start == 0 and size == self.size  # a 200 is then the bytes asked for
                if response.status_code != 206 and not whole:  # else a 200 is the whole file: never read it
                    raise DownloadError(
                        f"{self.name}: the server ignored the byte range (HTTP {response.status_code})",
                        hint="plan after `dsv4 pull`, or use a server that answers range requests",
                    )
                m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", response.headers.get("Content-Range", "").strip())
                if response.status_code == 206 and (not m or int(m[1]) != start or int(m[2]) != start + size - 1):
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
