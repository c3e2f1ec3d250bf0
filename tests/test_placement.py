"""Weighted rendezvous placement: stability, balance and minimal movement."""

import collections

import pytest

from shardfs.stores.placement import Placement, member_score, unit_from_hash, unit_hash

KEYS = [f"{index:032x}" for index in range(20_000)]
IDS = ["s3://rack-a", "s3://rack-b", "s3://rack-c", "/srv/store-d", "s3://rack-e"]


def test_unit_hash_is_fixed():
    # Fixed values: placement must not change across versions or hosts,
    # or every host would look for chunks in new places after an upgrade.
    assert unit_hash("s3://rack-a", "0" * 32) == 0.6616998593333628
    assert unit_hash("s3://rack-b", "0" * 32) == 0.9066529030704437


def test_unit_hash_open_interval():
    values = [unit_hash(member, key) for member in IDS for key in KEYS[:2000]]
    assert min(values) > 0
    assert max(values) < 1


def test_unit_from_hash_extremes():
    assert unit_from_hash(0) > 0
    assert unit_from_hash((1 << 64) - 1) < 1


def test_rank_is_deterministic_and_complete():
    placement = Placement(IDS, [1.0] * len(IDS), 2)
    again = Placement(list(IDS), [1.0] * len(IDS), 2)
    for key in KEYS[:1000]:
        ranked = placement.rank(key)
        assert ranked == again.rank(key)
        assert sorted(ranked) == list(range(len(IDS)))
        assert placement.place(key) == ranked[:2]


def test_rank_ignores_member_order():
    forward = Placement(IDS, [1, 2, 1, 3, 1], 3)
    backward = Placement(IDS[::-1], [1, 3, 1, 2, 1], 3)
    for key in KEYS[:1000]:
        by_forward = [IDS[index] for index in forward.place(key)]
        by_backward = [IDS[::-1][index] for index in backward.place(key)]
        assert by_forward == by_backward


def test_rank_matches_scores():
    weights = [1, 2, 1, 3, 1]
    placement = Placement(IDS, weights, 2)
    for key in KEYS[:200]:
        scores = [member_score(IDS[index], weights[index], key) for index in placement.rank(key)]
        assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("weights", [[1, 1, 1, 1, 1], [1, 2, 1, 3, 1], [10, 1, 1, 1, 1]])
def test_first_choice_follows_weights(weights):
    placement = Placement(IDS, weights, 2)
    firsts = collections.Counter(placement.rank(key)[0] for key in KEYS)
    for index, weight in enumerate(weights):
        expected = weight / sum(weights)
        share = firsts[index] / len(KEYS)
        # 20,000 keys give a standard error of at most 0.0036 for any share.
        assert share == pytest.approx(expected, abs=0.015), (index, share, expected)


def test_copies_balance_at_equal_weights():
    placement = Placement(IDS, [1.0] * len(IDS), 2)
    copies = collections.Counter(index for key in KEYS for index in placement.place(key))
    for index in range(len(IDS)):
        share = copies[index] / (2 * len(KEYS))
        assert share == pytest.approx(1 / len(IDS), abs=0.015), (index, share)


def test_copies_grow_with_weight():
    weights = [1, 2, 1, 3, 1]
    placement = Placement(IDS, weights, 2)
    copies = collections.Counter(index for key in KEYS for index in placement.place(key))
    # A member keeps at most one copy of a chunk, so a heavy member's
    # share of copies grows with its weight but less than in proportion.
    assert copies[3] > copies[1] > copies[0]
    assert copies[3] < 3 * copies[0]


def test_adding_member_only_inserts_it():
    old = Placement(IDS[:4], [1.0] * 4, 2)
    new = Placement(IDS, [1.0] * 5, 2)
    moved = 0
    for key in KEYS:
        before = [IDS[index] for index in old.rank(key)]
        after = [IDS[index] for index in new.rank(key)]
        # The old members keep their relative order for every key.
        assert [member for member in after if member != IDS[4]] == before
        if set(after[:2]) != set(before[:2]):
            moved += 1
            assert IDS[4] in after[:2]
    # The new member enters the top two of a key with chance 2/5.
    assert moved / len(KEYS) == pytest.approx(2 / 5, abs=0.015)


def test_removing_member_moves_only_its_keys():
    old = Placement(IDS, [1.0] * 5, 2)
    new = Placement(IDS[:4], [1.0] * 4, 2)
    touched = 0
    for key in KEYS:
        before = [IDS[index] for index in old.place(key)]
        after = [IDS[index] for index in new.place(key)]
        if IDS[4] in before:
            touched += 1
            kept = [member for member in before if member != IDS[4]]
            assert after[: len(kept)] == kept
        else:
            assert after == before
    assert touched / len(KEYS) == pytest.approx(2 / 5, abs=0.015)


def test_weight_change_moves_few_keys():
    old = Placement(IDS, [1, 1, 1, 1, 1], 1)
    new = Placement(IDS, [1, 1, 1, 1, 2], 1)
    moved = [key for key in KEYS if old.place(key) != new.place(key)]
    # Every moved key moves to the member whose weight grew, and its
    # share goes from 1/5 to 2/6, so about 2/15 of the keys move.
    assert all(new.place(key) == [4] for key in moved)
    assert len(moved) / len(KEYS) == pytest.approx(2 / 15, abs=0.015)


def test_zero_weight_member_ranks_last():
    placement = Placement(IDS, [1, 1, 0, 1, 1], 2)
    for key in KEYS[:2000]:
        assert placement.rank(key)[-1] == 2


@pytest.mark.parametrize(
    "ids, weights, replicas, message",
    [
        (["a", "a"], [1, 1], 1, "distinct"),
        (["a", "b"], [1], 1, "one weight"),
        (["a", "b"], [1, -1], 1, "invalid weight"),
        (["a", "b"], [1, float("inf")], 1, "invalid weight"),
        (["a", "b"], [1, float("nan")], 1, "invalid weight"),
        (["a", "b"], [1, 1], 3, "at least 3"),
        (["a", "b"], [1, 0], 2, "at least 2"),
        (["a", "b"], [1, 1], 0, "expected at least 1"),
    ],
)
def test_invalid_placement_rejected(ids, weights, replicas, message):
    with pytest.raises(ValueError, match=message):
        Placement(ids, weights, replicas)


def test_long_member_id_accepted():
    long_id = "s3://" + "b" * 200
    placement = Placement([long_id, long_id + "x"], [1, 1], 1)
    assert sorted(placement.rank(KEYS[0])) == [0, 1]
