"""TopicSet: the set of topics the streamer and the drivers keep, as a dict's keys."""

from __future__ import annotations

import sys

from hypothesis import given
from hypothesis import strategies as st

from gochan.topicset import TopicSet

names = st.text(min_size=1, max_size=8)


@given(st.lists(st.tuples(st.booleans(), names), max_size=60))
def test_it_holds_what_a_set_would(operations: list[tuple[bool, str]]) -> None:
    topics, model = TopicSet(), set()
    for adding, name in operations:
        if adding:
            topics.add(name)
            model.add(name)
        else:
            topics.discard(name)
            model.discard(name)
        assert set(topics) == model and len(topics) == len(model)
    for name in {name for _, name in operations}:
        assert (name in topics) == (name in model)
    assert topics.issuperset(model) and topics.issuperset([])
    assert topics.issuperset([*model, "absent"]) == ("absent" in model)
    assert frozenset(topics) == frozenset(model) and sorted(topics) == sorted(model)


def test_adding_a_topic_again_keeps_one() -> None:
    topics = TopicSet(["a", "b", "a"])
    topics.add("a")
    assert list(topics) == ["a", "b"]
    topics.clear()
    assert not topics


def test_it_is_smaller_than_a_set_grown_the_same_way() -> None:
    # Why it exists (a topic per user: every held topic is in two of these).
    # At 20,000 names a set grown by add holds ~105 B per name, this ~21 B.
    topics, plain = TopicSet(), set()
    for i in range(20_000):
        topics.add(f"user.{i}")
        plain.add(f"user.{i}")
    assert sys.getsizeof(topics) * 2 < sys.getsizeof(plain)
