from model.lru import LRU

MISSING = object()


def test_the_least_recently_used_entry_goes_first():
    store = LRU(2)
    store.put("a", 1)
    store.put("b", 2)
    assert store.get("a") == 1  # "a" is now more recent than "b"
    store.put("c", 3)
    assert len(store) == 2 and store.get("b", MISSING) is MISSING
    assert (store.get("a"), store.get("c")) == (1, 3)
    store.put("a", 4)  # a new value for a stored key replaces it and refreshes it
    store.put("d", 5)
    assert store.get("c", MISSING) is MISSING and (store.get("a"), store.get("d")) == (4, 5)


def test_zero_keeps_nothing_and_a_smaller_bound_applies_at_the_next_put():
    empty = LRU(0)
    empty.put("a", 1)
    assert len(empty) == 0 and empty.get("a") is None
    store = LRU(3)
    for key in "abc":
        store.put(key, key)
    store.max_items = 1
    assert len(store) == 3
    store.put("d", "d")
    assert len(store) == 1 and store.get("d") == "d"
    store.clear()
    assert len(store) == 0
