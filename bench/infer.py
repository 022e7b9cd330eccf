"""Inference benchmarks: sliding-window overhead, throughput, memory, and DICOM loading.

Parts (each runs in its own process, so peak RSS is its own):
  sw2d   a 2D U-Net on a 1024x1024 image: MONAI sliding window vs the bare forward passes
         over the same windows (overhead), pixels/s, effective GFLOP/s vs this machine's matmul
  sw3d   a small 3D U-Net on a 512x512x300 CT-sized volume: the same, plus the whole
         Predictor (preprocess → windows → argmax → back to the scan grid) and its peak RSS
  dicom  load 512x512x120 CT series (native and JPEG 2000): medseg vs SimpleITK's ImageSeriesReader
         (pip install -e '.[bench]'), wall and CPU time, voxels compared; and a shuffled oblique series:
         medseg vs MONAI LoadImage(reader="PydicomReader"), wall time and whether each gets the geometry right

    python bench/infer.py                 # all parts, JSON to bench/results/infer.json
    python bench/infer.py --part dicom    # one part, JSON to bench/results/infer_dicom.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from monai.data.utils import dense_patch_slices, get_valid_patch_size  # noqa: E402
from monai.inferers import sliding_window_inference  # noqa: E402

from medseg.data import phantoms  # noqa: E402
from medseg.models import build_model, model_summary  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def window_overhead(model: torch.nn.Module, image: torch.Tensor, roi: list[int], overlap: float, sw_batch: int) -> dict:
    """Sliding window (MONAI, Gaussian blending) vs bare forward passes over the same windows."""
    spatial = image.shape[2:]
    scan_interval = [max(int(r * (1 - overlap)), 1) for r in roi]
    slices = dense_patch_slices(spatial, get_valid_patch_size(spatial, roi), scan_interval)
    windows = len(slices)
    with torch.no_grad():
        model(image[(slice(None), slice(None)) + slices[0]])  # warm-up
        start = time.perf_counter()
        for i in range(0, windows, sw_batch):
            batch = torch.cat([image[(slice(None), slice(None)) + s] for s in slices[i : i + sw_batch]])
            model(batch)
        bare = time.perf_counter() - start
        start = time.perf_counter()
        out = sliding_window_inference(image, roi, sw_batch, model, overlap=overlap, mode="gaussian", sigma_scale=0.125)
        sliding = time.perf_counter() - start
    summary = model_summary(model, tuple(roi), measure_receptive_field=False)
    flops = summary["flops"] * windows
    return {
        "windows": windows,
        "bare_forward_s": round(bare, 3),
        "sliding_window_s": round(sliding, 3),
        "overhead": round(sliding / bare - 1.0, 4),
        "voxels_per_s": round(float(np.prod(spatial)) / sliding),
        "effective_gflops": round(flops / sliding / 1e9, 2),
        "output_shape": list(out.shape),
    }


def part_sw2d() -> dict:
    torch.manual_seed(0)
    model = build_model(
        {"name": "unet", "spatial_dims": 2, "in_channels": 1, "out_channels": 2, "features": 16, "depth": 4}
    ).eval()
    image = torch.randn(1, 1, 1024, 1024)
    result = window_overhead(model, image, [256, 256], 0.5, 4)
    return {
        "model": "unet 2D, 16 features, depth 4",
        "input": [1024, 1024],
        "roi": [256, 256],
        "overlap": 0.5,
        **result,
    }


def part_sw3d() -> dict:
    from medseg.config import config_from_dict
    from medseg.training.checkpoint import Checkpoint, save_checkpoint
    from medseg.inference.predictor import Predictor
    from medseg.ingest import ScanRef, load

    torch.manual_seed(0)
    cfg = {"name": "unet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2, "features": 4, "depth": 3}
    model = build_model(cfg).eval()
    shape = (512, 512, 300)
    image = torch.randn(1, 1, *shape)
    result = window_overhead(model, image, [128, 128, 64], 0.25, 2)
    del image
    with tempfile.TemporaryDirectory() as tmp:
        volume = np.random.default_rng(0).normal(0, 200, size=shape).astype(np.int16)
        affine = np.diag([0.7, 0.7, 1.25, 1.0])
        phantoms.write_nifti(volume, affine, Path(tmp) / "ct.nii.gz")
        del volume
        config = config_from_dict(
            {
                "data": {"classes": {"background": 0, "organ": 1}},
                "model": cfg,
                "train": {"patch_size": [128, 128, 64]},
                "infer": {"overlap": 0.25, "sw_batch_size": 2},
            }
        )
        save_checkpoint(Checkpoint(config, model.state_dict()), Path(tmp) / "m.pt")
        predictor = Predictor(Path(tmp) / "m.pt", device="cpu")
        rss_before = peak_rss_mb()
        start = time.perf_counter()
        scan = load(ScanRef("ct", "nifti", (Path(tmp) / "ct.nii.gz",)))
        prediction = predictor.predict(scan)
        end_to_end = time.perf_counter() - start
    return {
        "model": "unet 3D, 4 features, depth 3",
        "input": list(shape),
        "roi": [128, 128, 64],
        "overlap": 0.25,
        **result,
        "predictor_end_to_end_s": round(end_to_end, 2),
        "mask_shape": list(prediction.mask.shape),
        "peak_rss_mb_before_predictor": round(rss_before),
        "peak_rss_mb": round(peak_rss_mb()),
    }


def part_dicom() -> dict:
    """medseg vs SimpleITK's ImageSeriesReader on 512x512x120 CT series (native, JPEG 2000); MONAI on an oblique one."""
    try:
        import SimpleITK as sitk
    except ImportError:
        raise SystemExit("the dicom part compares with SimpleITK: pip install -e '.[bench]' (or pip install SimpleITK)")
    from medseg.ingest import dicom_pixels

    truth = phantoms.ct_phantom(shape=(512, 512, 120), spacing=(0.7, 0.7, 2.0), seed=1)
    result = {
        "series": "512x512x120 CT phantom, uint16 stored, RescaleIntercept -1024, file names shuffled against position",
        "medseg_threads": {
            name: dicom_pixels.default_workers(uid)
            for name, uid in (("explicit", "1.2.840.10008.1.2.1"), ("jpeg2000", "1.2.840.10008.1.2.4.90"))
        },
        "imagecodecs_version": _version("imagecodecs"),
        "sitk_threads": sitk.ProcessObject.GetGlobalDefaultNumberOfThreads(),
        "sitk_version": sitk.Version.VersionString(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for syntax, repeats in (("explicit", 9), ("jpeg2000", 5)):
            folder = Path(tmp) / syntax
            phantoms.write_dicom_series(truth, folder, order="shuffled", transfer_syntax=syntax, seed=3)
            result[syntax] = _versus_sitk(folder, truth, sitk, repeats)
            print(syntax, json.dumps(result[syntax]), file=sys.stderr, flush=True)
        result["decoder_thread_scaling"] = _decoder_threads(Path(tmp))
        result["monai_oblique"] = _versus_monai(Path(tmp))
    return result


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _versus_sitk(folder: Path, truth, sitk, repeats: int) -> dict:
    """Wall and CPU seconds (median of ``repeats`` interleaved rounds after one warm-up), voxels compared."""
    from medseg.ingest import dicom_pixels, discover, load

    ref = discover(folder).scans[0]
    names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))  # GDCM's own slice order

    def sitk_read(files) -> "sitk.Image":
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files)
        return reader.Execute()

    def one_thread():
        threads, dicom_pixels.default_workers = dicom_pixels.default_workers, lambda *syntax: 1
        try:
            return load(ref)
        finally:
            dicom_pixels.default_workers = threads

    readers = {
        "medseg": lambda: load(ref),
        "medseg_1_thread": one_thread,
        "sitk": lambda: sitk_read(names),
        "medseg_folder": lambda: load(discover(folder).scans[0]),
        "sitk_folder": lambda: sitk_read(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))),
    }
    wall: dict[str, list[float]] = {name: [] for name in readers}
    cpu: dict[str, list[float]] = {name: [] for name in readers}
    for round_ in range(repeats + 1):  # round 0 warms the page cache and the imports
        for name, read in readers.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            read()
            if round_:
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    ours = load(ref)
    theirs = sitk.GetArrayFromImage(sitk_read(names))  # (z, y, x), rescaled to int32 by GDCM
    identical = bool(np.array_equal(ours.array[0], np.transpose(theirs, (2, 1, 0))))
    import tracemalloc

    tracemalloc.start()
    load(ref)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    median = {name: float(np.median(times)) for name, times in wall.items()}
    return {
        **{f"{name}_s": round(t, 3) for name, t in median.items()},
        **{f"{name}_cpu_s": round(float(np.median(t)), 3) for name, t in cpu.items()},
        "ratio_medseg_over_sitk": round(median["medseg"] / median["sitk"], 3),
        "ratio_medseg_over_sitk_folder": round(median["medseg_folder"] / median["sitk_folder"], 3),
        "ratio_1_thread_over_threads": round(median["medseg_1_thread"] / median["medseg"], 3),
        "voxels_identical_to_sitk": identical,
        "voxels_equal_truth": bool(np.array_equal(ours.array[0], truth.image)),
        "medseg_dtype": str(ours.array.dtype),
        "sitk_dtype": str(theirs.dtype),
        "medseg_peak_traced_mb": round(peak / 1e6, 1),
        "volume_mb": round(ours.array.nbytes / 1e6, 1),
        "repeats": repeats,
    }


