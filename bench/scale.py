"""Scale benchmark: peak memory and time of every stage as the dataset grows.

For each N, builds an N-image class-folder dataset from the real tf_flowers photos (each a
random crop of 70-100% of a photo's side at a random place, flipped half the time and
re-encoded as JPEG at quality 80-95, so no two files are equal), then runs every stage of
the pipeline in a scratch project with 1 epoch per training stage (MobileNetV2 at params.yaml's
input size, batch 32, ImageNet weights), each stage as its own process, and records its peak resident
memory (``VmHWM`` of that process) and wall time. Prints a table and JSON, writes
``bench/results/scale.json`` and a plot of memory and time against N.

    export TFDS_DATA_DIR=/path/to/tensorflow_datasets      # with tf_flowers prepared
    python bench/scale.py --sizes 3000 15000 40000 --workdir /tmp/imgclf-scale

MLflow tracking is off in the scratch projects (it is the same at any size). The generated
datasets are kept in ``--workdir`` and reused by later runs.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = [("weights", []), ("download", []), ("split", []), ("store", ["baseline"]), ("store", ["transfer"]),
          ("baseline", []), ("activations", []), ("head", []), ("finetune", []), ("evaluate", []), ("audit", []),
          ("gradcam", []), ("export", [])]


def tf_flowers() -> tuple[list[bytes], list[int], list[str]]:
    import tensorflow_datasets as tfds

    ds, info = tfds.load("tf_flowers", split="train", with_info=True,
                         decoders={"image": tfds.decode.SkipDecoding()})
    records = [(bytes(r["image"]), int(r["label"])) for r in tfds.as_numpy(ds)]
    return [r[0] for r in records], [r[1] for r in records], info.features["label"].names


def _variants(job: tuple[list[bytes], list[int], list[str], int, Path]) -> int:
    """Write one block of generated images (run in worker processes)."""
    from PIL import Image

    photos, labels, names, start, folder = job
    rng = np.random.default_rng(start)
    for offset, (data, label) in enumerate(zip(photos, labels)):
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
            side = rng.uniform(0.7, 1.0)
            w, h = image.size
            cw, ch = max(1, int(w * side)), max(1, int(h * side))
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            crop = image.crop((left, top, left + cw, top + ch))
            if rng.random() < 0.5:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            crop.save(folder / names[label] / f"{start + offset:06d}.jpg", quality=int(rng.integers(80, 96)))
    return len(photos)


def build_dataset(count: int, folder: Path, photos, labels, names) -> Path:
    """``count`` generated images in ``folder/<class>/`` (reused when complete)."""
    done = folder / ".complete"
    if done.exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    for name in names:
        (folder / name).mkdir(parents=True)
    order = [i % len(photos) for i in range(count)]
    jobs = [([photos[i] for i in order[s:s + 500]], [labels[i] for i in order[s:s + 500]], names, s, folder)
            for s in range(0, count, 500)]
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        written = sum(pool.map(_variants, jobs))
    assert written == count
    done.touch()
    return folder


def make_project(dest: Path, dataset: Path) -> Path:
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for name in ("imgclf", "stages"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    (dest / "corrections.csv").write_text("path,action,label\n")  # the committed one holds tf_flowers' fixes
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(source="folder", path=str(dataset))
    params["model"].update(backbone="mobilenetv2", weights="imagenet")
    params["train"].update(batch_size=32)
    for section in ("baseline", "head", "finetune"):
        params[section]["epochs"] = 1
    params["mlflow"]["enabled"] = False
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest


# Runs a stage module as __main__ and, at exit, writes the process's peak resident memory (VmHWM)
# to a file: not ru_maxrss, which Linux carries across exec from the (larger) parent process.
PEAK_WRAPPER = ("import atexit, runpy, sys; out, module = sys.argv[1], sys.argv[2]; "
                "atexit.register(lambda: open(out, 'w').write(next(l.split()[1] for l in open('/proc/self/status') "
                "if l.startswith('VmHWM')))); sys.argv = [module] + sys.argv[3:]; "
                "runpy.run_module(module, run_name='__main__', alter_sys=True)")


def run_stage(project: Path, stage: str, args: list[str], log) -> dict:
    """Run one stage as its own process; its wall time and peak resident memory."""
    peak_file = project / ".peak_kib"
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PEAK_WRAPPER, str(peak_file), f"stages.{stage}", *args],
                          cwd=project, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"stage {stage} {args} failed ({done.returncode}); see {log.name}")
    return {"seconds": round(seconds, 1), "peak_rss_mib": round(int(peak_file.read_text()) / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[3000, 15000, 40000])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/imgclf-scale"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scale.json")
    parser.add_argument("--report", action="store_true", help="only print the table and plot of --out")
    args = parser.parse_args()
    if args.report:
        report(json.loads(args.out.read_text()), args.out.with_suffix(".png"))
        return

    photos, labels, names = tf_flowers()
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}",
               "date": time.strftime("%Y-%m-%d"), "sizes": {}}
    for count in args.sizes:
        started = time.perf_counter()
        dataset = build_dataset(count, args.workdir / f"images-{count}", photos, labels, names)
        print(f"N={count}: dataset ready in {time.perf_counter() - started:.0f} s", flush=True)
        project = make_project(args.workdir / f"project-{count}", dataset)
        rows = {}
        with (args.workdir / f"stages-{count}.log").open("w") as log:
            for stage, stage_args in STAGES:
                name = "@".join([stage, *stage_args])
                rows[name] = run_stage(project, stage, stage_args, log)
                print(f"N={count} {name}: {rows[name]}", flush=True)
        split = json.loads((project / "reports/split/summary.json").read_text())
        results["sizes"][str(count)] = {"images": {s: split[s]["total"] for s in ("train", "val", "test")},
                                        "stages": rows}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
        shutil.rmtree(project)  # its data folder holds several GB at the largest sizes

    report(results, args.out.with_suffix(".png"))


def report(results: dict, plot_path: Path) -> None:
    """The table (peak RSS, seconds and ms per image for every stage and N), the plot, the JSON."""
    sizes = list(results["sizes"])
    stage_names = list(results["sizes"][sizes[0]]["stages"])
    print("\n| stage | " + " | ".join(f"N={int(n):,}: peak RSS MiB / s / ms per image" for n in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for stage in stage_names:
        cells = []
        for n in sizes:
            row = results["sizes"][n]["stages"].get(stage)
            cells.append("—" if row is None else
                         f"{row['peak_rss_mib']:,.0f} / {row['seconds']:,.0f} / {1000 * row['seconds'] / int(n):.1f}")
        print(f"| {stage} | " + " | ".join(cells) + " |")
    plot(results, plot_path)
    print(json.dumps(results, indent=2))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [int(n) for n in results["sizes"]]
    stages = list(next(iter(results["sizes"].values()))["stages"])
    fig, (mem, sec) = plt.subplots(1, 2, figsize=(12, 4.5))
    for stage in stages:
        points = [(n, results["sizes"][str(n)]["stages"][stage]) for n in sizes
                  if stage in results["sizes"][str(n)]["stages"]]
        mem.plot([n for n, _ in points], [r["peak_rss_mib"] / 1024 for _, r in points], marker="o", label=stage)
        sec.plot([n for n, _ in points], [r["seconds"] for _, r in points], marker="o", label=stage)
    mem.set(xlabel="images", ylabel="peak RSS (GiB)", title="Peak memory per stage", ylim=(0, None))
    sec.set(xlabel="images", ylabel="seconds", title="Wall time per stage (1 epoch)")
    mem.axhline(4, color="grey", linestyle=":", linewidth=1)
    sec.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
