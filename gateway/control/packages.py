"""Model and processor packages by URL, as EAS service.json files give them.

`model_path` and `processor_path` may be `http(s)://` files or archives
(tar.gz/tgz, tar, tar.bz2, zip). The launcher fetches each URL once, in a
thread, into the gateway's package cache:

- `urls/<sha256 of the URL>` names the content it gave, `content/<sha256 of
  the bytes>/` holds it: a file as it came, an archive extracted. The same
  bytes under two URLs are kept once; a URL fetched once is not fetched again
  (a new package needs a new URL, as on EAS, where URLs name versions).
- Extraction is safe: no member may land outside its directory (absolute
  paths, `..`, links pointing out), only files, directories and links inside
  are taken (tarfile's "data" filter), and the download and the extracted
  total are both bounded (`INFERGATE_MAX_PACKAGE_MB`, default 4096).

While a URL is fetched, services that need it show Creating with the bytes
received; a failed fetch makes them Failed with the reason, and is tried again
after `RETRY_S`. `model_entry` (and `processor_entry`) pick the file inside an
extracted archive, as for a local directory.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
import threading
import time
import urllib.request
import zipfile

log = logging.getLogger("infergate.packages")

MAX_BYTES = int(os.environ.get("INFERGATE_MAX_PACKAGE_MB", "4096")) << 20
RETRY_S = 30.0
TIMEOUT_S = 60.0
_ARCHIVES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar", ".zip")


def is_url(value) -> bool:
    return isinstance(value, str) and value.startswith(("http://", "https://"))


class NotFetched(Exception):
    """A URL the cache does not hold yet (the launcher fetches it)."""

    def __init__(self, field: str, url: str):
        super().__init__(f"{field} {url} is not fetched yet")
        self.field = field
        self.url = url


class FetchFailed(Exception):
    pass


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class Packages:
    def __init__(self, root: str):
        self.root = root
        for sub in ("urls", "content", "partial"):
            os.makedirs(os.path.join(root, sub), mode=0o700, exist_ok=True)
        self.lock = threading.Lock()
        self.progress: dict[str, int] = {}             # url -> bytes received, while fetching
        self.failures: dict[str, tuple[float, str]] = {}  # url -> (when, why)

    # -- lookups (any thread) ------------------------------------------------------------------

    def local(self, url: str) -> str | None:
        """Where a fetched URL's content is (a file, or an extracted directory)."""
        try:
            with open(os.path.join(self.root, "urls", _digest(url))) as f:
                name = f.read().strip()
        except OSError:
            return None
        path = os.path.join(self.root, "content", name)
        return path if os.path.exists(path) else None

    def state(self, url: str) -> str | None:
        """"fetching N MB" or "failed: why" (None: neither)."""
        with self.lock:
            if url in self.progress:
                return f"fetching {url} ({self.progress[url] / 1e6:.1f} MB)"
            failure = self.failures.get(url)
        if failure is not None:
            return f"fetching {url} failed: {failure[1]}"
        return None

    def should_fetch(self, url: str) -> bool:
        """Not fetched, not being fetched, and no failure in the last RETRY_S."""
        with self.lock:
            if url in self.progress:
                return False
            failure = self.failures.get(url)
            if failure is not None and time.monotonic() - failure[0] < RETRY_S:
                return False
            self.progress[url] = 0
        return True

    # -- fetching (a worker thread) ------------------------------------------------------------

    def fetch(self, url: str) -> None:
        try:
            self._fetch(url)
            with self.lock:
                self.failures.pop(url, None)
        except Exception as exc:  # any reason is the service's Failed message
            reason = f"{type(exc).__name__}: {exc}" if not isinstance(exc, FetchFailed) \
                else str(exc)
            log.warning("fetching %s failed: %s", url, reason)
            with self.lock:
                self.failures[url] = (time.monotonic(), reason)
        finally:
            with self.lock:
                self.progress.pop(url, None)

    def _fetch(self, url: str) -> None:
        partial = tempfile.mkdtemp(dir=os.path.join(self.root, "partial"))
        try:
            download = os.path.join(partial, "download")
            digest = hashlib.sha256()
            received = 0
            with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, \
                    open(download, "wb") as out:
                while chunk := response.read(1 << 20):
                    received += len(chunk)
                    if received > MAX_BYTES:
                        raise FetchFailed(f"larger than the {MAX_BYTES >> 20} MB package limit")
                    digest.update(chunk)
                    out.write(chunk)
                    with self.lock:
                        self.progress[url] = received
            name = digest.hexdigest()
            target = os.path.join(self.root, "content", name)
            basename = os.path.basename(urllib.request.urlparse(url).path) or "download"
            kind = next((s for s in _ARCHIVES if basename.lower().endswith(s)), None)
            if not os.path.exists(target):  # (the same bytes from another URL: kept once)
                staged = os.path.join(partial, "content")
                os.mkdir(staged, 0o700)
                if kind is None:
                    os.replace(download, os.path.join(staged, basename))
                else:
                    _extract(download, staged, kind)
                os.replace(staged, target)
            if kind is None:  # a file: the one file in its directory
                name = os.path.join(name, os.listdir(target)[0])
            index = os.path.join(partial, "index")
            with open(index, "w") as f:
                f.write(name)
            os.replace(index, os.path.join(self.root, "urls", _digest(url)))
        finally:
            shutil.rmtree(partial, ignore_errors=True)


def _extract(archive: str, into: str, kind: str) -> None:
    """Extract, refusing members that would land outside `into` and archives that unpack
    past MAX_BYTES."""
    if kind == ".zip":
        with zipfile.ZipFile(archive) as z:
            total = 0
            for info in z.infolist():
                _inside(into, info.filename)
                total += info.file_size
                if total > MAX_BYTES:
                    raise FetchFailed(f"unpacks past the {MAX_BYTES >> 20} MB package limit")
            z.extractall(into)
        return
    with tarfile.open(archive) as tar:
        total = 0
        for member in tar.getmembers():
            _inside(into, member.name)
            if member.issym() or member.islnk():
                link = member.linkname if member.islnk() else os.path.join(
                    os.path.dirname(member.name), member.linkname)
                _inside(into, link, what=f"link {member.name!r} -> {member.linkname!r}")
            total += member.size
            if total > MAX_BYTES:
                raise FetchFailed(f"unpacks past the {MAX_BYTES >> 20} MB package limit")
        try:
            tar.extractall(into, filter="data")
        except tarfile.FilterError as exc:
            raise FetchFailed(f"refused archive member: {exc}") from None


def _inside(root: str, name: str, what: str | None = None) -> None:
    target = os.path.realpath(os.path.join(root, name))
    if os.path.isabs(name) or not (target + os.sep).startswith(os.path.realpath(root) + os.sep):
        raise FetchFailed(f"archive member {what or repr(name)} points outside the package")


_packages: Packages | None = None


def configure(root: str) -> Packages:
    """The gateway's package cache (the launcher fetches into it)."""
    global _packages
    _packages = Packages(root)
    return _packages


def current() -> Packages | None:
    return _packages