def _decoder_threads(tmp: Path, slices: int = 24, repeats: int = 5) -> dict:
    """Do pydicom's decoders release the GIL? Decode the same 512x512 slices on 1 and on 2 threads.

    Files are read beforehand, so only decoding is timed. A decoder that releases the GIL
    comes near 2x on two idle cores; zlib.decompress, which releases it, is the control that
    says what this machine gives at that moment. pydicom tries pylibjpeg first where it has
    a choice (JPEG 2000, JPEG-LS); each installed plugin is timed.
    """
    import io
    import zlib
    from concurrent.futures import ThreadPoolExecutor
    from functools import partial

    import pydicom
    from pydicom.pixels import pixel_array

    truth = phantoms.ct_phantom(shape=(512, 512, slices), seed=2)
    jobs = {}
    for syntax in ("explicit", "rle", "jpeg2000", "jpegls"):
        paths = phantoms.write_dicom_series(truth, tmp / f"threads-{syntax}", transfer_syntax=syntax)
        datasets = [pydicom.dcmread(io.BytesIO(p.read_bytes())) for p in paths]
        plugins = pydicom.pixels.get_decoder(datasets[0].file_meta.TransferSyntaxUID).available_plugins
        for plugin in plugins or ("",):  # each plugin installed for the syntax ("": the native reader)
            jobs[f"{syntax} ({plugin or 'pydicom native'})"] = (partial(pixel_array, decoding_plugin=plugin), datasets)
    noise = np.random.default_rng(0).integers(0, 64, (slices, 1 << 20), dtype=np.uint8)
    blobs = [zlib.compress(row.tobytes()) for row in noise]
    jobs["control: zlib.decompress 1 MB"] = (zlib.decompress, blobs)
    result = {}
    for name, (work, items) in jobs.items():
        seconds = {}
        for threads in (1, 2):
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(work, items))
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    list(pool.map(work, items))
                    times.append(time.perf_counter() - start)
            seconds[threads] = float(np.median(times))
        result[name] = {
            "1_thread_s": round(seconds[1], 4),
            "2_threads_s": round(seconds[2], 4),
            "speedup": round(seconds[1] / seconds[2], 2),
        }
    return result


