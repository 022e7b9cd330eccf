"""Trust boundaries of `medseg view` and `medseg data fetch` (issue #15, item 10).

The view server must answer hostile request paths with 400 / 404 and never a traceback, and
never serve a byte from outside its folder. The review page must never embed or link a file
outside the output folder whatever a crafted predictions.json says. `data fetch` must refuse
every scheme but https:// (and file:// inside a mirror) and stop an endless or oversized
source at the declared size, deleting its partial download.

Every server here is started by the test on 127.0.0.1, port 0, in a thread, and stopped by it.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import importlib.util
import json
import logging
import os
import re
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from medseg import cli
from medseg.data import download
from medseg.errors import ManifestError
from medseg.data.download import fetch
from medseg.data.manifest import read_manifest
from medseg.review import MAX_REQUEST_PATH, PAGE_NAME, ReviewServer, write_review

from conftest import CANARY, assert_no_canary, one_file_manifest

# ============================================================================ the view server


@pytest.fixture
def served(tmp_path: Path) -> dict[str, Path]:
    """A folder to serve (page, case file, links out of it) and a canary file beside it."""
    folder = tmp_path / "served"
    (folder / "review").mkdir(parents=True)
    (folder / PAGE_NAME).write_text("<!DOCTYPE html><title>review</title>the page")
    (folder / "review" / "case-0001.js").write_text("medsegReview.receive({});\n")
    (folder / ".medseg" / "ledger").mkdir(parents=True)
    (folder / ".medseg" / "ledger" / "case.json").write_bytes(b'{"input": "' + CANARY + b'"}')
    secret = tmp_path / "secret.txt"
    secret.write_bytes(CANARY)
    (folder / "link.txt").symlink_to(secret)  # a file link out of the folder
    (folder / "out").symlink_to(tmp_path)  # a folder link out of the folder
    return {"folder": folder, "secret": secret}


def _raw_get(port: int, target: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    """Send ``target`` exactly as given (http.client refuses NUL and other bytes a probe would send)."""
    request = b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n\r\n" % port
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1."), f"{target[:60]!r}: the server dropped the connection without an answer"
    return int(data.split(b" ", 2)[1]), data


HOSTILE = [
    # NUL and control bytes, raw and percent-encoded
    (b"/%00", 400),
    (b"/review.html%00.txt", 400),
    (b"/review.html\x00", 400),
    (b"/review%0a.html", 400),
    # broken percent-encoding and UTF-8
    (b"/%zz", 400),
    (b"/review.html%", 400),
    (b"/%e2%28%a1", 400),
    # '..' and '.' segments, raw and encoded
    (b"/../secret.txt", 400),
    (b"/%2e%2e/secret.txt", 400),
    (b"/review/..%2f..%2fsecret.txt", 400),
    (b"/review.html/../../secret.txt", 400),
    (b"/./review.html", 400),
    # absolute paths and targets that are not paths
    (b"//etc/passwd", 400),
    (b"/%2Fetc%2Fpasswd", 400),
    (b"http://127.0.0.1/../secret.txt", 400),
    (b"*", 400),
    # backslashes and drive letters
    (b"/..\\secret.txt", 400),
    (b"/%5c..%5csecret.txt", 400),
    (b"/C:%5cWindows%5cwin.ini", 400),
    (b"/c:/secret.txt", 400),
    # overlong
    (b"/" + b"a" * (MAX_REQUEST_PATH + 10), 400),
    (b"/review/" + b"b" * 300 + b".js", 400),
    # well formed, but not there (or only through a link out of the folder)
    (b"/link.txt", 404),
    (b"/out/secret.txt", 404),
    (b"/missing.html", 404),
    (b"/%252e%252e/secret.txt", 404),
    (b"/review.html/", 404),
    (b"/review/case-9999.js", 404),
    # medseg's own hidden records (the ledger names every input path), though inside the folder
    (b"/.medseg/ledger/case.json", 404),
    (b"/%2emedseg/ledger/case.json", 404),
]


def test_view_server_answers_hostile_paths_with_400_or_404_and_no_traceback(
    served: dict[str, Path], capfd: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    assert len(HOSTILE) >= 12
    caplog.set_level(logging.DEBUG, logger="medseg.review")
    with ReviewServer(served["folder"]) as server:
        port = server.httpd.server_address[1]
        status, body = _raw_get(port, b"/review.html")  # the folder is served at all
        assert status == 200 and body.endswith(b"the page")
        answers = {}
        for target, expected in HOSTILE:
            status, body = _raw_get(port, target)
            assert_no_canary(body, repr(target[:60]))
            answers[target[:60]] = (status, expected)
        assert _raw_get(port, b"/review/case-0001.js")[0] == 200  # still serving after all that
    wrong = {target: got for target, got in answers.items() if got[0] != got[1]}
    assert not wrong, f"(status, expected): {wrong}"
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Error" not in err, err
    assert not [r for r in caplog.records if r.exc_info], "a request logged an exception with a traceback"


def test_view_server_logs_a_dropped_connection_in_one_line(
    served: dict[str, Path], capfd: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    """A browser that resets the connection mid-file makes the server's write fail: one log line, no traceback."""
    (served["folder"] / "big.bin").write_bytes(b"\0" * (64 * 2**20))
    caplog.set_level(logging.DEBUG, logger="medseg.review")
    with ReviewServer(served["folder"]) as server:
        port = server.httpd.server_address[1]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /big.bin HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % port)
            assert sock.recv(64).startswith(b"HTTP/1.0 200")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any("ended early" in r.getMessage() for r in caplog.records):
            time.sleep(0.05)
        assert _raw_get(port, b"/review.html")[0] == 200
    ended = [r for r in caplog.records if "ended early" in r.getMessage()]
    assert ended and not ended[0].exc_info and "127.0.0.1" in ended[0].getMessage()
    assert "Traceback" not in capfd.readouterr().err


