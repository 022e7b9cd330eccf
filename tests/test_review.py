"""The review page (`medseg.review.write_review`) and `medseg view`: content, self-containment,
payload bounds, speed, the local server, and a real headless Chromium drawing the overlay."""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import webbrowser
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medseg.data import phantoms
from medseg.pipeline import BatchReport, CaseRecord, write_batch_manifest
from medseg.cli import main
from medseg.evaluation.evaluate import evaluate_folders
from medseg.evaluation.reports import write_reports
from medseg.export import CLASS_COLOURS, export_mask
from medseg.ingest import LoadOptions, discover, load, ref_for_path
from medseg.evaluation.plots import plot_learning_curves
from medseg.review import (
    MAX_EDGE,
    MAX_VOXELS,
    ReviewError,
    ReviewServer,
    class_legend,
    review_is_stale,
    write_review,
)

CT = dict(phantoms.CT_CLASSES)
EM = dict(phantoms.EM_CLASSES)
MASK = LoadOptions(color="channels", palette="indices")
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def _record(ref, status="written", outputs=(), reason="") -> CaseRecord:
    return CaseRecord(ref.id, ref.kind, str(ref.path), status, [str(p) for p in outputs], reason, seconds=0.5)


def _payload(path: Path) -> dict:
    text = path.read_text()
    assert text.startswith("medsegReview.receive(") and text.rstrip().endswith(");")
    return json.loads(text[len("medsegReview.receive(") : text.rstrip().rindex(")")])


