"""Curation throughput: ours (Ray Data, `vlm curate`) vs img2dataset, same URL list, same cores.

    python benchmarks/curate.py [--num 10000] [--width 640 --height 480 --quality 94] [--cpus 2]
                                [--repeats 2] [--record FILE] [key=value overrides for ours ...]

Writes a generated world of N JPEGs (cached under --work; 640x480 at quality 94 is ~54 KB a
file), serves it from 127.0.0.1 (``PreloadedServer``: every file in memory, one event loop,
keep-alive, in its own process, the same server for both tools), then runs each tool in its own
subprocess on the same URL list with the same output: 256 px, keep_ratio, JPEG q95, WebDataset
shards of 1,000. The tools alternate (img2dataset, ours, ours, img2dataset, ...: ``--repeats``
pairs) so that a drift in the machine's load does not favour either. Prints, per run and as the
median of the runs, samples/s end to end (process start to exit), the peak RSS and CPU seconds of
each tool's whole process tree (polled every 50 ms) plus the server's CPU meanwhile, successes,
and the ratio ours / img2dataset; ours also after Ray is up. A quality check compares both
tools' output images with a reference (the source decoded in full, Lanczos-resized to the same
size): PSNR in dB, higher is closer. Ours runs with every feature of a default run (a status row
per input, exact and near-duplicate dedup across the run, stats, the report).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.world import write_url_list, write_world  # noqa: E402
from vlm.world import WorldConfig  # noqa: E402

IMG2DATASET = """
import os, sys
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no update check over the network
import img2dataset
url_list, out, procs, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
img2dataset.download(url_list=url_list, input_format="parquet", url_col="url", caption_col="caption",
    output_format="webdataset", output_folder=out, image_size=256, resize_mode="keep_ratio",
    encode_format="jpg", encode_quality=95, processes_count=procs, thread_count=threads,
    number_sample_per_shard=1000, timeout=10, retries=0, enable_wandb=False, distributor="multiprocessing")
"""


def _process_name(p: psutil.Process) -> str:
    """A short name for the CPU table: Ray's process title, else the program and its module."""
    cmd = p.cmdline()
    if cmd and cmd[0].startswith("ray::"):  # ray::Class.method, ray::NAME:Class.__init__, ray::MapBatches(fn)
        name = cmd[0][5:].split("(")[0].split(":")[-1].split(".")[0]
        return f"ray::{name}"
    args = [a for a in cmd[1:] if not a.startswith("-")][:1]
    return " ".join([Path(cmd[0]).name if cmd else p.name(), *(Path(a).name for a in args)])[:40]


def _tree_sample(proc: psutil.Process, cpu: dict[int, float], names: dict[int, str]) -> int:
    """RSS of the tree now; records each process's CPU seconds so far in ``cpu`` (and its name)."""
    total = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    for p in procs:
        try:
            with p.oneshot():
                total += p.memory_info().rss
                t = p.cpu_times()
                cpu[p.pid] = t.user + t.system
                if names.get(p.pid, "ray::IDLE") in ("python default_worker.py", "ray::IDLE"):
                    names[p.pid] = _process_name(p)  # a Ray worker takes its ray::NAME title once it runs
        except psutil.Error:
            pass
    return total


def run_measured(cmd: list[str], *, env: dict | None = None, server: psutil.Process | None = None) -> dict:
    """Run ``cmd``; wall seconds, the peak RSS and CPU seconds of its process tree (polled every
    50 ms; a process that lives < 50 ms is missed), the CPU seconds by process name, and the
    server's CPU seconds meanwhile."""
    server_cpu0 = sum(server.cpu_times()[:2]) if server else 0.0
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ps, peak, stop, cpu, names = psutil.Process(proc.pid), [0], threading.Event(), {}, {}

    def poll() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _tree_sample(ps, cpu, names))
            time.sleep(0.05)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - start
    stop.set()
    t.join()
    if proc.returncode != 0:
        raise RuntimeError(f"expected {cmd[:4]}... to exit 0, got {proc.returncode}:\n{out[-3000:]}")
    server_cpu = sum(server.cpu_times()[:2]) - server_cpu0 if server else 0.0
    by_name: dict[str, list[float]] = {}
    for pid, seconds in cpu.items():
        by_name.setdefault(names.get(pid, "?"), []).append(seconds)
    top = dict(sorted(((f"{k} x{len(v)}", round(sum(v), 1)) for k, v in by_name.items()), key=lambda kv: -kv[1])[:8])
    return {"wall_s": wall, "peak_rss_mb": peak[0] / 2**20, "cpu_s": sum(cpu.values()), "server_cpu_s": server_cpu,
            "cpu_by_process": top, "log": out}