# ============================================================================ the review page


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


@pytest.fixture
def batch_folders(tmp_path: Path) -> dict[str, Path]:
    """Inputs, an output folder with one good mask, and canaries (text and same-shape PNGs) outside both."""
    rng = np.random.default_rng(0)
    images, out, outside = tmp_path / "images", tmp_path / "out", tmp_path / "outside"
    good_scan = _png(images / "good.png", rng.integers(0, 255, (24, 32), dtype=np.uint8))
    mask = np.zeros((24, 32), np.uint8)
    mask[4:12, 6:20] = 1
    good_mask = _png(out / "good.png", mask)
    canary_text = outside / "canary.txt"
    outside.mkdir()
    canary_text.write_bytes(CANARY)
    canary_scan = _png(outside / "canary.png", np.full((24, 32), 201, np.uint8))  # same shape as the good scan
    canary_mask = _png(outside / "canary_mask.png", np.ones((24, 32), np.uint8))
    return {
        "root": tmp_path,
        "images": images,
        "out": out,
        "outside": outside,
        "good_scan": good_scan,
        "good_mask": good_mask,
        "canary_text": canary_text,
        "canary_scan": canary_scan,
        "canary_mask": canary_mask,
    }


def _good(f: dict[str, Path]) -> dict[str, Any]:
    return {
        "case": "good",
        "kind": "png",
        "input": str(f["good_scan"]),
        "status": "written",
        "outputs": [str(f["good_mask"])],
        "reason": "",
        "seconds": 0.1,
    }


