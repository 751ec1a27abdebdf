"""Stopping: eos ids, stop strings across tokens, prompt excluded, trimming, bounded decoding."""

import pytest

from moe_engine.errors import ConfigError
from moe_engine.runtime.stopping import StopChecker, normalize_eos, normalize_stop


def decode(ids):
    """Toy tokenizer: id i -> one letter."""
    return "".join(chr(97 + i % 26) for i in ids)


def ids_of(text):
    return [ord(char) - 97 for char in text]


def feed(checker, row, text):
    """Feed a text's tokens one by one; returns update()'s answers."""
    return [checker.update(row, token) for token in ids_of(text)]


# ---- eos ------------------------------------------------------------------------------------


def test_eos_int():
    checker = StopChecker(2, [], None, 1)
    assert checker.update(0, 5) is False
    assert checker.update(0, 2) is True
    assert checker.finished(0) and checker.reason(0) == "eos"


def test_eos_list():
    checker = StopChecker([2, 7], None, None, 2)
    assert checker.update(0, 7) is True
    assert checker.update(1, 3) is False
    assert checker.reason(0) == "eos" and checker.reason(1) is None and not checker.finished(1)


def test_updates_after_finish_are_ignored():
    checker = StopChecker(2, ["x"], decode, 1)
    checker.update(0, 2)
    assert checker.update(0, ids_of("x")[0]) is True
    assert checker.reason(0) == "eos"


@pytest.mark.parametrize("value, expected", [(None, set()), (3, {3}), ([1, 2, 2], {1, 2}), ((4,), {4})])
def test_normalize_eos(value, expected):
    assert normalize_eos(value) == expected


@pytest.mark.parametrize("value", ["2", 1.5, True, [1, "2"], [-1], {"a": 1}])
def test_normalize_eos_rejects(value):
    with pytest.raises(ConfigError, match="eos_token_id"):
        normalize_eos(value)


# ---- stop strings ---------------------------------------------------------------------------


def test_stop_string_spanning_two_tokens():
    checker = StopChecker(None, ["cd"], decode, 1)
    assert feed(checker, 0, "abcd") == [False, False, False, True]
    assert checker.reason(0) == "stop"


def test_partial_stop_string_does_not_stop():
    checker = StopChecker(None, ["cde"], decode, 1)
    assert feed(checker, 0, "abcdcdf") == [False] * 7
    assert checker.reason(0) is None


def test_stop_in_prompt_does_not_count():
    # The prompt "xab" would complete "bc" with the first generated token; only generated text counts.
    checker = StopChecker(None, ["bc", "xa"], decode, 1)
    assert feed(checker, 0, "cd") == [False, False]
    assert feed(checker, 0, "bc") == [False, True]


def test_rows_have_separate_buffers():
    checker = StopChecker(None, ["cd"], decode, 2)
    assert checker.update(0, ids_of("c")[0]) is False
    assert checker.update(1, ids_of("d")[0]) is False
    assert checker.update(0, ids_of("x")[0]) is False  # row 0 holds "cx", not "cdx"
    assert not checker.finished(1)
    assert feed(checker, 0, "cd") == [False, True]


def test_stop_strings_need_a_decoder():
    with pytest.raises(ConfigError, match="tokenizer"):
        StopChecker(None, ["cd"], None, 1)
    StopChecker(None, [], None, 1)  # eos-only is fine without one


def test_stop_after_tokens_that_decode_to_nothing():
    # id 99 is a "special" token that decode skips: the window must reach past all of them.
    def skipping_decode(ids):
        return decode([i for i in ids if i != 99])

    checker = StopChecker(None, ["ab"], skipping_decode, 1)
    assert checker.update(0, 0) is False
    assert [checker.update(0, 99) for _ in range(40)] == [False] * 40
    assert checker.update(0, 1) is True


def test_stop_completed_by_a_long_token_after_empty_ones():
    # "a", five tokens that decode to nothing, then "bzzzzzzzz": the tail window must reach the "a"
    # even though the last token alone is longer than the stop string.
    texts = {0: "a", 1: "", 2: "bzzzzzzzz"}
    checker = StopChecker(None, ["ab"], lambda ids: "".join(texts[i] for i in ids), 1)
    assert [checker.update(0, token) for token in [0, 1, 1, 1, 1, 1]] == [False] * 6
    assert checker.update(0, 2) is True


def test_stop_inside_a_long_token():
    words = ["hello ", "this is the weekend", "!"]
    checker = StopChecker(None, ["end"], lambda ids: "".join(words[i] for i in ids), 1)
    assert checker.update(0, 0) is False
    assert checker.update(0, 1) is True


def test_decodes_only_a_tail_window():
    lengths = []

    def counting_decode(ids):
        lengths.append(len(ids))
        return decode(ids)

    checker = StopChecker(None, ["zzz"], counting_decode, 1)
    assert feed(checker, 0, "ab" * 500) == [False] * 1000
    assert max(lengths) <= 2 * (3 + 4)  # longest stop string plus a small margin, never the whole 1000
    assert feed(checker, 0, "zzz")[-1] is True


@pytest.mark.parametrize("value, expected", [(None, []), ("ab", ["ab"]), (["a", "bc"], ["a", "bc"]), (("x",), ["x"])])
def test_normalize_stop(value, expected):
    assert normalize_stop(value) == expected


@pytest.mark.parametrize("value", ["", ["a", ""], [1], 5])
def test_normalize_stop_rejects(value):
    with pytest.raises(ConfigError, match="stop"):
        normalize_stop(value)


# ---- trim -----------------------------------------------------------------------------------


def test_trim_cuts_before_first_stop_string():
    checker = StopChecker(None, ["ef", "cd"], decode, 1)
    feed(checker, 0, "abcd")
    assert checker.trim(0, "abcdef") == "ab"


def test_trim_leaves_eos_and_running_rows_alone():
    checker = StopChecker([25], ["cd"], decode, 2)
    checker.update(0, 25)
    assert checker.trim(0, "abcd") == "abcd"
    assert checker.trim(1, "abcd") == "abcd"