def _versus_monai(tmp: Path) -> dict:
    """A shuffled oblique series: medseg vs MONAI LoadImage(reader="PydicomReader"), time and geometry."""
    from monai.transforms import LoadImage

    from medseg.ingest import discover, load

    truth = phantoms.ct_phantom(shape=(512, 512, 80), spacing=(0.7, 0.7, 2.0), oblique=(20.0, -10.0, 15.0), seed=1)
    folder = tmp / "oblique"
    phantoms.write_dicom_series(truth, folder, order="shuffled", seed=3)
    timings = {"medseg": [], "monai": []}
    monai_loader = LoadImage(reader="PydicomReader", image_only=True)
    for _ in range(3):
        start = time.perf_counter()
        scan = load(discover(folder).scans[0])
        timings["medseg"].append(time.perf_counter() - start)
        start = time.perf_counter()
        monai_image = monai_loader(str(folder))
        timings["monai"].append(time.perf_counter() - start)
    ours_ok = bool(
        np.abs(scan.geometry.affine - truth.affine).max() < 1e-3 and np.array_equal(scan.array[0], truth.image)
    )
    monai_array = np.asarray(monai_image)
    monai_affine = np.asarray(monai_image.affine)
    monai_ok = bool(
        monai_array.shape == truth.image.shape
        and np.abs(monai_affine - truth.affine).max() < 1e-3
        and np.array_equal(monai_array, truth.image)
    )
    return {
        "series": "512x512x80 oblique CT phantom, shuffled file names and InstanceNumbers",
        "medseg_s": round(float(np.median(timings["medseg"])), 3),
        "monai_pydicom_s": round(float(np.median(timings["monai"])), 3),
        "ratio_monai_over_medseg": round(float(np.median(timings["monai"]) / np.median(timings["medseg"])), 2),
        "medseg_geometry_correct": ours_ok,
        "monai_geometry_correct": monai_ok,
        "monai_max_world_error_mm": _world_error(monai_array, monai_affine, truth),
    }