def _variant(name: str, f: dict[str, Path]) -> tuple[dict[str, Any], list[dict[str, Any]], bool]:
    """(batch fields, crafted records, whether the good case's scan may still be shown)."""
    rec = {"kind": "png", "status": "written", "reason": "", "seconds": 0.1, "input": str(f["good_scan"])}
    out = f["out"]
    if name == "absolute_output":
        return {}, [{**rec, "case": "bad", "outputs": [str(f["canary_text"]), str(f["canary_mask"])]}], True
    if name == "dotdot_output":
        return {}, [{**rec, "case": "bad", "outputs": [f"{out}/../outside/canary_mask.png"]}], True
    if name == "symlink_output":
        (out / "bad.png").symlink_to(f["canary_mask"])
        return {}, [{**rec, "case": "bad", "outputs": [str(out / "bad.png")]}], True
    if name == "case_id_leads_out":
        return {}, [{**rec, "case": "../outside/canary_mask", "outputs": []}], True
    if name == "png_folder_with_link_out":
        (out / "seq").mkdir()
        _png(out / "seq" / "0.png", np.zeros((24, 32), np.uint8))
        (out / "seq" / "1.png").symlink_to(f["canary_mask"])
        return {}, [{**rec, "case": "seq", "outputs": []}], True
    if name == "input_is_outside_file":
        return (
            {},
            [
                {**_good(f), "case": "bad", "input": str(f["canary_scan"])},
                {**_good(f), "case": "bad2", "input": str(f["canary_text"])},
            ],
            True,
        )
    if name == "input_symlink_out":
        (f["images"] / "bad.png").symlink_to(f["canary_scan"])
        return {}, [{**_good(f), "case": "bad", "input": str(f["images"] / "bad.png")}], True
    if name == "input_folder_is_root":
        return {"input": "/"}, [{**_good(f), "case": "bad", "input": str(f["canary_scan"])}], False
    if name == "nul_and_dotdot_strings":
        nul = {**rec, "case": "bad\x00", "input": "/etc/passwd\x00", "outputs": ["out/\x00.png", "../../.."]}
        return {}, [nul], True
    if name == "learning_curves_link_out":
        run = f["root"] / "run"
        run.mkdir()
        (run / "learning_curves.png").symlink_to(f["canary_text"])
        return {"checkpoint": str(run / "best.pt")}, [], True
    raise AssertionError(name)


VARIANTS = [
    "absolute_output",
    "dotdot_output",
    "symlink_output",
    "case_id_leads_out",
    "png_folder_with_link_out",
    "input_is_outside_file",
    "input_symlink_out",
    "input_folder_is_root",
    "nul_and_dotdot_strings",
    "learning_curves_link_out",
]


def _unpacked(packed: str) -> np.ndarray:
    data = np.frombuffer(zlib.decompress(base64.b64decode(packed)), np.uint8)
    assert data.size
    return data


def _payload(path: Path) -> dict[str, Any]:
    text = path.read_text()
    return json.loads(text[len("medsegReview.receive(") : text.rstrip().rindex(")")])


@pytest.mark.parametrize("name", VARIANTS)
def test_review_page_never_embeds_or_links_files_outside_the_output_folder(
    name: str, batch_folders: dict[str, Path]
) -> None:
    f = batch_folders
    fields, crafted, good_scan_shown = _variant(name, f)
    batch = {
        "medseg_version": "test",
        "input": str(f["images"]),
        "checkpoint": "",
        "classes": ["background", "cell"],
        **fields,
        "records": [_good(f), *crafted],
    }
    (f["out"] / "predictions.json").write_text(json.dumps(batch))
    page = write_review(f["out"], progress=False)

    html = page.read_bytes()
    files = sorted((f["out"] / "review").glob("case-*.js"))
    for blob, where in [(html, "review.html"), *((p.read_bytes(), p.name) for p in files)]:
        assert_no_canary(blob, where)  # (problem lines may name a canary's path, as text)
    links = re.findall(rb'\b(?:src|href)\s*=\s*"([^"]*)"', html)
    assert links and all(link.startswith((b"data:", b"#")) for link in links), links
    assert "Learning curves of the training run" not in page.read_text()

    # the good case is shown in full (the page still works), the crafted records are not embedded
    good = _payload(f["out"] / "review" / "case-0001.js")
    assert good["id"] == "good" and good["mask"] and (good["image"] is not None) == good_scan_shown
    for path in files[1:]:
        payload = _payload(path)
        full_slice = 24 * 32  # the canary mask is ones throughout; the good one has 8 x 14 of them
        assert np.count_nonzero(_unpacked(payload["mask"])) < full_slice, f"{path.name}: the canary mask was embedded"
        image = payload["image"]
        canary_scan = image is not None and image["offset"] == 201 and not _unpacked(image["data"]).any()
        assert not canary_scan, f"{path.name}: the canary scan (all 201) was embedded"

    # and the page says what was refused, as a problem line
    notes = re.search(r'<ul class="notes">(.*?)</ul>', page.read_text(), re.DOTALL).group(1)
    assert "predictions.json" in notes or "learning curves not shown" in notes, notes


