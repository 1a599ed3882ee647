"""Importing a COCO file of masks: driver memory against the file's size.

    python benchmarks/import_masks.py [--runs 100000x3 100000x30 1000000x3] [--dir DIR]

For each run NxM, writes (streamed, on disk) a COCO instances JSON shaped like CutLER's
published ImageNet pseudo masks: N images in folders of 1000, M compressed-RLE masks each,
one category; the photos are links to one 64x48 PNG. Then, each in a fresh process:
1. `u2seg import-masks` of it (data.source the same file, 2-CPU local Ray): seconds, images
   per second, the driver's peak resident memory (all of it, and its private part: without
   the pages of Ray's shared object store that it wrote or read, sampled every 0.2 s), and
   the peak of all its processes (the driver and Ray's, sampled; pages of the object store
   count in each process that maps them);
2. the baseline: `json.load` of the file, what `pycocotools.coco.COCO(file)` starts with:
   its peak resident memory;
and prints both, their ratio and the file's size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image
from pycocotools import mask as mask_utils

MIB = 2**20
WIDTH, HEIGHT = 64, 48
PER_FOLDER = 1000


def _rle_pool(count: int, seed: int = 0) -> list[dict[str, object]]:
    """`count` different compressed RLE masks of a WIDTH x HEIGHT photo (boxes)."""
    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(count):
        mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8, order="F")
        x, y = rng.integers(0, WIDTH // 2), rng.integers(0, HEIGHT // 2)
        mask[y : y + rng.integers(4, HEIGHT // 2), x : x + rng.integers(4, WIDTH // 2)] = 1
        rle = mask_utils.encode(mask)
        pool.append({"size": [HEIGHT, WIDTH], "counts": rle["counts"].decode()})
    return pool


def write_dataset(folder: Path, images: int, masks: int) -> Path:
    """The photo links and the masks file (written item by item); returns the file."""
    photos = folder / "photos"
    photos.mkdir(parents=True)
    base = folder / "base.png"
    Image.fromarray(np.full((HEIGHT, WIDTH, 3), 128, dtype=np.uint8)).save(base)
    names = [f"n{k // PER_FOLDER:05d}/{k:08d}.png" for k in range(images)]
    for k, name in enumerate(names):
        if k % PER_FOLDER == 0:
            (photos / name).parent.mkdir()
        os.symlink(base, photos / name)
    pool = _rle_pool(997)
    source = folder / "masks.json"
    with source.open("w") as fh:
        fh.write('{"categories":[{"id":1,"name":"fg","supercategory":"fg"}],"images":[')
        for k, name in enumerate(names):
            entry = {"id": k + 1, "file_name": name, "width": WIDTH, "height": HEIGHT}
            fh.write(("," if k else "") + json.dumps(entry))
        fh.write('],"annotations":[')
        for k in range(images * masks):
            image_id = k // masks + 1
            rle = pool[k % len(pool)]
            area = int(mask_utils.area({"size": rle["size"], "counts": rle["counts"].encode()}))
            ann = {"id": k + 1, "image_id": image_id, "category_id": 1, "segmentation": rle,
                   "area": area, "iscrowd": 0, "score": 1.0 / (1 + k % masks)}  # fmt: skip
            fh.write(("," if k else "") + json.dumps(ann))
        fh.write("]}")
    return source


_IMPORT = """
import resource, sys
from u2seg.cli import main
code = main(sys.argv[1:])
print("PEAK", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, flush=True)
sys.exit(code)
"""
_BASELINE = """
import json, resource, sys
with open(sys.argv[1]) as fh:
    data = json.load(fh)
print("PEAK", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, flush=True)
"""


def _private(pid: int) -> int:
    """A process's resident memory less its shared pages (RssAnon, Linux), bytes."""
    with open(f"/proc/{pid}/status") as fh:
        line = next(line for line in fh if line.startswith("RssAnon:"))
    return int(line.split()[1]) * 1024


def measured(command: list[str]) -> tuple[float, int, int, int]:
    """Run `command` (a script printing "PEAK <bytes>"); (seconds, its own peak, its private
    peak and the peak sum of it and its descendants, both sampled)."""
    start = time.perf_counter()
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    root, tree_peak, private_peak = psutil.Process(proc.pid), 0, 0
    while proc.poll() is None:
        try:
            family = [root, *root.children(recursive=True)]
            tree_peak = max(tree_peak, sum(p.memory_info().rss for p in family))
            private_peak = max(private_peak, _private(proc.pid))
        except (psutil.Error, OSError, StopIteration):
            pass
        time.sleep(0.2)
    out = proc.stdout.read().decode() if proc.stdout else ""
    if proc.returncode:
        raise SystemExit(f"{' '.join(command[:4])} failed ({proc.returncode}):\n{out[-2000:]}")
    peak = int(next(line.split()[1] for line in out.splitlines() if line.startswith("PEAK")))
    return time.perf_counter() - start, peak, private_peak, tree_peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--runs", nargs="+", default=["100000x3", "100000x30", "1000000x3"],
        help="images x masks per image, one file each",
    )  # fmt: skip
    parser.add_argument("--dir", type=Path, help="where to write the files (a temp folder)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="u2seg-import-", dir=args.dir))
    print(f"machine: {os.cpu_count()} CPUs; files under {root}")
    print("images x masks  file MiB  import s  images/s  driver peak MiB  private MiB  "
          "all processes MiB  json.load peak MiB  driver / json.load")  # fmt: skip
    for run in args.runs:
        images, masks = (int(v) for v in run.split("x"))
        folder = root / run
        start = time.perf_counter()
        source = write_dataset(folder, images, masks)
        written = time.perf_counter() - start
        size = source.stat().st_size
        command = [
            sys.executable, "-c", _IMPORT, "import-masks", str(source),
            f"data.source={source}", f"data.root={folder / 'photos'}",
            f"output={folder / 'run'}", "ray.num_cpus=2", "data.shard_size=1000",
        ]  # fmt: skip
        seconds, driver, private, tree = measured(command)
        manifest = json.loads((folder / "run" / "maskcut" / "manifest.json").read_text())
        assert manifest["counts"]["masks"] == images * masks, manifest["counts"]
        _, baseline, _, _ = measured([sys.executable, "-c", _BASELINE, str(source)])
        print(
            f"{run:<14} {size / MIB:>9.0f}  {seconds:>8.0f}  {images / seconds:>8.0f}  "
            f"{driver / MIB:>15.0f}  {private / MIB:>11.0f}  {tree / MIB:>17.0f}  "
            f"{baseline / MIB:>18.0f}  {driver / baseline:>18.2f}   (written in {written:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
