"""Class 10 of issue #15: `medseg view` answers hostile requests and crafted reports; `data fetch` hostile
sources."""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from conftest import CANARY, assert_no_canary, em_nifti_scans, one_file_manifest
from hostile_corpus.checker import Case, Run, World
from hostile_corpus.common import finished_batch, slug


# ============================================================================ 10. servers and downloads

CANARY_TEXT = CANARY.decode().strip()


def view_request(target: bytes, status: int, says: str):
    def build(w: World) -> Run:
        em_nifti_scans(w.inputs, ["a"])
        finished_batch(w)
        secret = w.root / "secret.txt"
        secret.write_bytes(CANARY)
        (w.out / "link.txt").symlink_to(secret)
        return Run(
            ["view", str(w.out)],
            w.out,
            0,
            says=(f"HTTP {status}", says),
            http=[(target, status)],
            never_says=(CANARY_TEXT,),
        )

    return build


def crafted_predictions(kind: str):
    def build(w: World) -> Run:
        em_nifti_scans(w.inputs, ["a"])
        finished_batch(w)
        outside = w.root / "outside"
        outside.mkdir()
        (outside / "canary.txt").write_bytes(CANARY)
        Image.fromarray(np.ones((40, 40), np.uint8)).save(outside / "canary.png")
        manifest = json.loads((w.out / "predictions.json").read_text())
        record = {**manifest["records"][0], "case": "bad"}
        if kind == "absolute-outputs":
            record["outputs"] = [str(outside / "canary.txt"), str(outside / "canary.png")]
        elif kind == "dotdot-case-id":
            record.update(case="../outside/canary", outputs=[])
        else:
            (w.out / "bad.png").symlink_to(outside / "canary.png")
            record["outputs"] = [str(w.out / "bad.png")]
        manifest["records"].append(record)
        (w.out / "predictions.json").write_text(json.dumps(manifest))
        own = (w.out / "review.html", *sorted((w.out / "review").glob("case-*.js")))

        def nothing_embedded() -> None:
            for path in [w.out / "review.html", *(w.out / "review").glob("case-*.js")]:
                assert_no_canary(path.read_bytes(), path.name)

        return Run(
            ["view", str(w.out)],
            w.out,
            0,
            says=("HTTP 200", "predictions.json", "bad"),
            http=[(b"/review.html", 200)],
            never_says=(CANARY_TEXT,),
            may_change=own,
            after=nothing_embedded,
        )

    return build


class EndlessSource:
    """Stands in for an https:// response: zeros without end (optionally announcing a length)."""

    def __init__(self, announced: int | None = None) -> None:
        self.headers = {"Content-Length": str(announced)} if announced is not None else {}
        self.sent = 0

    def read(self, amount: int = -1) -> bytes:
        amount = 1 << 20 if amount is None or amount < 0 else amount
        self.sent += amount
        return bytes(amount)

    def __enter__(self) -> EndlessSource:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def fetch_case(
    url: str,
    *says: str,
    size: int | None = None,
    sha: str = "0" * 64,
    mirror_file: bytes | None = None,
    source: EndlessSource | None = None,
    fifo: bool = False,
    mirror_given: bool = True,
    copy: bool = False,
):
    """`medseg data fetch` of a one-file manifest whose source_url is ``url`` ({mirror} and {outside} filled in)."""

    def build(w: World) -> Run:
        from medseg.data import download

        mirror, outside = w.root / "mirror", w.root / "outside"
        (mirror / "tiny").mkdir(parents=True)
        outside.mkdir()
        (outside / "a.bin").write_bytes(b"outside the mirror")
        (mirror / "link.bin").symlink_to(outside / "a.bin")
        if mirror_file is not None:
            (mirror / "tiny" / "img").mkdir()
            (mirror / "tiny" / "img" / "a.bin").write_bytes(mirror_file)
        if fifo:
            os.mkfifo(mirror / "endless")
        if copy:  # the file:// source inside the mirror, not at the dataset's own path there
            (mirror / "tiny" / "img" / "a.bin").rename(mirror / "copy.bin")
        filled = url.format(mirror=mirror.as_uri(), outside=outside.as_uri())
        m = one_file_manifest(w.root / "m.csv", filled, sha256=sha, size=size)
        argv = ["data", "fetch", "tiny", "--dest", str(w.out), "--manifest", str(m)]
        argv += ["--mirror", str(mirror)] if mirror_given else []
        patches = [] if source is None else [(download, "_open_https", lambda _url, _timeout: source)]

        def bounded() -> None:
            if source is not None and size is not None:
                assert source.sent <= size + 2**20, f"read {source.sent} bytes of a source declared {size}"

        return Run(argv, w.out, 1, says=tuple(s.format(url=filled) for s in says), patches=patches, after=bounded)

    return build