def count_successes(out_dir: Path) -> int:
    import pyarrow.parquet as pq

    return sum(
        sum(1 for s in pq.read_table(p, columns=["status"]).column("status").to_pylist() if s == "success")
        for p in out_dir.glob("[0-9]*.parquet")
    )


def output_psnr(out_dir: Path, world: Path, *, every: int = 100) -> tuple[float, int]:
    """Mean PSNR (dB) of the output images of every ``every``-th source image (the same images
    for both tools, wherever they landed) against the reference: the source decoded in full
    and Lanczos-resized to the output's size. Returns (mean dB, images compared)."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    wanted = {p.name for p in sorted((world / "images").glob("*.jpg"))[::every]}
    values = []
    for tar_path in sorted(out_dir.glob("[0-9]*.tar")):
        with tarfile.open(tar_path) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name in (n for n in members if n.endswith(".json")):
                source = json.loads(tar.extractfile(members[name]).read())["url"].rsplit("/", 1)[1]
                image = members.get(name[:-5] + ".jpg")
                if source not in wanted or image is None:
                    continue
                out = Image.open(io.BytesIO(tar.extractfile(image).read())).convert("RGB")
                src = Image.open(world / "images" / source).convert("RGB")
                ref = np.asarray(src.resize(out.size, Image.Resampling.LANCZOS), dtype=np.float64)
                mse = np.mean((np.asarray(out, dtype=np.float64) - ref) ** 2)
                values.append(10 * np.log10(255**2 / max(mse, 1e-10)))
    return (float(np.mean(values)) if values else float("nan")), len(values)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num", type=int, default=10_000)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--quality", type=int, default=94, help="JPEG quality of the served images (94: ~54 KB at 640x480)")
    ap.add_argument("--cpus", type=int, default=2, help="ours: Ray CPUs; img2dataset: processes")
    ap.add_argument("--threads", type=int, default=64, help="img2dataset thread_count per process")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each tool, alternating (ABBA ...)")
    ap.add_argument("--work", default="runs/bench_curate")
    ap.add_argument("--port", type=int, default=8931)
    ap.add_argument("--only", choices=("both", "ours", "img2dataset"), default="both")
    ap.add_argument("--record", default=None, help="append the result as a markdown section to this file")
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for ours")
    args = ap.parse_args(argv)

    work = Path(args.work).resolve()
    world = work / f"world_{args.num}_{args.width}x{args.height}_q{args.quality}"
    if not (world / "manifest.json").is_file():
        print(f"writing {args.num} images of {args.width}x{args.height} to {world} ...", flush=True)
        cfg = WorldConfig(seed=0, num_train=args.num, num_heldout=0, num_pairs=0, num_heldout_pairs=0,
                          num_videos=0, num_heldout_videos=0, texture=True)
        write_world(world, config=cfg, image_width=args.width, image_height=args.height, jpeg_quality=args.quality,
                    with_broken=False, overwrite=world.exists(), num_workers=args.cpus)
    manifest = json.loads((world / "manifest.json").read_text())
    mean_kb = manifest["counts"]["bytes"]["images"] / args.num / 1024

    server = subprocess.Popen([sys.executable, "-m", "pipelines.local_server", str(world), str(args.port)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    base = server.stdout.readline().strip()
    urls = write_url_list(world, base_url=base, out_path=work / "urls.parquet")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0", "NO_ALBUMENTATIONS_UPDATE": "1"}
    tools = ["img2dataset", "ours"] if args.only == "both" else [args.only]
    order = [t for i in range(args.repeats) for t in (tools if i % 2 == 0 else tools[::-1])]
    runs: dict[str, list[dict]] = {t: [] for t in tools}
    load_before = os.getloadavg()
    try:
        for tool in order:
            out = work / f"out_{tool}"
            shutil.rmtree(out, ignore_errors=True)
            if tool == "img2dataset":
                cmd = [sys.executable, "-c", IMG2DATASET, str(urls), str(out), str(args.cpus), str(args.threads)]
            else:
                cmd = [sys.executable, "-m", "pipelines.cli", "--input", str(urls), "--output", str(out),
                       f"run.num_cpus={args.cpus}", "image.image_size=256", "image.resize_mode=keep_ratio",
                       "image.encode_format=jpg", "image.encode_quality=95", "output.shard_size=1000",
                       "run.progress=false", *args.overrides]
            for attempt in range(3):  # a local Ray can time out starting on an overloaded machine
                try:
                    r = run_measured(cmd, env=env, server=psutil.Process(server.pid))
                    break
                except RuntimeError as e:
                    if "timed out during startup" not in str(e) or attempt == 2:
                        raise
                    print("Ray did not start (machine overloaded); trying again", flush=True)
                    shutil.rmtree(out, ignore_errors=True)
            r["successes"] = count_successes(out)
            if tool == "ours":
                summary = json.loads((out / "summary.json").read_text())
                r.update(pipeline_s=summary["pipeline_seconds"], ray_start_s=summary["ray_start_seconds"])
            if not runs[tool]:
                r["psnr_db"], r["psnr_n"] = output_psnr(out, world)
            runs[tool].append(r)
            print(f"{tool}: {json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in r.items() if k != 'log'})}",
                  flush=True)
    finally:
        server.terminate()
        server.wait()
    load_after = os.getloadavg()

    def median(tool: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[tool])

    lines = [f"curation benchmark: {args.num} JPEGs {args.width}x{args.height} (mean {mean_kb:.0f} KB) from 127.0.0.1, "
             f"{args.cpus} CPUs ({os.cpu_count()} visible), {platform.processor() or platform.machine()}; "
             f"{args.repeats} runs of each tool, alternating",
             f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}"]
    for tool in tools:
        rs = runs[tool]
        per_run = ", ".join(f"{args.num / r['wall_s']:.0f}" for r in rs)
        cpu = median(tool, "cpu_s") + median(tool, "server_cpu_s")
        lines.append(f"{tool:12s} {rs[0]['successes']:6d} ok  {median(tool, 'wall_s'):6.1f} s  "
                     f"{args.num / median(tool, 'wall_s'):6.1f} samples/s (runs: {per_run})  "
                     f"peak RSS {max(r['peak_rss_mb'] for r in rs):6.0f} MB  CPU {median(tool, 'cpu_s'):5.1f} s "
                     f"(+ server {median(tool, 'server_cpu_s'):4.1f} s) = {args.num / cpu:5.1f} samples per CPU-second  "
                     f"PSNR vs reference {rs[0]['psnr_db']:.2f} dB ({rs[0]['psnr_n']} images)")
    for tool in tools:
        lines.append(f"{tool} CPU seconds by process (first run): {runs[tool][0]['cpu_by_process']}")
    if "ours" in runs:
        lines.append(f"ours after Ray is up: {median('ours', 'pipeline_s'):.1f} s, "
                     f"{args.num / median('ours', 'pipeline_s'):.1f} samples/s (Ray start {median('ours', 'ray_start_s'):.1f} s)")
    if len(tools) == 2:
        ratio = median("img2dataset", "wall_s") / median("ours", "wall_s")
        lines.append(f"ratio ours / img2dataset (samples/s end to end, medians): {ratio:.2f}x")
        cpu = {t: median(t, "cpu_s") + median(t, "server_cpu_s") for t in tools}
        lines.append(f"ratio ours / img2dataset (samples per CPU-second): {cpu['img2dataset'] / cpu['ours']:.2f}x")
    text = "\n".join(lines)
    print(text)
    if args.record:
        with open(args.record, "a") as f:
            f.write(f"\n## Curation ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n\n```\n"
                    f"python benchmarks/curate.py --num {args.num} --cpus {args.cpus} --repeats {args.repeats}\n{text}\n```\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
