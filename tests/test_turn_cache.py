"""A model worker's cache of its episodes' last turns (orchestrator/episode_loop.py, ``_TurnCache``): bounded by an
estimate of its bytes, each turn given back once, for its own step and reply."""

from orchestrator.episode_loop import _TurnCache

MESSAGES = [{"role": "system", "content": "x" * 100}, {"role": "user", "content": "y" * 100}]


def test_a_turn_comes_back_once_as_it_was_generated_and_only_for_its_step_and_reply():
    cache = _TurnCache(max_bytes=10_000)
    cache.remember((1, 1), 0, MESSAGES, "reply", [5, 6, 2**31 - 1])
    previous = cache.get((1, 1), 0, "reply")
    assert (previous.messages, previous.reply, previous.ids) == (MESSAGES, "reply", [5, 6, 2**31 - 1])
    assert cache.get((1, 1), 0, "reply") is None, "taken once"
    cache.remember((1, 1), 0, MESSAGES, "reply", [5])
    assert cache.get((1, 1), 1, "reply") is None, "another step"
    cache.remember((1, 1), 0, MESSAGES, "reply", [5])
    assert cache.get((1, 1), 0, "another delivery's reply") is None
    assert cache.bytes == 0 and not cache.entries


def test_the_oldest_turns_go_once_the_cache_holds_its_bytes():
    one = _TurnCache.ID_BYTES * 1000 + len("reply") + 200  # 1,000 ids, the reply, the messages' text
    cache = _TurnCache(max_bytes=3 * one)
    for episode in range(5):
        cache.remember((episode, 1), 0, MESSAGES, "reply", list(range(1000)))
    assert list(cache.entries) == [(2, 1), (3, 1), (4, 1)] and cache.bytes == 3 * one
    cache.remember((3, 1), 1, MESSAGES, "reply", list(range(1000)))  # its next turn replaces its last
    assert list(cache.entries) == [(2, 1), (4, 1), (3, 1)] and cache.bytes == 3 * one
    assert cache.get((2, 1), 0, "reply").ids == list(range(1000)) and cache.bytes == 2 * one