def oversized_mirror_file(w: World) -> Run:
    mirror = w.root / "mirror"
    (mirror / "tiny" / "img").mkdir(parents=True)
    with (mirror / "tiny" / "img" / "a.bin").open("wb") as handle:
        handle.truncate(64 * 2**20)  # sparse, 64 times the declared size
    m = one_file_manifest(w.root / "m.csv", "", size=2**20)
    argv = ["data", "fetch", "tiny", "--mirror", str(mirror), "--dest", str(w.out), "--manifest", str(m)]
    return Run(argv, w.out, 1, says=("a.bin", "more than the 1048576 bytes", "deleted the partial"))


HTTPS = "https://data.example.org/a.bin"
SERVERS = [
    *(
        Case(f"request-{slug(t.decode()[:40]) or 'nul'}", 10, "view", view_request(t, s, m))
        for t, s, m in [
            (b"/%00", 400, "Bad request path"),
            (b"/../secret.txt", 400, "Bad request path"),
            (b"/%2e%2e/secret.txt", 400, "Bad request path"),
            (b"/review/..%2f..%2fsecret.txt", 400, "Bad request path"),
            (b"/C:%5cWindows%5cwin.ini", 400, "Bad request path"),
            (b"/" + b"a" * 5000, 400, "Bad request path"),
            (b"/link.txt", 404, "ot found"),
            (b"/.medseg/ledger/a.json", 404, "ot found"),
        ]
    ),
    *(
        Case(f"crafted-predictions-{k}", 10, "view", crafted_predictions(k))
        for k in ("absolute-outputs", "dotdot-case-id", "symlinked-output")
    ),
    Case("ftp-url", 10, "data", fetch_case("ftp://example.org/a.bin", "{url}", "only over https://")),
    Case("http-url", 10, "data", fetch_case("http://example.org/a.bin", "{url}", "only over https://")),
    Case("data-url", 10, "data", fetch_case("data:,x", "{url}", "only over https://")),
    Case("file-url-outside-the-mirror", 10, "data", fetch_case("{outside}/a.bin", "{url}", "lies outside the mirror")),
    Case(
        "file-url-link-out-of-the-mirror",
        10,
        "data",
        fetch_case("{mirror}/link.bin", "{url}", "lies outside the mirror"),
    ),
    Case(
        "file-url-dotdot-out-of-the-mirror",
        10,
        "data",
        fetch_case("{mirror}/../outside/a.bin", "{url}", "lies outside the mirror"),
    ),
    Case("file-url-to-a-pipe", 10, "data", fetch_case("{mirror}/endless", "{url}", "not a regular file", fifo=True)),
    Case(
        "endless-https-source",
        10,
        "data",
        fetch_case(HTTPS, "{url}", "more than the 1048576 bytes", size=2**20, source=EndlessSource()),
    ),
    Case(
        "https-announces-more-than-declared",
        10,
        "data",
        fetch_case(HTTPS, "{url}", "more than the 1000 bytes", size=1000, source=EndlessSource(10 * 2**30)),
    ),
    Case(
        "file-url-without-a-mirror",
        10,
        "data",
        fetch_case("{outside}/a.bin", "{url}", "read only from a local mirror", mirror_given=False),
    ),
    Case("mirror-file-over-the-declared-size", 10, "data", oversized_mirror_file),
    Case(
        "checksum-mismatch-in-a-download",
        10,
        "data",
        fetch_case("{mirror}/copy.bin", "{url}", "checksum mismatch", size=4, mirror_file=b"data", copy=True),
    ),
    Case(
        "checksum-mismatch-in-the-mirror",
        10,
        "data",
        fetch_case("", "a.bin", "checksum mismatch", size=4, mirror_file=b"data"),
    ),
]
