#!/usr/bin/env python
"""Per-batch cost of the statistics hooks against the consumer's forward (issue 7).

    .venv/bin/python bench/profile_stats.py [--baseline REV] [--reps 3] [--only NAME ...]
                                            [--backend torch] [--json out.json]

For the consumers of torchvision VGG-16 (conv1_2 ... conv5_3 read the 12 pruned convs
conv1_1 ... conv5_2; 3x3, padding 1) and for fc6 (Linear, C=512, t=49, K=4096, direct
mode), with a batch of 10 random post-ReLU maps and 10 sampled locations per image, this
times every ``ops.gram`` op, ``StatsAccumulator.update`` and ``.result()``, and the
consumer's own forward on the same batch. Times are the median of ``--reps`` runs after
one warm-up, in milliseconds, on whatever device/threads torch uses here.

``--baseline REV`` also times the ``thinet_fast/ops`` of git revision REV in the same
process (exported to a temporary package), so the rows "REV" and "tree" are comparable.

Columns (ms per batch unless noted):
  fwd        the consumer's forward (conv2d / linear) on the batch
  gather     gather_patches for the sampled locations
  samp       sampled_gram;  samp+sum: G and the first moment (return_sum=True where the
             version has it, else sampled_gram + patch_sum, as stats.update did)
  mom        patch_moments (fresh P);  mom+=: P added into a running buffer
             (``into=`` where the version has it, else ``buf += patch_moments()[0]``)
  psum       patch_sum
  dir, dir+sum  direct_gram (all K), and with the first moment (Linear only)
  gfc        gram_from_cov, once per unit (not per batch)
  upd[m]     StatsAccumulator(mode=m).update(x) (count_zeros on, as by default)
  res        .result() of the full (conv) or direct (fc6) accumulator, once per unit
  hook/fwd   upd[full] (conv) or upd[direct] (fc6) over fwd
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# (name, C, K, H=W of the consumer input, how many VGG-16 units have this shape)
VGG16_CONSUMERS = [
    ("conv1_2", 64, 64, 224, 1),
    ("conv2_1", 64, 128, 112, 1),
    ("conv2_2", 128, 128, 112, 1),
    ("conv3_1", 128, 256, 56, 1),
    ("conv3_2/3", 256, 256, 56, 2),
    ("conv4_1", 256, 512, 28, 1),
    ("conv4_2/3", 512, 512, 28, 2),
    ("conv5_1/2/3", 512, 512, 14, 3),
]
FC6 = ("fc6", 512, 4096, 49)  # (name, C, K, t)
BATCH, PER_IMAGE = 10, 10
CONV_COLS = ["fwd", "gather", "samp", "samp+sum", "mom", "mom+=", "psum", "gfc",
             "upd[samp]", "upd[full]", "res", "hook/fwd"]
FC_COLS = ["fwd", "gather", "dir", "dir+sum", "psum", "upd[dir]", "res", "hook/fwd"]


def load_ops(rev: str | None):
    """(gram, patches, stats) modules: the working tree's, or REV's exported copy."""
    if rev is None:
        mods = [importlib.import_module(f"thinet_fast.ops.{m}") for m in ("gram", "patches", "stats")]
        return mods
    tmp = tempfile.mkdtemp(prefix="profile_stats_")
    pkg = "_thinet_fast_" + "".join(ch if ch.isalnum() else "_" for ch in rev)
    archive = subprocess.run(["git", "-C", ROOT, "archive", rev, "thinet_fast/ops"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
    os.rename(os.path.join(tmp, "thinet_fast"), os.path.join(tmp, pkg))
    open(os.path.join(tmp, pkg, "__init__.py"), "w").close()
    sys.path.insert(0, tmp)
    return [importlib.import_module(f"{pkg}.ops.{m}") for m in ("gram", "patches", "stats")]


def timeit(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def has_kw(fn, name: str) -> bool:
    return name in inspect.signature(fn).parameters


def profile_conv(ops, C, K, H, reps, backend):
    gram, patches, stats = ops
    g = torch.Generator().manual_seed(C * 1000 + H)
    x = torch.relu(torch.randn(BATCH, C, H, H, generator=g))
    w = torch.randn(K, C, 3, 3, generator=g) / (3 * C ** 0.5)
    geo = patches.ConsumerGeometry.conv(3, padding=1)
    img, oy, ox = patches.sample_locations(torch.Generator().manual_seed(1), BATCH, (H, H), PER_IMAGE)
    k = torch.randint(K, (img.numel(),), generator=g)
    be = dict(backend=backend)
    r = {"fwd": timeit(lambda: F.conv2d(x, w, padding=1), reps),
         "gather": timeit(lambda: patches.gather_patches(x, geo, img, oy, ox), reps),
         "samp": timeit(lambda: gram.sampled_gram(x, w, geo, img, oy, ox, k, **be), reps),
         "mom": timeit(lambda: gram.patch_moments(x, geo, img, oy, ox, **be), reps),
         "psum": timeit(lambda: gram.patch_sum(x, geo, img, oy, ox), reps)}
    if has_kw(gram.sampled_gram, "return_sum"):
        r["samp+sum"] = timeit(lambda: gram.sampled_gram(x, w, geo, img, oy, ox, k, return_sum=True, **be), reps)
    else:
        r["samp+sum"] = timeit(lambda: (gram.sampled_gram(x, w, geo, img, oy, ox, k, **be),
                                        gram.patch_sum(x, geo, img, oy, ox)), reps)
    buf = torch.zeros(C * 9, C * 9)
    if has_kw(gram.patch_moments, "into"):
        r["mom+="] = timeit(lambda: gram.patch_moments(x, geo, img, oy, ox, into=buf, **be), reps)
    else:
        r["mom+="] = timeit(lambda: buf.add_(gram.patch_moments(x, geo, img, oy, ox, **be)[0]), reps)
    P = gram.patch_moments(x, geo, img, oy, ox, backend="torch")[0]
    r["gfc"] = timeit(lambda: gram.gram_from_cov(w, P, **be), reps)
    del P, buf
    for mode, col in (("sampled", "upd[samp]"), ("full", "upd[full]")):
        acc = stats.StatsAccumulator(w, geo, mode=mode, samples_per_image=PER_IMAGE, **be)
        r[col] = timeit(lambda: acc.update(x), reps)
        if mode == "full":
            r["res"] = timeit(acc.result, reps)
        del acc
    r["hook/fwd"] = r["upd[full]"] / r["fwd"]
    return r


def profile_fc(ops, C, K, t, reps, backend):
    gram, patches, stats = ops
    g = torch.Generator().manual_seed(7)
    x = torch.relu(torch.randn(BATCH, C * t, generator=g))
    w = torch.randn(K, C * t, generator=g) / (C * t) ** 0.5
    geo = patches.ConsumerGeometry.dense(t)
    xm, wk = geo.as_map(x), geo.as_kernel(w)
    img, oy, ox = patches.sample_locations(torch.Generator().manual_seed(1), BATCH, (1, 1), None)
    r = {"fwd": timeit(lambda: F.linear(x, w), reps),
         "gather": timeit(lambda: patches.gather_patches(xm, geo, img, oy, ox), reps),
         "dir": timeit(lambda: gram.direct_gram(xm, wk, geo, img, oy, ox), reps),
         "psum": timeit(lambda: gram.patch_sum(xm, geo, img, oy, ox), reps)}
    if has_kw(gram.direct_gram, "return_sum"):
        r["dir+sum"] = timeit(lambda: gram.direct_gram(xm, wk, geo, img, oy, ox, return_sum=True), reps)
    else:
        r["dir+sum"] = timeit(lambda: (gram.direct_gram(xm, wk, geo, img, oy, ox),
                                       gram.patch_sum(xm, geo, img, oy, ox)), reps)
    acc = stats.StatsAccumulator(w, geo, mode="direct", samples_per_image=PER_IMAGE, backend=backend)
    r["upd[dir]"] = timeit(lambda: acc.update(x), reps)
    r["res"] = timeit(acc.result, reps)
    r["hook/fwd"] = r["upd[dir]"] / r["fwd"]
    return r


def fmt_row(label, version, r, cols):
    cells = [f"{label:<12}", f"{version:<8}"]
    for c in cols:
        v = r.get(c)
        cells.append(f"{'-':>9}" if v is None else (f"{v:>9.2f}" if c == "hook/fwd" else f"{v:>9.1f}"))
    return " ".join(cells)


def print_table(title, cols, rows):
    head = " ".join([f"{'consumer':<12}", f"{'version':<8}"] + [f"{c:>9}" for c in cols])
    print(f"\n{title}\n{head}\n{'-' * len(head)}")
    for label, version, r in rows:
        print(fmt_row(label, version, r, cols))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", metavar="REV", help="also time thinet_fast/ops of this git revision")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", nargs="*", help="consumer names to run (default: all, and fc6)")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    versions = [("tree", load_ops(None))]
    if args.baseline:
        versions.insert(0, (args.baseline[:8], load_ops(args.baseline)))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {BATCH}, "
          f"{PER_IMAGE} locations per image, backend {args.backend}, median of {args.reps}")
    want = lambda name: not args.only or name in args.only  # noqa: E731
    out = {"conv": [], "fc": [], "totals": {}}
    conv_rows, totals = [], {}
    for name, C, K, H, n_units in VGG16_CONSUMERS:
        if not want(name):
            continue
        for vname, ops in versions:
            r = profile_conv(ops, C, K, H, args.reps, args.backend)
            conv_rows.append((name, vname, r))
            out["conv"].append({"consumer": name, "C": C, "K": K, "H": H, "units": n_units, "version": vname, **r})
            tot = totals.setdefault(vname, {c: 0.0 for c in CONV_COLS if c != "hook/fwd"})
            for c in tot:
                tot[c] += n_units * r[c]
            print(f"  [{vname}] {name}: fwd {r['fwd']:.1f} ms, upd[full] {r['upd[full]']:.1f} ms", flush=True)
    for vname, tot in totals.items():
        tot["hook/fwd"] = tot["upd[full]"] / tot["fwd"]
        conv_rows.append(("VGG16 sum", vname, tot))
        out["totals"][vname] = tot
    fc_rows = []
    if want(FC6[0]):
        for vname, ops in versions:
            r = profile_fc(ops, *FC6[1:], args.reps, args.backend)
            fc_rows.append((FC6[0], vname, r))
            out["fc"].append({"consumer": FC6[0], "version": vname, **r})
    if conv_rows:
        print_table("Conv consumers, 3x3 pad 1 (ms; 'VGG16 sum' weights each shape by its unit count; "
                    "gfc and res are once per unit)", CONV_COLS, conv_rows)
    if fc_rows:
        print_table(f"Linear consumer {FC6[0]}: C={FC6[1]}, t={FC6[3]}, K={FC6[2]}, direct mode (ms)", FC_COLS, fc_rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