def test_review_page_refuses_a_review_folder_that_links_out(batch_folders: dict[str, Path]) -> None:
    f = batch_folders
    elsewhere = f["outside"] / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "case-0042.js").write_text("someone else's file")
    (f["out"] / "review").symlink_to(elsewhere)
    batch = {"input": str(f["images"]), "checkpoint": "", "classes": ["background", "cell"], "records": [_good(f)]}
    (f["out"] / "predictions.json").write_text(json.dumps(batch))
    with pytest.raises(Exception, match="is a link") as err:
        write_review(f["out"], progress=False)
    assert str(f["out"] / "review") in str(err.value) and "remove the link" in str(err.value)
    assert (elsewhere / "case-0042.js").read_text() == "someone else's file"  # not pruned


# ============================================================================ data fetch


@pytest.fixture(autouse=True)
def _no_env_mirror(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEDSEG_DATA_MIRROR", raising=False)
    monkeypatch.delenv("MEDSEG_DATA_DIR", raising=False)


def _files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


class _NeverOpen:
    """An opener the refused URLs must never reach."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, url: str, timeout: float) -> Any:
        self.calls.append(url)
        raise AssertionError(f"opened {url}")


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.org/a.bin",
        "http://example.org/a.bin",
        "HTTP://EXAMPLE.ORG/A.BIN",
        "gopher://example.org/1a.bin",
        "data:application/octet-stream;base64,AAAA",
        "javascript:alert(1)",
        "file:///etc/hostname",
        "example.org/a.bin",
        "https:///no-host/a.bin",
    ],
)
def test_fetch_refuses_every_scheme_but_https(url: str, tmp_path: Path) -> None:
    opener = _NeverOpen()
    dest = tmp_path / "dest"
    with pytest.raises(ManifestError) as err:
        fetch("tiny", dest, manifest=one_file_manifest(tmp_path / "m.csv", url), opener=opener)
    message = str(err.value)
    assert message.startswith(url) and "https://" in message and "--mirror DIR" in message
    assert "tiny/img/a.bin" in message and "\n" not in message
    assert not opener.calls and not _files_under(dest)


def test_fetch_reads_file_urls_only_from_inside_the_mirror(tmp_path: Path) -> None:
    mirror, outside = tmp_path / "mirror", tmp_path / "outside"
    mirror.mkdir()
    (outside / "img").mkdir(parents=True)
    data = b"a small file"
    (outside / "img" / "a.bin").write_bytes(data)
    (mirror / "link.bin").symlink_to(outside / "img" / "a.bin")
    sha = hashlib.sha256(data).hexdigest()
    urls = (
        (outside / "img" / "a.bin").as_uri(),
        (mirror / "link.bin").as_uri(),
        f"{mirror.as_uri()}/../outside/img/a.bin",
    )
    for url in urls:
        with pytest.raises(ManifestError, match="lies outside the mirror") as err:
            fetch("tiny", tmp_path / "dest", mirror=mirror, manifest=one_file_manifest(tmp_path / "m.csv", url, sha))
        assert str(err.value).startswith(url)
    assert not _files_under(tmp_path / "dest")
    (mirror / "copy.bin").write_bytes(data)  # inside the mirror: read (the rule is not "never")
    report = fetch(
        "tiny",
        tmp_path / "dest",
        mirror=mirror,
        manifest=one_file_manifest(tmp_path / "m.csv", (mirror / "copy.bin").as_uri(), sha, len(data)),
    )
    assert report.downloaded == ["img/a.bin"] and (tmp_path / "dest/tiny/img/a.bin").read_bytes() == data


def test_fetch_does_not_open_a_pipe_or_device_named_by_a_file_url(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    os.mkfifo(mirror / "endless")  # opening it would block until a writer came
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            url = (mirror / "endless").as_uri()
            fetch("tiny", tmp_path / "dest", mirror=mirror, manifest=one_file_manifest(tmp_path / "m.csv", url))
        except BaseException as exc:  # noqa: BLE001 (handed to the test thread)
            outcome.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), "fetch blocked opening a FIFO"
    assert outcome and isinstance(outcome[0], ManifestError) and "not a regular file" in str(outcome[0])


def test_redirects_are_followed_to_https_only_and_the_opener_has_no_other_schemes() -> None:
    handler = download._HttpsOnlyRedirect()
    request = urllib.request.Request("https://example.org/a.bin")
    with pytest.raises(ManifestError, match="redirects to http://example.org/b.bin, which is not an https://"):
        handler.redirect_request(request, None, 302, "Found", {}, "http://example.org/b.bin")
    with pytest.raises(ManifestError, match="file:///etc/passwd"):
        handler.redirect_request(request, None, 302, "Found", {}, "file:///etc/passwd")
    followed = handler.redirect_request(request, None, 302, "Found", {}, "https://mirror.example.org/a.bin")
    assert followed.full_url == "https://mirror.example.org/a.bin"
    for url in ("file:///etc/hostname", "ftp://example.org/a", "data:,x", "http://127.0.0.1:9/"):
        with pytest.raises(urllib.error.URLError, match="unknown url type"):
            download._https_opener().open(url, timeout=1)


class _Endless(http.server.BaseHTTPRequestHandler):
    """Zeros without end (bounded at 256 MiB so a broken client cannot keep the test running)."""

    def do_GET(self) -> None:  # the name http.server calls
        self.send_response(200)
        if self.path == "/announced":
            self.send_header("Content-Length", str(10 * 2**30))
        self.end_headers()
        block = b"\0" * 65536
        try:
            for _ in range(4096):
                self.wfile.write(block)
        except OSError:
            pass  # the client stopped reading: what the test wants

    def log_message(self, format: str, *args: Any) -> None:  # the base class's argument name
        pass


@pytest.fixture
def endless() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Endless)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


class _Counting:
    """Opens the local stream in place of an https:// URL and counts the bytes the caller reads."""

    def __init__(self, target: str) -> None:
        self.target, self.read_bytes, self.urls = target, 0, []

    def __call__(self, url: str, timeout: float) -> Any:
        self.urls.append(url)
        response = urllib.request.urlopen(self.target, timeout=timeout)  # the test's own server on 127.0.0.1
        original = response.read

        def read(amount: int = -1) -> bytes:
            chunk = original(amount)
            self.read_bytes += len(chunk)
            return chunk

        response.read = read
        return response


def test_fetch_stops_an_endless_source_at_the_declared_size(endless: str, tmp_path: Path) -> None:
    size = 3 * 2**20 + 17
    opener = _Counting(endless + "/zeros")
    url = "https://data.example.org/endless.bin"
    dest = tmp_path / "dest"
    with pytest.raises(ManifestError) as err:
        fetch("tiny", dest, manifest=one_file_manifest(tmp_path / "m.csv", url, size=size), opener=opener)
    message = str(err.value)
    assert opener.urls == [url] and opener.read_bytes == size + 1  # not a byte more than needed to know
    assert message.startswith(url) and f"more than the {size} bytes" in message and "deleted the partial" in message
    assert message.count(". ") == 0 and "\n" not in message  # one sentence
    assert dest.exists() and not _files_under(dest)  # the partial download is gone


def test_fetch_caps_a_file_without_declared_size(endless: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download, "MAX_UNDECLARED_BYTES", 2**20)
    opener = _Counting(endless + "/zeros")
    with pytest.raises(ManifestError, match="has no size in .* add the file's size in bytes to a size column"):
        fetch(
            "tiny",
            tmp_path / "dest",
            manifest=one_file_manifest(tmp_path / "m.csv", "https://x.example/a"),
            opener=opener,
        )
    assert opener.read_bytes == 2**20 + 1 and not _files_under(tmp_path / "dest")


def test_fetch_refuses_an_announced_length_over_the_declared_size(endless: str, tmp_path: Path) -> None:
    opener = _Counting(endless + "/announced")
    with pytest.raises(ManifestError, match="more than the 1000 bytes"):
        fetch(
            "tiny",
            tmp_path / "dest",
            manifest=one_file_manifest(tmp_path / "m.csv", "https://x.example/a", size=1000),
            opener=opener,
        )
    assert opener.read_bytes == 0 and not _files_under(tmp_path / "dest")


def test_fetch_accepts_a_source_of_exactly_the_declared_size(tmp_path: Path) -> None:
    data = os.urandom(200_000)
    source = tmp_path / "served.bin"
    source.write_bytes(data)
    opener = _Counting(source.as_uri())  # the injected transport; the manifest URL is https
    report = fetch(
        "tiny",
        tmp_path / "dest",
        opener=opener,
        manifest=one_file_manifest(
            tmp_path / "m.csv", "https://x.example/a.bin", hashlib.sha256(data).hexdigest(), len(data)
        ),
    )
    assert report.downloaded == ["img/a.bin"] and (tmp_path / "dest/tiny/img/a.bin").read_bytes() == data


def test_fetch_stops_an_oversized_mirror_file_at_the_declared_size(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    (mirror / "tiny" / "img").mkdir(parents=True)
    with (mirror / "tiny" / "img" / "a.bin").open("wb") as handle:
        handle.truncate(2**30)  # 1 GiB, sparse (no disk used): a thousand times the declared size
    start = time.monotonic()
    with pytest.raises(ManifestError, match="more than the 1048576 bytes .* deleted the partial file"):
        fetch("tiny", tmp_path / "dest", mirror=mirror, manifest=one_file_manifest(tmp_path / "m.csv", "", size=2**20))
    assert time.monotonic() - start < 20 and not _files_under(tmp_path / "dest")


def test_size_column_is_validated(tmp_path: Path) -> None:
    path = one_file_manifest(tmp_path / "m.csv", "https://x.example/a")
    path.write_text(path.read_text().replace(",\r\n", ",12kB\r\n", 1).replace(",\n", ",12kB\n", 1))
    with pytest.raises(ManifestError, match=r"line 2: size '12kB' must be the file's size in bytes"):
        read_manifest(path)
    assert read_manifest(one_file_manifest(tmp_path / "n.csv", "https://x.example/a", size=12))[0].size == 12


def test_cli_names_the_refused_url_and_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    present = tuple(m for m in cli.COMMAND_MODULES if importlib.util.find_spec(m) is not None)
    monkeypatch.setattr(cli, "COMMAND_MODULES", present)
    args = [
        "data",
        "fetch",
        "tiny",
        "--dest",
        str(tmp_path / "d"),
        "--manifest",
        str(one_file_manifest(tmp_path / "m.csv", "ftp://example.org/a.bin")),
    ]
    assert cli.main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("medseg data: error: ftp://example.org/a.bin: is a ftp: URL") and "https://" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1