def _world_error(array: np.ndarray, affine: np.ndarray, truth) -> float | None:
    """Largest distance between where MONAI places a slice's centre voxel and where it truly is."""
    if array.ndim != 3:
        return None
    errors = []
    cx, cy = truth.image.shape[0] // 2, truth.image.shape[1] // 2
    for k in range(min(array.shape[2], truth.image.shape[2])):
        matches = [j for j in range(truth.image.shape[2]) if np.array_equal(array[:, :, k], truth.image[:, :, j])]
        if not matches:
            continue
        placed = affine @ [cx, cy, k, 1]
        true = truth.affine @ [cx, cy, matches[0], 1]
        errors.append(float(np.linalg.norm(placed[:3] - true[:3])))
    return round(max(errors), 3) if errors else None


PARTS = {"sw2d": part_sw2d, "sw3d": part_sw3d, "dicom": part_dicom}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=sorted(PARTS))
    parser.add_argument(
        "--out",
        type=Path,
        help="JSON file (default bench/results/infer.json, with --part bench/results/infer_PART.json); '-' prints only",
    )
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    date = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    machine = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__}
    if args.part:
        result = PARTS[args.part]()
        print(json.dumps(result))
        if str(args.out) != "-":
            out = args.out or REPO / "bench" / "results" / f"infer_{args.part}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"date": date, "machine": machine, args.part: result}, indent=2))
            print(f"written to {out}", file=sys.stderr)
        return
    report = {"date": date, "machine": {**machine, "matmul_gflops_fp32": round(matmul_gflops(), 1)}}
    for part in PARTS:
        done = subprocess.run([sys.executable, __file__, "--part", part, "--out", "-"], capture_output=True, text=True)
        if done.returncode != 0:
            report[part] = {"error": done.stderr[-2000:]}
        else:
            report[part] = json.loads(done.stdout.strip().splitlines()[-1])
        print(part, json.dumps(report[part]), flush=True)
    for part in ("sw2d", "sw3d"):
        if "effective_gflops" in report[part]:
            report[part]["fraction_of_matmul_rate"] = round(
                report[part]["effective_gflops"] / report["machine"]["matmul_gflops_fp32"], 3
            )
    out = args.out or REPO / "bench" / "results" / "infer.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
