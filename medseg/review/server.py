"""The local server of `medseg view`: only well-formed paths below its folder are answered.

Malformed paths get 400, missing ones (and links out of the folder, and medseg's own hidden
files) 404, and never a traceback.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import re
import socket
import sys
import threading
import time
import urllib.parse
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from medseg.constants import DEFAULT_HOST
from medseg.review.batch import LOOPBACK, MAX_REQUEST_PATH, PAGE_NAME, ReviewError

__all__ = ["ReviewServer"]

if TYPE_CHECKING:
    from typing_extensions import Self


log = logging.getLogger(__name__)


_PERCENT_OK = re.compile(r"%(?![0-9A-Fa-f]{2})")


def _request_segments(target: str) -> tuple[list[str], bool]:
    """The folder-relative name segments an HTTP request target asks for, and whether it ends in '/'.

    ValueError (the server answers 400) where the target is malformed. Why so strict: the page
    asks only for ``/review.html`` and ``/review/case-NNNN.js``, so NUL or control bytes, bad
    percent-encoding or UTF-8, ``.`` / ``..`` / empty segments, backslashes, drive letters and
    absolute-form or overlong targets come from a probe or a broken client, never the page.
    """
    if len(target) > MAX_REQUEST_PATH:
        raise ValueError(f"the path is longer than {MAX_REQUEST_PATH} characters")
    if not target.startswith("/"):
        raise ValueError("the target is not a path starting with '/'")
    path = target.split("?", 1)[0].split("#", 1)[0]
    if any(ord(c) <= 0x20 or ord(c) >= 0x7F or c == "\\" for c in path):
        raise ValueError("the path holds a space, control, non-ASCII or backslash character unencoded")
    if _PERCENT_OK.search(path):
        raise ValueError("the path holds a '%' not followed by two hex digits")
    try:
        decoded = urllib.parse.unquote_to_bytes(path).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError("the path's percent-encoded bytes are not UTF-8") from exc
    if any(ord(c) < 0x20 or ord(c) == 0x7F or c == "\\" for c in decoded):
        raise ValueError("the decoded path holds a NUL, control or backslash character")
    parts = decoded[1:].split("/")
    trailing = len(parts) > 1 and parts[-1] == ""
    if trailing or parts == [""]:
        parts = parts[:-1]
    for part in parts:
        if part in ("", ".", ".."):
            raise ValueError("the path has an empty, '.' or '..' segment")
        if ":" in part or len(part) > 255:
            raise ValueError("a path segment holds ':' (a drive or stream name) or is over 255 characters")
    return parts, trailing or decoded == "/"


class _Handler(SimpleHTTPRequestHandler):
    """Read-only files below one folder: no listings, no way out (``..``, links) of it.

    The base class maps the URL to a file itself (and raises on a NUL byte); here every target
    is parsed strictly first (400), then resolved and checked to lie in the folder (404).
    """

    extensions_map: ClassVar[dict[str, str]] = {
        **SimpleHTTPRequestHandler.extensions_map,
        ".js": "text/javascript",
        ".html": "text/html",
    }

    def send_head(self):  # type: ignore[override]
        allowed = getattr(self.server, "allowed_hosts", None)
        if allowed is not None and self.headers.get("Host", "").lower() not in allowed:
            self.send_error(403, "Unexpected Host header")  # a page elsewhere reaching in (DNS rebinding)
            return None
        words = self.requestline.split()  # the target as sent: the base class folds a leading '//' into '/'
        try:
            parts, wants_folder = _request_segments(words[1] if len(words) >= 2 else self.path)
        except ValueError as exc:
            self.send_error(400, "Bad request path", f"{exc}; ask for /{PAGE_NAME}")
            return None
        if any(part.startswith(".") for part in parts):  # .medseg/ (ledger, journal): input paths, not for the page
            self.send_error(404, "File not found")
            return None
        root = Path(self.directory).resolve()
        try:
            resolved = root.joinpath(*parts).resolve(strict=True)
        except (OSError, RuntimeError, ValueError):
            self.send_error(404, "Not found")
            return None
        if not resolved.is_relative_to(root):
            self.send_error(404, "Not found")  # a link out of the folder: as if it were not there
            return None
        if resolved.is_dir():
            if resolved == root:
                self.send_response(302)
                self.send_header("Location", "/" + PAGE_NAME)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            self.send_error(403, "No folder listings")
            return None
        if wants_folder or not resolved.is_file():
            self.send_error(404, "Not found")  # 'file/' or a device, socket or pipe
            return None
        return self._open(resolved)

    def _open(self, resolved: Path) -> io.BufferedReader | None:
        """Headers and the open file, checking that what was opened is what was resolved (no swap)."""
        try:
            handle = resolved.open("rb")
        except OSError:
            self.send_error(404, "Not found")
            return None
        try:
            opened, named = os.fstat(handle.fileno()), os.stat(resolved)
            if (opened.st_dev, opened.st_ino) != (named.st_dev, named.st_ino):
                raise FileNotFoundError(resolved)
            self.send_response(200)
            self.send_header("Content-Type", self.guess_type(str(resolved)))
            self.send_header("Content-Length", str(opened.st_size))
            self.send_header("Last-Modified", self.date_time_string(int(opened.st_mtime)))
            self.end_headers()
        except OSError:
            handle.close()
            self.send_error(404, "Not found")
            return None
        except BaseException:
            handle.close()
            raise
        return handle

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # the base class's argument name
        log.debug("%s %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    """One line in the log, not a traceback on stderr, when a request ends in an exception
    (mostly a browser closing the connection mid-file)."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        level = logging.DEBUG if isinstance(exc, ConnectionError) else logging.WARNING
        log.log(level, "medseg view: request from %s ended early: %s: %s", client_address[0], type(exc).__name__, exc)


class ReviewServer:
    """Serves one folder over HTTP from a background thread; 127.0.0.1 and a free port by default.

    Example::

        with ReviewServer("predictions") as server:
            print(server.url + "review.html")
    """

    def __init__(self, root: Path | str, host: str = DEFAULT_HOST, port: int = 0) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise ReviewError(f"{root}: no such folder; pass the output folder of `medseg predict`")
        handler = functools.partial(_Handler, directory=str(self.root))
        server_class = type(
            "Server",
            (_Server,),
            {
                "address_family": socket.AF_INET6 if ":" in host else socket.AF_INET,
            },
        )
        try:
            self.httpd = server_class((host, port), handler)
        except OSError as exc:
            raise ReviewError(
                f"cannot serve on {host}:{port} ({exc.strerror or exc}); choose another --port, "
                "or leave it out for a free one"
            ) from exc
        self._thread: threading.Thread | None = None
        bound = self.httpd.server_address[1]
        if host in LOOPBACK:  # only this machine's names, so another site cannot borrow the port
            self.httpd.allowed_hosts = {f"{name}:{bound}" for name in ("127.0.0.1", "localhost", "[::1]")}

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"

    def start(self) -> ReviewServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="medseg-view", daemon=True)
        self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> None:
        """Block until the server stops (or ``timeout`` seconds pass).

        Joins in short slices: a signal that lands just before one untimed join ran its handler only
        when the join ended, never here (`medseg view` ignored SIGTERM in 2 of 8 tries); a timed join
        returns to Python often enough that Ctrl+C and SIGTERM always stop it.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._thread is not None and self._thread.is_alive():
            step = 0.25 if deadline is None else min(0.25, deadline - time.monotonic())
            if step <= 0:
                return
            self._thread.join(step)

    def stop(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(5)
            self._thread = None
        self.httpd.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