def _unpack(b64: str, dtype=np.uint8) -> np.ndarray:
    raw = np.frombuffer(zlib.decompress(base64.b64decode(b64)), dtype=np.uint8)
    if np.dtype(dtype).itemsize == 2:  # two byte planes: low bytes, then high bytes
        return raw[: raw.size // 2].astype(np.uint16) | (raw[raw.size // 2 :].astype(np.uint16) << 8)
    return raw


def _classes_to_index(mask: np.ndarray, classes: dict[str, int]) -> np.ndarray:
    out = np.zeros(mask.shape, np.uint8)
    for entry in class_legend(classes):
        out[mask == entry["value"]] = entry["index"]
    return out


@pytest.fixture(scope="module")
def ct_batch(tmp_path_factory) -> dict[str, Path]:
    """CT batch: a DICOM series and a NIfTI volume (predictions = perturbed truth), a failed scan,
    a case whose scan has moved away, metrics.json, and a training run with learning curves."""
    root = tmp_path_factory.mktemp("ct")
    study = phantoms.write_sample_study(root / "study")
    out, run = root / "out", root / "run"
    run.mkdir()
    plot_learning_curves(
        [{"epoch": e, "train_loss": 1 / e, "dice_liver": 0.5 + e / 10} for e in (1, 2, 3)], run / "learning_curves.png"
    )
    report = BatchReport(str(study["images"]), str(out), str(run / "best.pt"), CT)
    for ref in discover(study["images"]).scans:
        if not ref.id.startswith("ct"):
            continue
        scan = load(ref)
        truth = load(ref_for_path(study["labels"] / f"{ref.id}.nii.gz"), MASK).array[0]
        prediction = truth.copy()
        prediction[truth == 2] = 0  # kidney missed
        prediction[(np.roll(truth == 1, 2, axis=0)) & (truth == 0)] = 1  # liver spills over
        report.records.append(_record(ref, outputs=export_mask(prediction, scan, out, CT)))
    moved = root / "moved" / "ct_moved.nii.gz"
    ct = phantoms.ct_phantom(seed=5)
    phantoms.write_nifti(ct.image, ct.affine, moved)
    report.records.append(
        _record(ref_for_path(moved), outputs=export_mask(ct.label, load(ref_for_path(moved)), out, CT))
    )
    shutil.rmtree(moved.parent)
    broken = root / "bad" / "broken.nii.gz"
    report.records.append(
        CaseRecord(
            "bad/broken", "nifti", str(broken), "failed", reason=f"{broken}: truncated gzip stream (file cut short?)"
        )
    )
    write_batch_manifest(report, out)
    write_reports(evaluate_folders(out, study["labels"], progress=False), out)
    page = write_review(out)
    return {"out": out, "page": page, "labels": study["labels"], "images": study["images"], "run": run}


@pytest.fixture(scope="module")
def em_batch(tmp_path_factory) -> dict[str, Path]:
    """Microscopy batch: a TIFF stack, a PNG sequence and a single 2D PNG, no metrics."""
    root = tmp_path_factory.mktemp("em")
    study = phantoms.write_sample_study(root / "study")
    em = phantoms.em_phantom(shape=(64, 48, 1), seed=7)
    Image.fromarray(np.ascontiguousarray(em.image[:, :, 0].T)).save(study["images"] / "em_image.png")
    out = root / "out"
    report = BatchReport(str(study["images"]), str(out), "", EM)
    for ref in discover(study["images"]).scans:
        if ref.id.startswith("em"):
            scan = load(ref)
            truth = (
                em.label[:, :, 0]
                if ref.id == "em_image"
                else load(ref_for_path(next(study["labels"].glob(ref.id + "*"))), MASK).array[0]
            )
            report.records.append(_record(ref, outputs=export_mask(truth, scan, out, EM)))
    write_batch_manifest(report, out)
    return {"out": out, "page": write_review(out)}


# -- the page and its data files --------------------------------------------------------------


def test_page_lists_every_case_scores_failures_and_plots(ct_batch):
    out = ct_batch["out"]
    text = ct_batch["page"].read_text()
    batch = json.loads((out / "predictions.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    for record in batch["records"]:
        assert f'<td class="id">{record["case"]}</td>' in text
    assert "Failed scans (1)" in text and "truncated gzip stream (file cut short?)" in text and "bad/broken" in text
    liver = next(c for c in metrics["cases"] if c["case"] == "ct_volume")["classes"]["liver"]
    assert f"{liver['dice']:.3f}" in text and f"{liver['iou']:.3f}" in text
    assert 'alt="Dice per class" src="data:image/png;base64,' in text
    assert 'alt="learning curves" src="data:image/png;base64,' in text  # found via the checkpoint's run folder
    assert text.count('class="thumb"') == 3  # every case with a mask, none for the failed scan
    for name, rgb in (("liver", CLASS_COLOURS[0]), ("kidney", CLASS_COLOURS[1]), ("spine", CLASS_COLOURS[2])):
        assert f'<span class="swatch" style="background:rgb({rgb[0]},{rgb[1]},{rgb[2]})"></span>{name}' in text
    assert "not drawn: background" in text
    assert "scan not shown" in text and "ct_moved" in text  # the moved scan: the mask alone, said so
    files = sorted(p.name for p in (out / "review").iterdir())
    assert files == ["case-0001.js", "case-0002.js", "case-0003.js"]


def test_page_is_self_contained(ct_batch, em_batch):
    for out in (ct_batch["out"], em_batch["out"]):
        for path in [out / "review.html", *(out / "review").glob("*.js")]:
            text = path.read_text()  # base64 has no ':', so any '://' would be an address
            assert "://" not in text and "url(" not in text, f"{path} refers to a network address"
        html = (out / "review.html").read_text()
        sources = re.findall(r'\b(?:src|href)="([^"]*)"', html)
        assert sources and all(s.startswith(("data:", "#")) for s in sources), sources
        assert "<script src" not in html and "@import" not in html


def test_case_data_holds_scan_mask_and_reference(ct_batch):
    out = ct_batch["out"]
    data = json.loads(
        re.search(
            r'<script id="review-data" type="application/json">(.*?)</script>', ct_batch["page"].read_text(), re.S
        ).group(1)
    )
    entry = next(c for c in data["cases"] if c["id"] == "ct_volume")
    payload = _payload(out / entry["file"])
    mask = load(ref_for_path(out / "ct_volume.nii.gz"), MASK).array[0]
    ref = load(ref_for_path(ct_batch["labels"] / "ct_volume.nii.gz"), MASK).array[0]
    scan = load(ref_for_path(ct_batch["images"] / "ct_volume.nii.gz")).array[0]
    assert payload["shape"] == list(mask.shape) == payload["source_shape"]  # small: not downsampled
    assert payload["axes"] == "RAS" and payload["spacing"] == pytest.approx([0.9, 1.1, 2.5])
    assert np.array_equal(_unpack(payload["mask"]).reshape(mask.shape), _classes_to_index(mask, CT))
    assert np.array_equal(_unpack(payload["reference"]).reshape(mask.shape), _classes_to_index(ref, CT))
    image = payload["image"]
    values = image["offset"] + _unpack(image["data"], image["dtype"]) * image["scale"]
    assert image["dtype"] == "uint16" and image["scale"] == 1.0  # Hounsfield units, exactly
    assert np.array_equal(values.reshape(mask.shape), scan)
    moved = _payload(out / "review" / "case-0003.js")
    assert moved["image"] is None and moved["mask"] and any("scan not shown" in n for n in moved["notes"])


def test_reference_without_metrics_is_scored_for_the_page_only(ct_batch, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(ct_batch["out"], out)
    (out / "metrics.json").unlink()
    (out / "metrics.csv").unlink()
    text = write_review(out, reference_dir=ct_batch["labels"], progress=False).read_text()
    assert "scores computed for this page" in text and 'alt="Dice per class"' in text
    assert text.count('<td class="score" data-value="0') > 0
    assert _payload(out / "review" / "case-0002.js")["reference"] is not None
    assert not (out / "metrics.json").exists()  # the folder is left as it was, bar the page


def test_microscopy_kinds_and_2d_images(em_batch):
    out = em_batch["out"]
    text = em_batch["page"].read_text()
    assert "no metrics.json: run `medseg evaluate" in text  # says how to get scores
    shapes = {}
    for path in sorted((out / "review").glob("*.js")):
        payload = _payload(path)
        shapes[payload["id"]] = payload["shape"]
        assert payload["axes"] is None and payload["reference"] is None  # microscopy: shown as stored
        assert payload["image"]["dtype"] == "uint8"
        labels = _unpack(payload["mask"])
        assert set(np.unique(labels)) <= {0, 1}  # cell = index 1 (red); membrane, valued 0, not drawn
    assert shapes == {"em_image": [64, 48, 1], "em_sequence": [96, 80, 4], "em_stack": [128, 96, 5]}


def test_large_volume_is_downsampled_within_bounds(tmp_path):
    shape = (300, 270, 90)
    image = np.random.default_rng(0).integers(-1000, 1000, size=shape, dtype=np.int16)
    affine = np.diag([0.7, 0.7, 1.5, 1.0])
    phantoms.write_nifti(image, affine, tmp_path / "in" / "big.nii")
    scan = load(ref_for_path(tmp_path / "in" / "big.nii"))
    mask = np.zeros(shape, np.uint8)
    mask[100:200, 50:150, 20:70] = 1
    out = tmp_path / "out"
    outputs = export_mask(mask, scan, out, {"background": 0, "lesion": 1})
    write_batch_manifest(
        BatchReport("in", str(out), "", {"background": 0, "lesion": 1}, [_record(scan.ref, outputs=outputs)]), out
    )
    page = write_review(out, progress=False)
    payload = _payload(out / "review" / "case-0001.js")
    assert payload["shape"] == [MAX_EDGE, MAX_EDGE, MAX_VOXELS // MAX_EDGE**2] and payload["source_shape"] == list(
        shape
    )
    assert payload["spacing"][0] == pytest.approx(0.7 * 299 / 255) and payload["spacing"][2] == pytest.approx(
        1.5 * 89 / 63
    )
    assert (out / "review" / "case-0001.js").stat().st_size < 2 * MAX_VOXELS * 1.4 + 64 * 1024  # 16-bit noise, base64
    assert "shown downsampled at 256 x 256 x 64 of 300 x 270 x 90 voxels" in page.read_text()


def test_hundred_cases_are_written_quickly(tmp_path):
    ct = phantoms.ct_phantom(shape=(32, 28, 12))
    first = phantoms.write_nifti(ct.image, ct.affine, tmp_path / "source" / "ct.nii.gz")
    mask = export_mask(ct.label, load(ref_for_path(first)), tmp_path / "mask", CT)[0]
    out = tmp_path / "out"
    report = BatchReport(str(tmp_path / "images"), str(out), "", CT)
    for i in range(100):
        case = f"site{i % 4}/case_{i:03d}"
        image, written = tmp_path / "images" / f"{case}.nii.gz", out / f"{case}.nii.gz"
        for source, target in ((first, image), (mask, written)):
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        report.records.append(CaseRecord(case, "nifti", str(image), "written", [str(written)]))
    write_batch_manifest(report, out)
    start = time.monotonic()
    page = write_review(out, progress=False)
    seconds = time.monotonic() - start
    assert seconds < 30, f"100 cases took {seconds:.1f} s"
    assert page.stat().st_size < 1_500_000
    files = list((out / "review").glob("case-*.js"))
    assert len(files) == 100 and max(f.stat().st_size for f in files) < 64 * 1024
    assert page.read_text().count('<tr class="case status-written"') == 100


def test_folder_without_predictions_says_run_predict_first(tmp_path, capsys):
    with pytest.raises(ReviewError, match="no predictions.json.*run `medseg predict"):
        write_review(tmp_path)
    assert main(["view", str(tmp_path)]) == 1
    assert "run `medseg predict --checkpoint RUN --input SCANS --output" in capsys.readouterr().err


# -- the server ------------------------------------------------------------------------------


def _get(url: str, path: str, headers: dict | None = None) -> tuple[int, bytes, http.client.HTTPMessage]:
    host, port = url.split("//")[1].rstrip("/").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})  # sent as written: no clean-up of '..'
        response = conn.getresponse()
        return response.status, response.read(), response.msg  # headers, any case
    finally:
        conn.close()


def test_medseg_view_serves_loopback_only_and_refuses_traversal(ct_batch, tmp_path):
    out = tmp_path / "served"
    shutil.copytree(ct_batch["out"], out)
    (tmp_path / "secret.txt").write_text("not for the browser")
    (out / "link.txt").symlink_to(tmp_path / "secret.txt")
    (out / "review.html").unlink()  # `medseg view` writes it first
    # Ctrl+C must reach the child as it would in a terminal, even when pytest itself runs as a
    # background job (a non-interactive shell starts those with SIGINT ignored, and a child
    # inherits an ignored signal); a handled signal is reset to its default on exec.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "medseg", "view", str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    finally:
        signal.signal(signal.SIGINT, inherited)
    try:
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
        reader.start()
        deadline = time.monotonic() + 60
        while not any("Review page:" in line for line in lines) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        found = [line for line in lines if "Review page:" in line]
        assert found, "".join(lines)
        url = found[0].split("Review page:")[1].strip()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/review\.html", url)
        base = url[: -len("review.html")]
        status, body, headers = _get(base, "/review.html")
        assert status == 200 and b"ct_volume" in body and headers["Content-Type"].startswith("text/html")
        status, body, headers = _get(base, "/review/case-0001.js")
        assert status == 200 and body.startswith(b"medsegReview.receive(") and "javascript" in headers["Content-Type"]
        assert _get(base, "/")[0] == 302
        assert _get(base, "/review.html", {"Host": "attacker.example:80"})[0] == 403  # DNS rebinding
        for path in (
            "/../secret.txt",
            "/%2e%2e/secret.txt",
            "/..%2fsecret.txt",
            "/review/../../secret.txt",
            "/link.txt",
            "//etc/passwd",
            "/review/",
        ):
            status, body, _ = _get(base, path)
            assert status in (400, 403, 404) and b"not for the browser" not in body, path  # 400: malformed
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, "".join(lines)
    assert any("Wrote" in line for line in lines) and (out / "review.html").is_file()


def test_view_rebuilds_a_stale_page_and_opens_a_browser(ct_batch, tmp_path, monkeypatch, capsys):
    out = tmp_path / "served"
    shutil.copytree(ct_batch["out"], out)
    assert not review_is_stale(out)
    before = (out / "review.html").stat().st_mtime_ns
    later = time.time() + 10
    os.utime(out / "predictions.json", (later, later))  # a newer batch than the page shows
    assert review_is_stale(out)
    opened: list[str] = []
    monkeypatch.setattr(webbrowser, "open", lambda url: opened.append(url) or True)

    def interrupted(self, timeout=None):
        assert _get(self.url, "/review.html")[0] == 200  # serving while `medseg view` waits
        raise KeyboardInterrupt

    monkeypatch.setattr(ReviewServer, "wait", interrupted)
    assert main(["view", str(out), "--open"]) == 0
    printed = capsys.readouterr().out
    assert f"Wrote {out / 'review.html'}" in printed and "Stopped." in printed
    assert opened and f"Review page: {opened[0]}" in printed and opened[0].startswith("http://127.0.0.1:")
    assert (out / "review.html").stat().st_mtime_ns > before


def test_review_server_binds_loopback_by_default(ct_batch):
    with ReviewServer(ct_batch["out"]) as server:
        assert server.httpd.server_address[0] == "127.0.0.1" and server.url.startswith("http://127.0.0.1:")
        assert _get(server.url, "/predictions.json")[0] == 200
    with pytest.raises(ReviewError, match="choose another --port"):
        with ReviewServer(ct_batch["out"]) as first:
            ReviewServer(ct_batch["out"], port=int(first.url.rsplit(":", 1)[1].strip("/")))


# -- a real browser ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install -e '.[dev]')")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="medseg-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--force-device-scale-factor=1",
        "--window-size=1400,1000",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _wait_for_case(driver, case: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 20).until(
        lambda d: d.execute_script(
            "const s = window.medsegReview && medsegReview.state;return !!(s && s.view && s.view.id === arguments[0]);",
            case,
        )
    )


def _canvas(driver) -> np.ndarray:
    width, height, pixels = driver.execute_script(
        "const c = document.getElementById('view');"
        "return [c.width, c.height, Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)];"
    )
    return np.array(pixels, dtype=np.uint8).reshape(height, width, 4)[..., :3]


def _severe(driver) -> list:
    return [entry for entry in driver.get_log("browser") if entry["level"] in ("SEVERE", "WARNING")]


@pytest.mark.timeout(180)
def test_browser_slider_class_toggle_and_overlay_pixels(browser, ct_batch, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    out = ct_batch["out"]
    mask = _classes_to_index(load(ref_for_path(out / "ct_volume.nii.gz"), MASK).array[0], CT)
    scan = load(ref_for_path(ct_batch["images"] / "ct_volume.nii.gz")).array[0].astype(float)
    with ReviewServer(out) as server:
        browser.get(server.url + "review.html#case=ct_volume")
        _wait_for_case(browser, "ct_volume")
        start = browser.execute_script("return medsegReview.state.slice[2]")
        slider = browser.find_element(By.ID, "slice")
        slider.send_keys(Keys.ARROW_LEFT, Keys.ARROW_LEFT)
        z = browser.execute_script("return medsegReview.state.slice[2]")
        assert z == start - 2 and browser.find_element(By.ID, "slice-out").text == f"{z + 1} / {mask.shape[2]}"
        browser.find_element(By.ID, "show-reference").click()  # outline off: only the filled prediction
        browser.execute_script(
            "const o = document.getElementById('opacity'); o.value = 100;o.dispatchEvent(new Event('input'));"
        )
        # RAS volume, axial view: patient right on screen left (x flipped), anterior up (y flipped).
        expected = mask[::-1, ::-1, z].T
        pixels = _canvas(browser)
        assert pixels.shape[:2] == expected.shape
        grey = (pixels[..., 0] == pixels[..., 1]) & (pixels[..., 1] == pixels[..., 2])
        assert grey[expected == 0].all()
        level, width = browser.execute_script("return [medsegReview.state.level, medsegReview.state.width]")
        shown = np.clip((scan[::-1, ::-1, z].T - (level - width / 2)) / width * 255, 0, 255)
        assert np.abs(pixels[..., 0][expected == 0] - shown[expected == 0]).max() <= 1  # the scan, windowed
        for index in (1, 3):  # liver and spine on this slice
            assert (expected == index).any()
            assert (pixels[expected == index] == CLASS_COLOURS[index - 1]).all()
        browser.find_element(By.CSS_SELECTOR, '#legend input[data-class="1"]').click()  # hide liver
        pixels = _canvas(browser)
        assert ((pixels[..., 0] == pixels[..., 1]) & (pixels[..., 1] == pixels[..., 2]))[expected == 1].all()
        assert (pixels[expected == 3] == CLASS_COLOURS[2]).all()
        shot = tmp_path / "review.png"
        browser.save_screenshot(str(shot))
        screenshot = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)
        assert (screenshot == CLASS_COLOURS[2]).all(axis=1).sum() > 50  # spine shows on screen
        Select(browser.find_element(By.ID, "axis")).select_by_value("1")  # coronal: x across, z down
        assert _canvas(browser).shape[:2] == (mask.shape[2], mask.shape[0])
        browser.find_element(By.ID, "next").click()
        _wait_for_case(browser, "ct_moved")
        origin = server.url.rstrip("/")
        resources = browser.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)"
            ".concat(performance.getEntriesByType('navigation').map(e => e.name));"
        )
        assert resources and all(r.startswith(origin + "/") or r.startswith("data:") for r in resources), resources
        assert any(r.endswith("/review/case-0002.js") for r in resources)
        assert not _severe(browser)


@pytest.mark.timeout(120)
def test_browser_opens_the_page_from_disk(browser, ct_batch):
    page = ct_batch["page"]
    browser.get(page.as_uri() + "#case=ct_series")
    _wait_for_case(browser, "ct_series")
    pixels = _canvas(browser)
    tinted = ~((pixels[..., 0] == pixels[..., 1]) & (pixels[..., 1] == pixels[..., 2]))
    assert tinted.any() and pixels.shape[0] > 1
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(r.startswith("file://") or r.startswith("data:") for r in resources), resources
    assert not _severe(browser)
