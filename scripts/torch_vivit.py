#!/usr/bin/env python3
"""The dense ViViT factorized encoder in PyTorch eager, as the reference a user would otherwise
pick: same architecture as `mone bench model` (Conv3d tubelets, pre-LN blocks with fused QKV and
scaled-dot-product attention, tanh GELU, mean-pooled spatial stage, CLS temporal stage, head).

    python3 scripts/torch_vivit.py --preset vivit-fe-b16 --batch 1 --iters 3 [--threads 2] [--json]

Needs torch (pip install torch); not used by the tests or CI.
"""
import argparse
import json
import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

PRESETS = {
    "vivit-fe-b16": dict(frames=32, size=224, t=2, p=16, d=768, heads=12, ls=12, lt=4, classes=400),
    "vivit-fe-s16": dict(frames=16, size=112, t=2, p=16, d=192, heads=3, ls=6, lt=2, classes=10),
}


class Block(nn.Module):
    def __init__(self, d, heads, mlp):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d, eps=1e-6)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.fc1 = nn.Linear(d, mlp)
        self.fc2 = nn.Linear(mlp, d)

    def forward(self, x):
        b, n, d = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))


class ViViTFE(nn.Module):
    def __init__(self, c):
        super().__init__()
        d = c["d"]
        self.c = c
        self.embed = nn.Conv3d(3, d, kernel_size=(c["t"], c["p"], c["p"]), stride=(c["t"], c["p"], c["p"]))
        n = (c["size"] // c["p"]) ** 2
        nt = c["frames"] // c["t"]
        self.spos = nn.Parameter(torch.randn(1, n, d) * 0.02)
        self.tpos = nn.Parameter(torch.randn(1, nt + 1, d) * 0.02)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.spatial = nn.ModuleList(Block(d, c["heads"], 4 * d) for _ in range(c["ls"]))
        self.snorm = nn.LayerNorm(d, eps=1e-6)
        self.temporal = nn.ModuleList(Block(d, c["heads"], 4 * d) for _ in range(c["lt"]))
        self.tnorm = nn.LayerNorm(d, eps=1e-6)
        self.head = nn.Linear(d, c["classes"])

    def forward(self, x):  # (B, C, T, H, W)
        b = x.shape[0]
        e = self.embed(x)  # (B, D, nt, g, g)
        _, d, nt, g, _ = e.shape
        s = e.permute(0, 2, 3, 4, 1).reshape(b * nt, g * g, d) + self.spos
        for blk in self.spatial:
            s = blk(s)
        s = self.snorm(s).mean(1).reshape(b, nt, d)
        t = torch.cat([self.cls.expand(b, -1, -1), s], 1) + self.tpos
        for blk in self.temporal:
            t = blk(t)
        return self.head(self.tnorm(t)[:, 0])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="vivit-fe-b16", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    c = PRESETS[a.preset]
    dtype = getattr(torch, a.dtype)
    m = ViViTFE(c).to(a.device, dtype).eval()
    x = torch.randn(a.batch, 3, c["frames"], c["size"], c["size"], device=a.device, dtype=dtype)
    results = {}
    variants = [("eager", m)]
    if a.compile:
        variants.append(("compile", torch.compile(m)))
    with torch.inference_mode():
        for name, f in variants:
            f(x)  # warm-up (and compilation)
            ts = []
            for _ in range(a.iters):
                if a.device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                f(x)
                if a.device.startswith("cuda"):
                    torch.cuda.synchronize()
                ts.append(time.perf_counter() - t0)
            lat = statistics.median(ts)
            results[name] = dict(latency_ms=lat * 1e3, clips_per_s=a.batch / lat)
    out = dict(preset=a.preset, batch=a.batch, dtype=a.dtype, device=a.device, threads=torch.get_num_threads(),
               torch=torch.__version__, iters=a.iters, results=results)
    if a.json:
        print(json.dumps(out))
    else:
        for k, v in results.items():
            print(f"torch {k} {a.preset} batch {a.batch} {a.dtype} {a.device} ({torch.get_num_threads()} threads): "
                  f"{v['latency_ms']:.1f} ms/batch, {v['clips_per_s']:.3f} clips/s")


if __name__ == "__main__":
    main()
