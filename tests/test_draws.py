"""Keyed random draws (thinet_fast.ops.draws): independent of batching, order and
device placement; uniform enough for sampling."""
import torch

from thinet_fast.ops.draws import image_keys, keyed, keyed_locations, position_keys


def test_keys_do_not_depend_on_batching_or_order():
    x = torch.randn(40, 3, 9, 9, generator=torch.Generator().manual_seed(0))
    k = image_keys(x)
    assert torch.equal(torch.cat([image_keys(x[:7]), image_keys(x[7:31]), image_keys(x[31:])]), k)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(1))
    assert torch.equal(image_keys(x[perm]), k[perm])
    assert k.unique().numel() == 40  # distinct images, distinct keys
    assert torch.equal(image_keys(x.to(torch.float64)), k)  # exact values, whatever the dtype holds
    assert torch.equal(image_keys(x.contiguous(memory_format=torch.channels_last)), k)
    y = x.clone()
    y[3, 0, 0, 0] += 1.0  # a sampled value changes: the key changes
    assert (image_keys(y) != k).sum() == 1


def test_draws_are_in_range_and_roughly_uniform():
    keys = position_keys(torch.arange(2000))
    d = keyed(keys, 7, "location", 10)
    assert d.min() >= 0 and d.max() < 2 ** 31
    counts = torch.bincount((d % 50).reshape(-1), minlength=50).double()
    chi2 = float(((counts - 400) ** 2 / 400).sum())  # 49 degrees of freedom
    print("chi-square", chi2)
    assert chi2 < 100
    other = keyed(keys, 8, "location", 10)
    assert (other == d).double().mean() < 0.01  # another seed, other draws
    assert not torch.equal(keyed(keys, 7, "output", 10), d)  # streams are independent


def test_locations_repeat_for_the_same_keys():
    keys = image_keys(torch.randn(5, 2, 4, 4))
    a = keyed_locations(keys, 0, (6, 7), 3)
    b = keyed_locations(keys[2:], 0, (6, 7), 3)
    assert torch.equal(a[1].reshape(5, 3)[2:], b[1].reshape(3, 3)) and torch.equal(a[2].reshape(5, 3)[2:], b[2].reshape(3, 3))
    assert int(a[1].max()) < 6 and int(a[2].max()) < 7
    img, oy, ox = keyed_locations(keys, 0, (2, 3), None)
    assert img.tolist() == [i for i in range(5) for _ in range(6)] and oy.tolist()[:6] == [0, 0, 0, 1, 1, 1]
