"""Aspect-ratio buckets (method §5): the BitDance lists, generalisation to other bases, nearest choice."""

import math

import pytest

from bdt.data.buckets import check_buckets, make_buckets, nearest_bucket


def test_bitdance_lists_match_spec_counts_and_endpoints():
    one_mp = make_buckets(1024, 64)
    assert len(one_mp) == 11
    assert one_mp[0] == (2048, 512) and (1024, 1024) in one_mp and one_mp[-1] == (512, 2048)
    assert all(abs(w * h / 1024**2 - 1) < 0.1 for w, h in one_mp)  # "near 1 MP"
    quarter = make_buckets(512, 32)
    assert len(quarter) == 7
    assert quarter[0] == (1024, 256) and (512, 512) in quarter and quarter[-1] == (256, 1024)
    assert all(abs(w * h / 512**2 - 1) < 0.1 for w, h in quarter)


@pytest.mark.parametrize("base,multiple", [(256, 16), (256, 64), (128, 8), (768, 48), (2048, 64)])
def test_generalised_buckets_are_multiples_near_the_base_area(base, multiple):
    buckets = make_buckets(base, multiple)
    assert len(set(buckets)) == len(buckets)
    for w, h in buckets:
        assert w % multiple == 0 and h % multiple == 0
        assert 0.6 < w * h / base**2 < 1.4
    assert (base, base) in buckets
    assert {(h, w) for w, h in buckets} == set(buckets)  # wide and tall are symmetric


def test_nearest_bucket_by_log_aspect():
    buckets = make_buckets(1024, 64)
    assert nearest_bucket(4000, 1000, buckets) == (2048, 512)
    assert nearest_bucket(1000, 4000, buckets) == (512, 2048)
    assert nearest_bucket(777, 777, buckets) == (1024, 1024)
    assert nearest_bucket(20000, 10, buckets) == (2048, 512)  # beyond the widest: clamps
    for w, h in [(1920, 1080), (640, 480), (480, 640), (3000, 1000)]:
        best = nearest_bucket(w, h, buckets)
        err = abs(math.log(best[0] / best[1]) - math.log(w / h))
        assert all(err <= abs(math.log(bw / bh) - math.log(w / h)) + 1e-12 for bw, bh in buckets)


def test_invalid_lists_name_the_problem():
    with pytest.raises(ValueError, match="multiples of 16"):
        check_buckets([[256, 250]], 16)
    with pytest.raises(ValueError, match="twice"):
        check_buckets([[256, 256], [256, 256]], 16)
    with pytest.raises(ValueError, match="not a multiple"):
        make_buckets(250, 16)
    with pytest.raises(ValueError, match="unknown preset"):
        make_buckets(256, 16, "nope")
    assert check_buckets([[32, 16], [16, 16]], 16) == [(32, 16), (16, 16)]
