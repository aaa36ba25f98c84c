"""Checks of bench/roofline.py's counting: each count is compared with one derived
independently (by hand for a tiny shape, by torch's FlopCounterMode on the *_ref
implementations, by an aten-op tally, or from torchvision's own module list)."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from thinet_fast.counting import profile
from thinet_fast.ops.gram import direct_gram_ref, gram_from_cov, patch_moments_ref, sampled_gram_ref
from thinet_fast.ops.patches import ConsumerGeometry
from thinet_fast.ops.stats import choose_mode
from thinet_fast.units import find_units

from bench import roofline as R  # noqa: E402

EXAMPLE = torch.empty(1, 3, 224, 224)


class _ArithTally(TorchDispatchMode):
    """Floating-point elementwise arithmetic of a torch computation: one flop per multiply
    output element, (n_in - n_out) adds per sum reduction (integer index math is skipped)."""

    def __init__(self):
        super().__init__()
        self.muls = 0
        self.adds = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if not (isinstance(out, torch.Tensor) and out.is_floating_point()):
            return out
        if name in ("mul", "mul_"):
            self.muls += out.numel()
        elif name == "sum":
            self.adds += args[0].numel() - out.numel()
        return out


def _mm_flops(fn, *args, **kwargs) -> int:
    with FlopCounterMode(display=False) as fc:
        fn(*args, **kwargs)
    return fc.get_total_flops()


def _tiny_conv_problem(C=3, K=2, N=2, H=5, W=6, S=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=g)
    kernel = torch.randn(K, C, 2, 2, generator=g)
    geom = ConsumerGeometry.conv((2, 2), 1, 1)
    oh, ow = geom.out_size(H, W)
    img = torch.randint(N, (S,), generator=g)
    pos = torch.randint(oh * ow, (S,), generator=g)
    k = torch.randint(K, (S,), generator=g)
    return x, kernel, geom, img, pos // ow, pos % ow, k


# ------------------------------------------------------------------ the floor itself
def test_floor_is_max_of_compute_and_memory():
    dev = R.Device("toy", fp32=1e12, tensor=4e12, fp64=0.5e12, bandwidth=1e11, sms=10, host_link=1e10)
    assert R.Cost("c", flops=2e12).floor(dev) == pytest.approx(2.0)            # compute bound
    assert R.Cost("m", bytes=5e11).floor(dev) == pytest.approx(5.0)            # memory bound
    c = R.Cost("both", flops=1e12, bytes=5e10)
    assert c.floor(dev) == pytest.approx(max(1e12 / 1e12, 5e10 / 1e11)) == pytest.approx(1.0)
    mm = R.Cost("mm", mm_flops=4e12, bytes=1e10)
    assert mm.floor(dev) == pytest.approx(4.0)                                 # CUDA cores
    assert mm.floor(dev, tensor_cores=True) == pytest.approx(1.0)              # tensor cores
    assert R.Cost("f64", fp64_flops=1e12).floor(dev, True) == pytest.approx(2.0)
    # one block per problem: 1/SMs of the chip, and a chain of dependent steps
    assert R.Cost("blk", flops=1e11, blocks=1).floor(dev) == pytest.approx(1.0)
    assert R.Cost("lat", flops=1.0, blocks=25, serial_steps=1000).floor(dev) == pytest.approx(3 * 1000 * 1e-6)
    costs = [c, mm, R.Cost("m", bytes=5e11)]
    assert R.floor_sum(costs, dev) == pytest.approx(1.0 + 4.0 + 5.0)
    # datasheet peaks as documented
    assert (R.H100.fp32, R.H100.tensor, R.H100.bandwidth) == (66.9e12, 494.7e12, 3.35e12)
    assert (R.M40.fp32, R.M40.bandwidth) == (7.0e12, 288e9)
    assert R.M40.tensor == R.M40.fp32 and R.M40.fp64 == pytest.approx(R.M40.fp32 / 32)


# ------------------------------------------------------------------ statistics kernels
def test_sampled_gram_counts_match_the_reference_by_hand():
    C, K, S, t = 3, 2, 5, 4
    x, kernel, geom, img, oy, ox, k = _tiny_conv_problem(C=C, K=K, S=S)
    # by hand: X[s, c] = Σ_u W[k_s, c, u] z[s, c, u] -> S·C·t multiplies, S·C·(t-1) adds;
    # G = XᵀX -> C·C outputs of S multiply-adds each.
    hand_mul, hand_add, hand_mm = S * C * t, S * C * (t - 1), 2 * S * C * C
    assert (hand_mul, hand_add, hand_mm) == (60, 45, 90)
    tally = _ArithTally()
    with tally:
        sampled_gram_ref(x, kernel, geom, img, oy, ox, k)
    assert (tally.muls, tally.adds) == (hand_mul, hand_add)
    assert _mm_flops(sampled_gram_ref, x, kernel, geom, img, oy, ox, k) == hand_mm

    cost = R.sampled_gram_cost(C, t, rows=S, patches=S)
    print("sampled:", cost, "hand:", hand_mul, hand_add, hand_mm)
    assert cost.mm_flops == hand_mm
    moment = C * t * S  # first moment Σ z_s, D adds per row
    # 2·D per row = the t multiplies and t adds of each channel's tap dot (the first add
    # into a zero accumulator is the one the torch reduction does not need)
    assert cost.flops - moment == hand_mul + hand_add + S * C
    # bytes: patches (fp32) + one filter row per sample + G once
    assert cost.bytes == S * C * t * 4 + S * C * t * 4 + C * C * 4 == 516


def test_full_mode_counts_match_the_reference():
    C, K, S, t = 3, 2, 5, 4
    D = C * t
    x, kernel, geom, img, oy, ox, _ = _tiny_conv_problem(C=C, K=K, S=S)
    P_cost, GP_cost = R.full_costs(C, t, K, patches=S)
    # P = ZᵀZ: D·D outputs of S multiply-adds
    assert _mm_flops(patch_moments_ref, x, geom, img, oy, ox) == 2 * S * D * D == P_cost.mm_flops
    assert P_cost.flops == D * S  # Σ z_s
    assert P_cost.bytes == (S * D + D * D + D) * 4
    P, _ = patch_moments_ref(x, geom, img, oy, ox)
    # A = WᵀW: D·D outputs of K multiply-adds; then (A∘P) and the (t x t) block sums
    assert _mm_flops(gram_from_cov, kernel, P, backend="torch") == 2 * K * D * D == GP_cost.mm_flops
    tally = _ArithTally()
    with tally:
        gram_from_cov(kernel, P, backend="torch")
    assert tally.muls == D * D and tally.adds == D * D - C * C
    assert GP_cost.flops == 2 * D * D  # one add per product (incl. into a zero accumulator)
    assert GP_cost.bytes == (K * D + D * D + C * C) * 4


def test_direct_mode_counts_match_the_reference():
    C, K, N, t = 4, 6, 3, 5
    g = torch.Generator().manual_seed(1)
    geom = ConsumerGeometry.dense(t)
    x = geom.as_map(torch.randn(N, C * t, generator=g))
    kernel = geom.as_kernel(torch.randn(K, C * t, generator=g))
    img, oy, ox = torch.arange(N), torch.zeros(N, dtype=torch.long), torch.zeros(N, dtype=torch.long)
    hand = 2 * K * C * t * N + 2 * K * C * C * N  # every output: contributions + Gram
    assert _mm_flops(direct_gram_ref, x, kernel, geom, img, oy, ox) == hand
    s = R.Sampling(images=N, batch=2)
    cost = R.direct_cost(C, t, K, patches=N, s=s)
    assert cost.mm_flops == hand and cost.flops == C * t * N
    # patches + W once per forward batch (2 batches) + X written and read + G
    assert cost.bytes == (N * C * t + 2 * K * C * t + 2 * N * K * C + C * C) * 4


def test_sample_counts_follow_the_accumulator():
    vgg = find_units(R.build_model("vgg16"), EXAMPLE)
    s = R.Sampling()
    conv, fc6 = vgg.units[0], vgg.units[12]
    assert R.sample_counts(conv, "full", s) == (100_000, 100_000)
    assert R.sample_counts(conv, "sampled", s) == (100_000, 100_000)
    # a Linear consumer has one location per image; sampled mode draws 10 outputs of it
    assert R.sample_counts(fc6, "sampled", s) == (100_000, 10_000)
    assert R.sample_counts(fc6, "direct", s) == (10_000, 10_000)
    z = R.zero_count_cost(conv, s)
    assert z.bytes == 10_000 * 64 * 224 * 224 * 4 and z.flops == 10_000 * 64 * 224 * 224


# ------------------------------------------------------------------ selection
def test_selection_costs_by_hand():
    g = R.greedy_cost([4])
    # 3 removals (C-1), each: score (FMA), argmin (compare), update (add) over C = 4
    assert g.flops == 3 * (3 * 4) and g.bytes == (3 * 4 + 4) * 4
    assert (g.blocks, g.serial_steps) == (1, 3)
    b = R.greedy_cost([4, 10, 6])
    assert b.flops == sum(3 * c * (c - 1) for c in (4, 10, 6)) and (b.blocks, b.serial_steps) == (3, 9)
    assert R.pad_batch_cost([4, 10, 6]).bytes == (3 * 100 + 16 + 100 + 36) * 4
    ls = R.ls_scale_cost(5, 3)
    assert ls.fp64_flops == pytest.approx(27 / 3 + 2 * 9 + 3 * 5) and ls.flops == ls.mm_flops == 0
    fls = R.forward_ls_cost(5, 3)
    assert fls.fp64_flops == sum(2 * 5 * s + 2 * s * s for s in (1, 2, 3)) and fls.serial_steps == 3


# ------------------------------------------------------------------ forward passes
def test_trace_forward_tiny_model_by_hand():
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                              nn.Linear(64, 10))
    tr = R.trace_forward(model, ["4"], image_shape=(3, 8, 8))
    got = [(o.op, o.flops_per_image, o.act_bytes_per_image, o.weight_bytes) for o in tr.ops]
    print(got)
    assert got == [
        ("aten.convolution.default", 2 * 4 * 64 * 3 * 9, (3 * 64 + 4 * 64) * 4, (4 * 3 * 9 + 4) * 4),
        ("aten.relu.default", 0, 2 * 4 * 64 * 4, 0),
        # max-pool writes fp32 values and int64 indices (as CUDA eager does); flatten is a view
        ("aten.max_pool2d_with_indices.default", 0, (4 * 64 + 4 * 16) * 4 + 4 * 16 * 8, 0),
        ("aten.addmm.default", 2 * 10 * 64, (64 + 10) * 4, (10 * 64 + 10) * 4),
    ]
    assert tr.consumer_at == {"4": 3}
    assert tr.flops_per_image() == profile(model, torch.empty(1, 3, 8, 8)).flops
    s = R.Sampling(images=10, batch=4, image_shape=(3, 8, 8))  # 3 batches
    costs = R.forward_costs(tr, tr.consumer_at["4"], s)
    assert [c.bytes for c in costs] == [10 * o[2] + 3 * o[3] for o in got[:3]]
    assert costs[0].mm_flops == 10 * got[0][1] and costs[0].flops == 0


def _conv_linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def test_vgg16_units_modes_and_prefixes():
    import torchvision

    model = R.build_model("vgg16")
    plan = find_units(model, EXAMPLE)
    # independent count: torchvision's VGG-16 is a plain chain of 13 convs and 3 linears;
    # every one but the last (the model output) is a producer whose consumer is the next
    names = _conv_linear_names(torchvision.models.vgg16(weights=None))
    assert len(names) == 16 and len(plan.units) == len(names) - 1 == 15
    assert [u.producer for u in plan.units] == names[:-1]
    assert [u.consumer for u in plan.units] == names[1:]
    modes = [choose_mode(u.channels, u.taps) for u in plan.units]
    assert modes == ["full"] * 12 + ["direct", "full", "full"]
    assert (plan.units[12].channels, plan.units[12].taps) == (512, 49)

    prof = profile(model, EXAMPLE)
    tr = R.trace_forward(model, [u.consumer for u in plan.units])
    assert tr.flops_per_image() == prof.flops == 30_940_528_640
    by_name = [lc.name for lc in prof.layers]
    for u in plan.units:
        j = by_name.index(u.consumer)
        # the forward stopped at the consumer runs exactly the layers before it
        assert tr.flops_per_image(tr.consumer_at[u.consumer]) == sum(lc.flops for lc in prof.layers[:j])
        if u.consumer_kind == "conv":
            assert R.consumer_out_hw(u) == prof.layers[j].out_shape[2:]


def test_resnet50_units_geometry_and_flops():
    import torchvision
    from torchvision.models.resnet import Bottleneck

    model = R.build_model("resnet50")
    plan = find_units(model, EXAMPLE)
    blocks = [n for n, m in torchvision.models.resnet50(weights=None).named_modules() if isinstance(m, Bottleneck)]
    # conv1 -> conv2 and conv2 -> conv3 of each bottleneck; conv3/downsample feed residual adds
    assert len(blocks) == 16 and len(plan.units) == 2 * len(blocks) == 32
    assert {u.producer for u in plan.units} == {f"{b}.conv{i}" for b in blocks for i in (1, 2)}
    prof = profile(model, EXAMPLE)
    outs = {lc.name: lc.out_shape for lc in prof.layers}
    for u in plan.units:  # includes the stride-2 conv2 consumers
        assert R.consumer_out_hw(u) == outs[u.consumer][2:]
    assert R.trace_forward(model).flops_per_image() == prof.flops == 8_178_368_512


def test_analyse_vgg16_schedules_add_up():
    s = R.Sampling()
    res = R.analyse("vgg16", s, keep=0.5)
    json.dumps(res)  # all plain data
    T, units = res["totals"], res["units"]
    prof = profile(R.build_model("vgg16"), EXAMPLE)
    per_layer = {lc.name: lc.flops for lc in prof.layers}
    names = list(per_layer)
    prefix = lambda c: sum(per_layer[n] for n in names[: names.index(c)])  # noqa: E731
    seq = sum(s.images * prefix(u["consumer"]) for u in units)
    assert T["forward_sequential_unpruned"]["flops"] == seq
    # one-shot stops at the last consumer (fc8): everything but fc8
    assert T["forward_oneshot"]["flops"] == s.images * (prof.flops - per_layer["classifier.6"])
    assert T["forward_oneshot"]["flops"] < T["forward_sequential_pruned"]["flops"] < seq
    fc6 = units[12]
    C, t, K, N = 512, 49, 4096, s.images
    assert fc6["mode"] == "direct"
    assert fc6["statistics"]["flops"] == 2 * K * C * t * N + 2 * K * C * C * N + C * t * N + N * C * t
    for d in (R.H100.name, R.M40.name):
        for k in ("fp32", "tc"):
            parts = T["total_oneshot"]["parts"]
            assert T["total_oneshot"]["floor_s"][d][k] == pytest.approx(sum(T[p]["floor_s"][d][k] for p in parts))
    # replay runs each segment once, on the partly pruned model: below re-running from the images
    assert T["forward_replay"]["flops"] < T["forward_sequential_pruned"]["flops"]
    assert T["total_sequential_replay"]["floor_s"][R.M40.name]["fp32"] < T["total_sequential"]["floor_s"][R.M40.name]["fp32"]
    assert [p["consumer"] for p in res["replay"]] == [u["consumer"] for u in units]
    m40 = T["total_sequential"]["floor_s"][R.M40.name]["fp32"]
    assert T["total_oneshot"]["floor_s"][R.M40.name]["fp32"] < m40
    # the M40 floor can't beat its fp32 peak on the forward flops
    assert m40 > T["forward_sequential_pruned"]["flops"] / R.M40.fp32


def test_main_prints_and_writes_json(tmp_path, capsys):
    out = tmp_path / "roof.json"
    R.main(["--models", "vgg16", "--json", str(out)])
    text = capsys.readouterr().out
    assert "TOTAL one-shot" in text and "nothing was timed on a GPU" in text
    data = json.loads(out.read_text())
    assert data["results"][0]["model"] == "vgg16" and len(data["results"][0]["units"]) == 15
    assert math.isclose(data["step_latency_s"], R.STEP_LATENCY)


def test_replay_passes_tiny_chain_by_hand():
    """Replay on a 3-conv chain: unit 1 runs conv0 from the images, unit 2 only conv2 on
    the cached, pruned relu output; past the memory budget it starts from the images."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
                              nn.Conv2d(6, 2, 3, padding=1)).eval()
    units = list(find_units(model, torch.empty(1, 3, 8, 8, device="meta")).units)
    assert [(u.producer, u.consumer) for u in units] == [("0", "2"), ("2", "4")]
    s = R.Sampling(images=10, batch=5, image_shape=(3, 8, 8))
    hw = 64
    passes = R.replay_passes(model, units, s, keep=0.5, memory_bytes=1e12)
    flops = [sum(c.total_flops for c in p["_costs"]) for p in passes]
    print(passes, flops)
    assert passes[0]["start"] == "input" and passes[0]["upload_bytes"] == s.input_bytes
    assert flops[0] == 10 * 2 * 4 * 3 * 9 * hw                 # conv0 in full
    assert passes[0]["cache_bytes"] == 10 * 2 * hw * 4          # relu output, 2 of 4 channels kept
    assert passes[1]["start"] == passes[0]["cached"] and passes[1]["upload_bytes"] == passes[0]["cache_bytes"]
    assert flops[1] == 10 * 2 * 6 * 2 * 9 * hw                 # conv2 on the 2 kept input channels
    tight = R.replay_passes(model, units, s, keep=0.5, memory_bytes=10 * 2 * hw * 4 - 1)
    assert tight[0]["cached"] is None and tight[1]["start"] == "input"
    # from the images: the pruned conv0 (3 -> 2) and conv2 (2 -> 6)
    assert sum(c.total_flops for c in tight[1]["_costs"]) == 10 * (2 * 2 * 3 * 9 + 2 * 6 * 2 * 9) * hw
