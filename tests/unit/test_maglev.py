# SPDX-License-Identifier: Apache-2.0
import collections

import pytest

from xdplb import maglev

SIZE = 65537


def names(n):
    return [f"10.0.{i // 250}.{i % 250 + 1}:80" for i in range(n)]


@pytest.mark.parametrize("n", [1, 2, 3, 10, 100])
def test_every_slot_filled_and_shares_even(n):
    table = maglev.populate([(name, 1) for name in names(n)], SIZE, seed=1)
    counts = collections.Counter(table)
    assert set(counts) == set(range(n))
    assert max(counts.values()) - min(counts.values()) <= 1


def test_removing_one_backend_moves_only_its_share_and_a_little_more():
    before = maglev.populate([(name, 1) for name in names(10)], SIZE, seed=1)
    after_names = names(10)[:3] + names(10)[4:]
    after = maglev.populate([(name, 1) for name in after_names], SIZE, seed=1)
    old = [names(10)[i] for i in before]
    new = [after_names[i] for i in after]
    moved = sum(1 for a, b in zip(old, new) if a != b)
    own_share = sum(1 for a in old if a == names(10)[3])
    assert own_share <= moved
    # Maglev moves a bit more than the removed share; the paper's bound is small.
    assert moved - own_share < SIZE * 0.05


def test_adding_a_backend_moves_about_one_in_n():
    before = [names(11)[i] for i in maglev.populate([(n, 1) for n in names(10)], SIZE, seed=1)]
    after = [names(11)[i] for i in maglev.populate([(n, 1) for n in names(11)], SIZE, seed=1)]
    moved = sum(1 for a, b in zip(before, after) if a != b)
    assert moved < SIZE / 11 * 1.15


def test_weights_set_shares_and_zero_means_none():
    table = maglev.populate([("a:80", 3), ("b:80", 1), ("c:80", 0)], SIZE, seed=7)
    counts = collections.Counter(table)
    assert 2 not in counts
    assert abs(counts[0] / SIZE - 0.75) < 0.01
    assert abs(counts[1] / SIZE - 0.25) < 0.01


def test_no_weight_anywhere_leaves_the_table_empty():
    assert set(maglev.populate([("a:80", 0)], 13, seed=1)) == {maglev.EMPTY}


def test_same_input_same_table_order_independent_of_node():
    a = maglev.populate([(n, 1) for n in names(5)], 251, seed=42)
    b = maglev.populate([(n, 1) for n in names(5)], 251, seed=42)
    assert a == b
    assert maglev.populate([(n, 1) for n in names(5)], 251, seed=43) != a


def test_size_must_be_prime():
    with pytest.raises(ValueError):
        maglev.populate([("a:80", 1)], 65536, seed=1)


# ---- the native fill (native/maglev.c) against the Python reference ----------------------

from hypothesis import given, settings, strategies as st  # noqa: E402

from xdplb import abi, build, layout  # noqa: E402

PRIMES = [2, 3, 7, 13, 101, 251, 1009, 4099, 65537]


def test_native_fill_is_built_and_loads():
    """`make build` builds it; without it every ring change would take the slow path,
    so in CI its absence is a failure, not a skip."""
    if not build.NATIVE_MAGLEV.exists():
        build.compile_native()
    assert maglev.native() is not None


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 12), min_size=0, max_size=40), st.sampled_from(PRIMES),
       st.integers(0, 2**32 - 1))
def test_native_fill_equals_the_reference_slot_for_slot(weights, size, seed):
    assert maglev.native() is not None
    backends = [(f"10.1.{i // 200}.{i % 200 + 1}:80", w) for i, w in enumerate(weights)]
    assert maglev.populate(backends, size, seed) == maglev.populate_reference(backends, size, seed)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=0, max_size=20), st.sampled_from(PRIMES), st.integers(0, 2**16))
def test_native_ring_slots_equal_packing_the_reference_table(weights, size, seed):
    """What ring_values writes into the map: the reference table, mapped to backend ids
    and packed four to a word (pack_ring), the padding NO_BACKEND, the rest zero."""
    backends = [(f"10.2.0.{i + 1}:80", w) for i, w in enumerate(weights)]
    ids = [100 + 7 * i for i in range(len(backends))]
    table = maglev.populate_reference(backends, size, seed)
    expect = layout.pack_ring([abi.NO_BACKEND if t == maglev.EMPTY else ids[t] for t in table])
    got = (layout.ctypes.c_uint64 * abi.RING_ENTRIES)()
    maglev.ring_slots(backends, ids, size, seed, abi.NO_BACKEND, got)
    assert list(got[:len(expect)]) == list(expect)
    assert not any(got[len(expect):])


def test_non_prime_sizes_are_refused_by_both():
    for fill in (maglev.populate, maglev.populate_reference):
        with pytest.raises(ValueError, match="not prime"):
            fill([("a:80", 1)], 15, seed=1)
