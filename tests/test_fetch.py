"""Downloading MNIST, against real HTTP servers on 127.0.0.1 serving good, corrupt and no files."""

from __future__ import annotations

import functools
import hashlib
import http.server
import shutil
import socket
import threading
from pathlib import Path

import pytest

from pbp_hpc.errors import DataError
from pbp_hpc.data.fetch import MNIST_FILES, default_cache_dir, fetch_mnist, verify_sha256
from pbp_hpc.data.mnist import find_files, resolve_data_dir


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def no_proxies(monkeypatch):
    """A proxy from the environment would send requests for 127.0.0.1 elsewhere."""
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def serve():
    """serve(directory) -> base URL of a live HTTP server for it; all are shut down afterwards."""
    servers = []

    def start(directory: Path) -> str:
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        servers.append((server, thread))
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def good_mirror(serve, mnist_dir, tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("good")
    for name in MNIST_FILES:
        shutil.copy(mnist_dir / name, directory / name)
    return serve(directory)


@pytest.fixture(scope="module")
def corrupt_copies(mnist_dir, tmp_path_factory) -> Path:
    """Each file with one byte flipped in the middle: same size, wrong checksum."""
    directory = tmp_path_factory.mktemp("corrupt")
    for name in MNIST_FILES:
        data = bytearray((mnist_dir / name).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (directory / name).write_bytes(bytes(data))
    return directory


@pytest.fixture(scope="module")
def corrupt_mirror(serve, corrupt_copies) -> str:
    return serve(corrupt_copies)


@pytest.fixture
def closed_port_url() -> str:
    with socket.socket() as s:  # bind, then close: nothing listens there any more
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/mnist/"


def test_all_four_files_are_downloaded_into_a_new_directory_and_verify(tmp_path, good_mirror, mnist_dir):
    dest = tmp_path / "new" / "cache"
    assert fetch_mnist(dest, [good_mirror], timeout=10) == dest
    assert sorted(p.name for p in dest.iterdir()) == sorted(MNIST_FILES)  # no temporary files left
    for name, expected in MNIST_FILES.items():
        verify_sha256(dest / name, expected)
        assert (dest / name).read_bytes() == (mnist_dir / name).read_bytes()


def test_a_corrupt_download_is_refused_and_not_left_behind(tmp_path, corrupt_mirror, corrupt_copies):
    dest = tmp_path / "dest"
    with pytest.raises(DataError, match="SHA-256 checksum mismatch") as info:
        fetch_mnist(dest, [corrupt_mirror], timeout=10)
    message = str(info.value)
    first = next(iter(MNIST_FILES))
    assert first in message and corrupt_mirror in message
    assert MNIST_FILES[first] in message and sha256(corrupt_copies / first) in message
    assert list(dest.iterdir()) == []


def test_after_a_corrupt_mirror_the_next_mirror_is_tried(tmp_path, corrupt_mirror, good_mirror):
    dest = fetch_mnist(tmp_path / "dest", [corrupt_mirror, good_mirror], timeout=10)
    assert sorted(p.name for p in dest.iterdir()) == sorted(MNIST_FILES)
    for name, expected in MNIST_FILES.items():
        verify_sha256(dest / name, expected)


def test_unreachable_mirrors_are_all_listed_with_how_to_provide_the_files(tmp_path, closed_port_url, serve):
    (tmp_path / "empty").mkdir()
    missing = serve(tmp_path / "empty")  # a live server that answers 404
    with pytest.raises(DataError) as info:
        fetch_mnist(tmp_path / "dest", [closed_port_url, missing], timeout=10)
    message = str(info.value)
    assert "every mirror failed" in message
    assert closed_port_url in message and "Connection refused" in message
    assert missing in message and "404" in message
    assert "--data-dir DIR" in message and "PBP_HPC_DATA" in message
    assert list((tmp_path / "dest").iterdir()) == []


def test_files_already_present_are_verified_and_not_downloaded_again(tmp_path, mnist_dir, closed_port_url):
    for name in MNIST_FILES:
        shutil.copy(mnist_dir / name, tmp_path / name)
    assert fetch_mnist(tmp_path, [closed_port_url]) == tmp_path


def test_a_damaged_file_already_present_is_reported_and_kept(tmp_path, mnist_dir, good_mirror):
    for name in MNIST_FILES:
        shutil.copy(mnist_dir / name, tmp_path / name)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not mnist")
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz: SHA-256 checksum mismatch.*delete it"):
        fetch_mnist(tmp_path, [good_mirror])
    assert (tmp_path / "t10k-labels-idx1-ubyte.gz").read_bytes() == b"not mnist"


def test_verify_sha256_names_the_file_and_both_hashes(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    actual = hashlib.sha256(b"abc").hexdigest()
    verify_sha256(path, actual.upper())
    with pytest.raises(DataError, match=f"{path}: SHA-256 checksum mismatch: expected 0+, got {actual}"):
        verify_sha256(path, "0" * 64)


def test_resolve_data_dir_fills_an_empty_cache_from_the_mirrors(tmp_path, monkeypatch, good_mirror):
    monkeypatch.delenv("PBP_HPC_DATA", raising=False)
    monkeypatch.setenv("PBP_HPC_CACHE", str(tmp_path / "cache"))
    assert resolve_data_dir(None, mirrors=[good_mirror]) == tmp_path / "cache"
    assert find_files(tmp_path / "cache") is not None


def test_the_cache_directory_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("PBP_HPC_CACHE", raising=False)
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "pbp_hpc" / "mnist"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "pbp_hpc" / "mnist"
    monkeypatch.setenv("PBP_HPC_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
