"""Host memory of loading a real-size base model: an fp32 load cast afterwards against the trainer's load straight
into its training dtype (library/model_util.load_model(dtype=...)), side by side. Linux only (/proc).

    python -m bench.load_memory                      # SD1.5 size, bf16 (writes a 2.1 GB random fp16 file to a temp dir)
    python -m bench.load_memory --arch sdxl          # SDXL size (6.9 GB file, ~14 GiB of memory for the fp32 row)
    python -m bench.load_memory --out bench/results/load_memory-cpu.md

The checkpoint has random fp16 weights under the real LDM key names (written tensor by tensor from the meta-device
model, so writing it needs ~100 MB). Each row is a fresh process; "private peak" is the largest RssAnon sampled
every 10 ms (what runs a machine out of memory), "RSS peak" VmHWM (also counts the file's mapped pages, which the
kernel can drop). The fp32 row is what the trainer's load used to be.
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time

ROWS = {"fp32 load, then cast": "fp32", "load in the training dtype": "train"}


def write_checkpoint(arch: str, path: str) -> int:
    """A single-file checkpoint of `arch` with random fp16 weights; returns its size in bytes."""
    import numpy as np

    from library import ldm_convert
    from library.model_util import _empty_model, arch_config

    configs = arch_config(arch)
    m = _empty_model(configs, False)
    sd = ldm_convert.to_ldm(arch, m.unet.state_dict(), m.vae.state_dict(), [t.state_dict() for t in m.text_encoders],
                            configs)
    header, offset = {}, 0
    for k, v in sorted(sd.items()):
        n = max(1, v.numel()) * 2
        header[k] = {"dtype": "F16", "shape": list(v.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    chunk = (np.random.default_rng(0).standard_normal(16 << 20).astype(np.float16) * np.float16(0.02)).tobytes()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        left = offset
        while left:
            f.write(chunk[:min(left, len(chunk))])
            left -= min(left, len(chunk))
    return os.path.getsize(path)


def measure(path: str, how: str, mixed_precision: str) -> dict:
    """In this process (a fresh one per row): load as `how` says, then the trainer's casts; the peaks in GiB."""
    import threading

    import torch

    from library.model_util import load_model
    from library.train_util import weight_dtype

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 2**20 for line in f if line.startswith(key + ":"))

    peak, done = [0.0], threading.Event()

    def sample():
        while not done.wait(0.01):
            peak[0] = max(peak[0], status("RssAnon"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    dtype = weight_dtype(mixed_precision)
    t0 = time.perf_counter()
    model = load_model(path, dtype=dtype if how == "train" else torch.float32)
    for module in (model.vae, model.unet, *model.text_encoders):  # train_apt_lora: .to(device, weight_dtype)
        module.to("cpu", dtype)
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    return {"private": max(peak[0], status("RssAnon")), "rss": status("VmHWM"), "seconds": seconds}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="sd1", choices=("sd1", "sd2", "sdxl"))
    p.add_argument("--mixed_precision", default="bf16", choices=("bf16", "fp16"))
    p.add_argument("--out", default=None, help="also write the table to this file")
    p.add_argument("--_measure", nargs=2, help=argparse.SUPPRESS)  # (path, how): one row, as JSON on stdout
    a = p.parse_args(argv)
    if a._measure:
        print(json.dumps(measure(*a._measure, a.mixed_precision)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{a.arch}.safetensors")
        size = write_checkpoint(a.arch, path) / 2**30
        rows = {}
        for label, how in ROWS.items():
            out = subprocess.run([sys.executable, "-m", "bench.load_memory", "--mixed_precision", a.mixed_precision,
                                  "--_measure", path, how], capture_output=True, text=True, check=True)
            rows[label] = json.loads(out.stdout.strip().splitlines()[-1])
    base = rows["fp32 load, then cast"]
    lines = [f"# Loading a base model: host memory ({a.arch}, {a.mixed_precision}, `python -m bench.load_memory "
             f"--arch {a.arch} --mixed_precision {a.mixed_precision}`)", "",
             f"{time.strftime('%Y-%m-%d %H:%M')}, random fp16 single file of {size:.2f} GiB, torch "
             f"{__import__('torch').__version__}", "",
             "| load | private peak | x file | RSS peak | load + casts | private vs fp32 load |", "|---|---|---|---|---|---|"]
    for label, r in rows.items():
        lines.append(f"| {label} | {r['private']:.2f} GiB | {r['private'] / size:.2f} | {r['rss']:.2f} GiB | "
                     f"{r['seconds']:.1f} s | {r['private'] / base['private']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    from bench.common import write_result

    write_result(text, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
