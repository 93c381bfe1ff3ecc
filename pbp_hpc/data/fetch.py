"""Downloading MNIST for users who have no copy: stdlib only, checksummed, atomic.

Every file is verified against the SHA-256 of the canonical distribution before it is given its
real name, so a half-finished download, a captive-portal HTML page or a tampered mirror can never
be mistaken for data. Files are streamed to a temporary name in the destination and moved into
place with os.replace, which also makes concurrent downloads (every MPI rank of a first run)
safe: each writes its own temporary file and the last identical rename wins.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Optional, Sequence

from pbp_hpc.errors import DataError

MNIST_FILES: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}

# yann.lecun.com is left out on purpose: it has answered with 403 or not at all for years.
DEFAULT_MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

_CHUNK = 1 << 16
DEADLINE_S = 600.0  # the whole download (four files, ~11 MB): minutes even on a slow link
_HOW_TO_PROVIDE = (
    "To provide the files by hand, put the four files "
    + ", ".join(MNIST_FILES)
    + " (gzip-compressed or not) in a directory and pass --data-dir DIR (or set data.dir in the"
    " config, or the environment variable PBP_HPC_DATA=DIR)."
)


def default_cache_dir() -> Path:
    """Where downloaded MNIST lives: $PBP_HPC_CACHE, else $XDG_CACHE_HOME/pbp_hpc/mnist, else ~/.cache/pbp_hpc/mnist."""
    if os.environ.get("PBP_HPC_CACHE"):
        return Path(os.environ["PBP_HPC_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "pbp_hpc" / "mnist"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str) -> None:
    """Raise DataError unless the file's SHA-256 is `expected` (hex, any case)."""
    try:
        actual = _sha256(Path(path))
    except OSError as e:
        raise DataError(f"cannot read {path} to verify its checksum: {e.strerror or e}") from e
    if actual != expected.lower():
        raise DataError(f"{path}: SHA-256 checksum mismatch: expected {expected.lower()}, got {actual}")


def _stream(url: str, out: Any, timeout: float, cancel: threading.Event, failure: list[BaseException]) -> None:
    """In a thread: url's body into out, until done, failed or cancelled."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            while not cancel.is_set():
                chunk = response.read1(_CHUNK)  # what has arrived: a slow server cannot hold one read for long
                if not chunk:
                    return
                out.write(chunk)
    except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
        failure.append(e)


def _download(url: str, target: Path, expected: str, timeout: float, deadline: float) -> None:
    """Fetch url to target by time.monotonic() `deadline`, or raise DataError and leave nothing behind.

    The transfer runs in a daemon thread that this one waits for until the deadline: a server
    that sends a byte every few seconds, or holds the headers back, cannot make it last longer,
    and a stop signal (runtime.Stopped) interrupts the wait at once."""
    try:
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    except OSError as e:
        raise DataError(f"cannot create a temporary file in {target.parent}: {e.strerror or e}") from e
    tmp = Path(tmp_name)
    cancel = threading.Event()
    try:
        with os.fdopen(fd, "wb") as out:
            failure: list[BaseException] = []
            left = deadline - time.monotonic()
            worker = threading.Thread(target=_stream, args=(url, out, max(0.1, min(timeout, left)), cancel, failure),
                                      daemon=True, name="pbp_hpc-download")
            worker.start()
            # polled with sleep, not join(timeout): a stop signal's handler raises Stopped, and raised
            # inside join's Condition.wait it can strike while the lock is re-taken, which leaves
            # "RuntimeError: release unlocked lock" instead of Stopped (seen under CI load)
            while worker.is_alive() and time.monotonic() < deadline:
                time.sleep(0.02)
            if worker.is_alive():
                raise DataError(f"did not finish within the overall deadline ({_budget[0]:g} s for the whole download); "
                                "the connection is too slow or stalled")
            if failure:
                e = failure[0]
                # URLError/HTTPError/timeouts/disk full are OSErrors; IncompleteRead is not; ValueError: bad URL.
                if isinstance(e, (OSError, http.client.HTTPException, ValueError)):
                    raise DataError(str(e) or type(e).__name__) from e
                raise e
        actual = _sha256(tmp)
        if actual != expected:
            raise DataError(f"SHA-256 checksum mismatch for {target.name}: expected {expected}, got {actual}; file refused")
        os.replace(tmp, target)
    finally:
        cancel.set()  # a transfer still running stops at its next chunk
        tmp.unlink(missing_ok=True)  # no-op after a successful replace


_budget = [0.0]  # the deadline in force, in seconds, for messages


def _fetch_one(name: str, dest: Path, mirrors: Sequence[str], timeout: float, deadline: float) -> None:
    failures = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + name
        if time.monotonic() >= deadline:
            failures.append(f"  {url}: not tried: the overall deadline ({_budget[0]:g} s) has passed")
            continue
        try:
            _download(url, dest / name, MNIST_FILES[name], timeout, deadline)
            return
        except DataError as e:
            failures.append(f"  {url}: {e}")
    listed = "\n".join(failures) or "  (no mirrors given)"
    raise DataError(f"could not download {name} into {dest}; every mirror failed:\n{listed}\n{_HOW_TO_PROVIDE}")


def fetch_mnist(dest: Path, mirrors: Sequence[str] = DEFAULT_MIRRORS, timeout: float = 30.0,
                deadline_s: Optional[float] = None) -> Path:
    """Make sure dest holds the four verified MNIST .gz files, downloading the missing ones; return dest.

    timeout: seconds any one network operation may wait; deadline_s (default DEADLINE_S,
    $PBP_HPC_FETCH_DEADLINE): seconds the whole download may take, however the server behaves."""
    dest = Path(dest).expanduser()
    budget = deadline_s if deadline_s is not None else float(os.environ.get("PBP_HPC_FETCH_DEADLINE") or DEADLINE_S)
    _budget[0] = budget
    deadline = time.monotonic() + budget
    if isinstance(mirrors, str):  # a lone URL would otherwise be iterated letter by letter
        mirrors = (mirrors,)
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the MNIST directory {dest}: {e.strerror or e}. {_HOW_TO_PROVIDE}") from e
    for name, expected in MNIST_FILES.items():
        target = dest / name
        if not target.exists():
            _fetch_one(name, dest, mirrors, timeout, deadline)
            continue
        # An existing file is never deleted: it may be the user's own (another data set by the
        # same name), so say what is wrong and let them decide.
        try:
            verify_sha256(target, expected)
        except DataError as e:
            raise DataError(
                f"{e}. It is not the canonical MNIST file (a damaged copy, or another data set "
                f"under the same name); delete it to download it again, or pass --data-dir DIR "
                f"to use your own files from another directory."
            ) from None
    return dest
