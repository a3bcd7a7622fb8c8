"""The papers' semi-supervised schedules on a lent GPU, as one prepared device call (issue: semi-supervision).

The CPU protocol (`benchmarks/semi.py --only cpu`) settles the claims; this is the extra for when a GPU is lent
for a few minutes. Two steps:

1. Here: `python benchmarks/semi_gpu.py pack --part acdc` (or `--part la`) writes `.gpu/` (ignored by git,
   carried by the device call): the files of that dataset the runs read, and wheels of the two packages the
   device image lacks (monai, nibabel). A device call carries at most 64 MiB: ACDC's float32 slices compress to
   73 MB (67 MB as float16), so its images travel as uint8 (intensities in [0, 1] quantised to 1/255, an error
   of at most 0.002) with gzip, about 44 MB; labels, LA (23 MB) and the lists as they are; one dataset a call.
   On the device `semi_gpu.py unpack` writes them back as float32 in [0, 1] (÷ 255) to /tmp/frugalseg_data,
   which the runs read (FRUGALSEG_DATA): the intensity range every method's constants assume (co-training's
   clamp to [0, 1], the mean teacher's noise, the FGSM / VAT steps).
2. On the GPU: `PART=acdc bash benchmarks/semi_gpu.sh` (run(command="PART=acdc bash benchmarks/semi_gpu.sh",
   carry=[".gpu"], timeout_s=570)): installs the wheels (no download), then `benchmarks/semi.py --only gpu
   --gpu-settings acdc_l7 --seeds 1 --gpu-fraction $FRACTION`: ACDC at 7 patients (supervised-only, mean
   teacher, DTC, co-training K=2; U-Net 16..256 at 256², 12 + 12 slices, SGD 0.01 / co-training's Adam 1e-3),
   or LA (supervised-only, DTC; V-Net at 112×112×80, 2 + 2), all at once on the one GPU with bf16 autocast,
   FRACTION of the papers' 30000 / 6000 iterations (ramps and learning-rate steps follow); the records and
   semi.json (key `gpu_protocol`) come back in $OUT.

FRACTION: the whole schedule does not fit one ~8-minute call (an H200 step of the 2D U-Net at batch 24 is
some milliseconds, but six runs share the chip); the default 0.1 (3000 / 600 iterations) is a first call's
guess; the records say how long each run took, from which the next call's fraction follows.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PACK = ROOT / ".gpu"


def pack(data_root: Path, part: str) -> None:
    import h5py

    out = PACK / "data"
    if PACK.exists():
        shutil.rmtree(PACK)
    out.mkdir(parents=True)
    if part == "la":
        shutil.copytree(data_root / "la2018", out / "la2018")
    else:
        src = data_root / "acdc"
        (out / "acdc" / "data" / "slices").mkdir(parents=True)
        for name in ("train.list", "train_slices.list", "val.list"):
            shutil.copy2(src / name, out / "acdc" / name)
        for f in sorted((src / "data").rglob("*.h5")):
            with h5py.File(f) as h, h5py.File(out / "acdc" / f.relative_to(src), "w") as g:
                image = h["image"][:]
                if not (np.nanmin(image) >= 0 and np.nanmax(image) <= 1):
                    raise SystemExit(f"{f}: intensities outside [0, 1]; the uint8 packing assumes them")
                g.create_dataset("image", data=np.round(image * 255).astype(np.uint8), compression="gzip",
                                 compression_opts=9)
                g.create_dataset("label", data=h["label"][:], compression="gzip", compression_opts=9)
    wheels = PACK / "whl"
    versions = {}
    for name in ("monai", "nibabel"):
        versions[name] = __import__(name).__version__
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_17_x86_64",
                    "-d", str(wheels), *(f"{k}=={v}" for k, v in versions.items())], check=True)
    exclude = ROOT / ".git" / "info" / "exclude"
    if exclude.parent.parent.is_dir() and ("/.gpu/" not in (exclude.read_text() if exclude.exists() else "")):
        exclude.parent.mkdir(exist_ok=True)
        with exclude.open("a") as fh:
            fh.write("/.gpu/\n")
    size = sum(p.stat().st_size for p in PACK.rglob("*") if p.is_file())
    print(f"wrote {PACK}: {size / 2**20:.1f} MiB (the device call carries at most 64 MiB with the working tree)")


def unpack(dest: Path) -> None:
    """On the device: `.gpu/data` back to the layout and dtype the loaders read (ACDC images float32 ÷ 255)."""
    import h5py

    src = PACK / "data"
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("*.h5") if (src / "acdc").exists() else None)
    for f in sorted((src / "acdc").rglob("*.h5")) if (src / "acdc").exists() else []:
        with h5py.File(f) as h, h5py.File(dest / f.relative_to(src), "w") as g:
            image = h["image"][:]
            g.create_dataset("image", data=image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image)
            g.create_dataset("label", data=h["label"][:])
    print(f"unpacked {src} to {dest}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["pack", "unpack"])
    ap.add_argument("--part", choices=["acdc", "la"], default="acdc", help="The dataset of one device call.")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="pack: the datasets' folder; "
                                                                               "unpack: where to write them.")
    args = ap.parse_args()
    if args.action == "unpack":
        unpack(Path(args.data))
    else:
        pack(Path(args.data), args.part)


if __name__ == "__main__":
    main()
