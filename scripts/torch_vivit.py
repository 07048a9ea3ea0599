#!/usr/bin/env python3
"""The ViViT factorized encoder in PyTorch eager, as the reference a user would otherwise pick:
same architecture as `mone bench model` (Conv3d tubelets, pre-LN blocks with fused QKV and
scaled-dot-product attention, tanh GELU, mean-pooled spatial stage, CLS temporal stage, head).

    python3 scripts/torch_vivit.py --preset vivit-fe-b16 --batch 1 --iters 3 [--threads 2] [--json]

With --counts c_1,...,c_E (tokens per expert and frame, smallest expert first, as `mone bench
model --json` reports them) it also times MoNE as a plain nested implementation doing the same
work as mone's: one router at the first spatial layer, Expert Preferred Routing per frame
(widest expert first), tokens sorted by expert once, then per layer one F.linear per width group
on weight slices (partial in-projections to the full width, zero-padded out-projections), plain
dense attention over all tokens, the MLP output scaled by (alpha * r + 1). --gemm times the
dense forward's linear-layer shapes alone and reports their best GFLOP/s.

Needs torch (scripts/compare_torch.sh installs it); not used by the tests or CI.
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


    def forward_nested(self, x, groups, scale):
        """x (S, N, D) with each sequence's tokens sorted by expert; groups [(offset, count,
        width)] in token order; scale (S, N, 1) the MLP scale of every token."""
        s, n, d = x.shape

        def inp(h, lin):
            return torch.cat([F.linear(h[:, o:o + c, :w], lin.weight[:, :w], lin.bias) for o, c, w in groups], 1)

        def out(a, lin):
            return torch.cat([F.pad(F.linear(a[:, o:o + c], lin.weight[:w], lin.bias[:w]), (0, d - w))
                              for o, c, w in groups], 1)

        qkv = inp(self.norm1(x), self.qkv).reshape(s, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        x = x + out(a.transpose(1, 2).reshape(s, n, d), self.proj)
        f = F.gelu(inp(self.norm2(x), self.fc1), approximate="tanh")
        return x + out(f, self.fc2) * scale


def expert_preferred_routing(probs, counts):
    """probs (S, N, E); counts per expert (smallest first). Widest expert first, each takes its
    count of the untaken tokens it prefers most. Returns (S, N) token order sorted by expert,
    smallest expert first, and the expert of every token in that order."""
    s, n, e = probs.shape
    taken = torch.zeros(s, n, dtype=torch.bool)
    picks = [None] * e
    for j in reversed(range(e)):
        if counts[j] == 0:
            continue
        if j == 0:
            picks[j] = (~taken).nonzero()[:, 1].reshape(s, -1)  # the rest, in token order
            continue
        score = probs[:, :, j].masked_fill(taken, float("-inf"))
        idx = score.topk(counts[j], dim=1).indices
        taken.scatter_(1, idx, True)
        picks[j] = idx
    order = torch.cat([p for p in picks if p is not None], 1)
    expert = torch.cat([torch.full((s, c), j) for j, c in enumerate(counts) if c > 0], 1)
    return order, expert


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
        self.experts = c.get("experts", 4)
        self.router = nn.Linear(d, self.experts)
        self.alpha = 0.5

    def embed_tokens(self, x):
        e = self.embed(x)  # (B, D, nt, g, g)
        b, d, nt, g, _ = e.shape
        return e.permute(0, 2, 3, 4, 1).reshape(b * nt, g * g, d) + self.spos

    def temporal_head(self, s, b):
        nt, d = s.shape[0] // b, s.shape[-1]
        s = self.snorm(s).mean(1).reshape(b, nt, d)
        t = torch.cat([self.cls.expand(b, -1, -1), s], 1) + self.tpos
        for blk in self.temporal:
            t = blk(t)
        return self.head(self.tnorm(t)[:, 0])

    def forward_mone(self, x, counts):
        b = x.shape[0]
        s = self.embed_tokens(x)
        d = s.shape[-1]
        probs = F.softmax(self.router(s), -1)
        order, expert = expert_preferred_routing(probs, counts)
        s = s.gather(1, order.unsqueeze(-1).expand(-1, -1, d))
        r = probs.gather(1, order.unsqueeze(-1).expand(-1, -1, self.experts)).gather(2, expert.unsqueeze(-1))
        scale = self.alpha * r + 1
        groups, off = [], 0
        for j, c in enumerate(counts):
            if c > 0:
                groups.append((off, c, d >> (self.experts - 1 - j)))
            off += c
        for blk in self.spatial:
            s = blk.forward_nested(s, groups, scale)
        return self.temporal_head(s, b)

    def forward(self, x):  # (B, C, T, H, W)
        b = x.shape[0]
        s = self.embed_tokens(x)
        for blk in self.spatial:
            s = blk(s)
        return self.temporal_head(s, b)


def time_it(f, iters, sync):
    f()  # warm-up (and compilation)
    ts = []
    for _ in range(iters):
        sync()
        t0 = time.perf_counter()
        f()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def gemm_rates(c, batch, iters, device, dtype):
    """Best GFLOP/s of F.linear on the dense spatial stage's shapes (rows x in -> out)."""
    rows = batch * (c["frames"] // c["t"]) * (c["size"] // c["p"]) ** 2
    d = c["d"]
    out = {}
    for name, k, n in [("qkv", d, 3 * d), ("proj", d, d), ("fc1", d, 4 * d), ("fc2", 4 * d, d)]:
        x = torch.randn(rows, k, device=device, dtype=dtype)
        w = torch.randn(n, k, device=device, dtype=dtype)
        bias = torch.randn(n, device=device, dtype=dtype)
        best = float("inf")
        F.linear(x, w, bias)
        for _ in range(max(iters, 3)):
            t0 = time.perf_counter()
            F.linear(x, w, bias)
            best = min(best, time.perf_counter() - t0)
        out[f"{name} {rows}x{k}x{n}"] = 2 * rows * k * n / best * 1e-9
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="vivit-fe-b16", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile")
    ap.add_argument("--counts", action="append", default=[],
                    help="tokens per expert and frame, smallest expert first (repeatable)")
    ap.add_argument("--gemm", action="store_true", help="also time the linear layers' shapes alone")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense forward")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    c = PRESETS[a.preset]
    dtype = getattr(torch, a.dtype)
    m = ViViTFE(c).to(a.device, dtype).eval()
    x = torch.randn(a.batch, 3, c["frames"], c["size"], c["size"], device=a.device, dtype=dtype)
    results = {}
    variants = [] if a.no_dense else [("eager", m)]
    if a.compile:
        variants.append(("compile", torch.compile(m)))
    n = (c["size"] // c["p"]) ** 2
    for spec in a.counts:
        counts = [int(v) for v in spec.split(",")]
        if len(counts) != m.experts or sum(counts) != n:
            raise SystemExit(f"--counts {spec}: {m.experts} counts summing to {n} tokens per frame expected")
        variants.append((f"nested {spec}", lambda x, counts=counts: m.forward_mone(x, counts)))
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)
    with torch.inference_mode():
        for name, f in variants:
            lat = time_it(lambda: f(x), a.iters, sync)
            results[name] = dict(latency_ms=lat * 1e3, clips_per_s=a.batch / lat)
        gemm = gemm_rates(c, a.batch, a.iters, a.device, dtype) if a.gemm else None
    out = dict(preset=a.preset, batch=a.batch, dtype=a.dtype, device=a.device, threads=torch.get_num_threads(),
               torch=torch.__version__, iters=a.iters, results=results, gemm_gflops=gemm)
    if a.json:
        print(json.dumps(out))
    else:
        for k, v in results.items():
            print(f"torch {k} {a.preset} batch {a.batch} {a.dtype} {a.device} ({torch.get_num_threads()} threads): "
                  f"{v['latency_ms']:.1f} ms/batch, {v['clips_per_s']:.3f} clips/s")
        for k, v in (gemm or {}).items():
            print(f"torch F.linear {k}: {v:.1f} GFLOP/s (best of {max(a.iters, 3)})")


if __name__ == "__main__":
    main()
