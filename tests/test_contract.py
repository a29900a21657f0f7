"""Key scheme, value codec and input validation: pure functions, no Redis."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from embq.producer import InvalidInputError
from embq.producer.codec import pack, truncate, unpack, unpack_many
from embq.producer.keys import CUT_MARKER, text_digest, text_digests
from embq.producer.validation import validate_options, validate_texts


def test_digest_changes_with_every_part_and_keeps_the_exact_text() -> None:
    base = text_digest("m", "v1", "", "a b")
    variants = [
        text_digest("m2", "v1", "", "a b"),
        text_digest("m", "v2", "", "a b"),
        text_digest("m", "v1", "q: ", "a b"),
        text_digest("m", "v1", "", "a  b"),
        text_digest("m", "v1", "", "A b"),
        text_digest("m", "v1", "", " a b"),
        text_digest("m", "v1", "", "a b\n"),
    ]
    assert len({base, *variants}) == len(variants) + 1
    assert text_digest("m", "v1", "", "a b") == base


def test_digest_framing_is_unambiguous() -> None:
    assert text_digest("m", "v1", "ab", "c") != text_digest("m", "v1", "a", "bc")


def test_a_cut_texts_key_is_its_own_and_a_whole_texts_key_is_unchanged() -> None:
    """A call that asks for the cut keys its texts apart (``CUT_MARKER``); without it, the digest is the one
    caches hold from before calls could ask (pinned), so they stay valid."""
    model = "sentence-transformers/all-MiniLM-L6-v2"
    whole = text_digest(model, "v1", "", "a text")
    assert whole == "36319ec4bcb7905d419dec341d00591e90bdb49915b443bfad4d54dc8cbae39e"
    assert text_digest(model, "v1", "query: ", "a text") == (
        "65ffa0689a758dc1fb4a32808156b138817978e66b935208c50a0aabc3bb40f6"
    )
    cut = text_digest(model, "v1", "", "a text", truncate=True)
    assert cut not in (whole, text_digest(model, "v1", "", CUT_MARKER + "a text"))
    assert text_digests(model, "v1", "", ["a text", "b"], truncate=True)[0] == cut


def test_truncate_must_be_a_bool() -> None:
    with pytest.raises(InvalidInputError, match="truncate must be True or False, got 'yes'"):
        validate_options("", None, None, 100, "yes")


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v)).astype(np.float32)


def test_pack_roundtrip_float32_and_float16() -> None:
    v = unit(np.random.default_rng(0).standard_normal(384))
    np.testing.assert_array_equal(unpack(pack(v)), v)
    np.testing.assert_allclose(unpack(pack(v, "float16")), v, rtol=1e-3, atol=1e-3)
    assert len(pack(v, "float16")) < len(pack(v))


@pytest.mark.parametrize(
    "value",
    [
        None,
        b"",
        b"garbage",
        pack(unit(np.ones(8)))[:-1],
        pack(unit(np.ones(8))) + b"\0",
        pack(np.array([np.nan] * 4)),
        pack(np.zeros(8)),  # well-formed, but no model makes it
        pack(np.ones(8)),  # not a unit vector
        pack(np.full(8, 3e38)),  # its length overflows float32
    ],
)
def test_invalid_values_read_as_misses(value: bytes | None) -> None:
    assert unpack(value) is None


def test_values_of_another_dimension_than_the_models_are_misses() -> None:
    wide, narrow = pack(unit(np.ones(8))), pack(unit(np.ones(4)))
    assert unpack(narrow, dim=8) is None and unpack(narrow) is not None
    for values in ([narrow, narrow, narrow], [narrow, wide, None]):  # one layout (one decode), and a mix
        matrix, valid = unpack_many(values, dim=8)
        assert matrix.shape == (3, 8)
        assert valid.tolist() == [value == wide for value in values]


def test_unpack_many_rejects_a_minority_dimension() -> None:
    a, b = pack(unit(np.ones(8))), pack(unit(np.ones(4)))
    matrix, valid = unpack_many([a, b, a, None])
    assert valid.tolist() == [True, False, True, False]
    assert matrix.shape == (4, 8)


@given(st.lists(st.floats(min_value=-1e6, max_value=1e6, width=32), min_size=1, max_size=64))
def test_pack_unpack_fuzz(values: list[float]) -> None:
    raw = np.array(values, dtype=np.float64)
    assume(np.linalg.norm(raw) > 1e-6)
    v = unit(raw)
    np.testing.assert_array_equal(unpack(pack(v)), v)


def test_truncate_renormalises() -> None:
    m = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    t = truncate(m, 16)
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(t, m[:, :16] / np.linalg.norm(m[:, :16], axis=1, keepdims=True), rtol=1e-6)


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        (None, "NoneType"),
        (7, "int"),
        (b"bytes", "bytes"),
        ("\ud800", "lone surrogate"),
        ("x" * (64 << 20), "over the limit"),
    ],
)
def test_bad_item_is_named_by_index(bad: object, words: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        validate_texts(["fine", bad, "also fine"], max_bytes=1 << 20)
    assert info.value.index == 1
    assert info.value.problems.keys() == {1}
    assert "index 1" in str(info.value) and words in str(info.value)


def test_every_bad_item_is_listed() -> None:
    with pytest.raises(InvalidInputError) as info:
        validate_texts([None, "ok", 3, "ok", b"x"], max_bytes=100)
    assert sorted(info.value.problems) == [0, 2, 4]


@pytest.mark.parametrize("texts", ["a single string", b"bytes", 42])
def test_non_lists_are_refused(texts: object) -> None:
    with pytest.raises(InvalidInputError, match="list of str"):
        validate_texts(texts, max_bytes=100)


@pytest.mark.parametrize("texts", [{"a", "b"}, frozenset({"a"}), {"a": 1}])
def test_unordered_inputs_are_refused(texts: object) -> None:
    with pytest.raises(InvalidInputError, match="must be ordered"):
        validate_texts(texts, max_bytes=100)


def test_multibyte_text_counts_bytes() -> None:
    with pytest.raises(InvalidInputError, match="UTF-8 bytes"):
        validate_texts(["é" * 60], max_bytes=100)
    assert validate_texts(["é" * 50], max_bytes=100) == ["é" * 50]


@given(st.lists(st.one_of(st.text(), st.binary(), st.integers(), st.none()), max_size=20))
def test_validation_fuzz_accepts_exactly_the_valid_strings(items: list[object]) -> None:
    def ok(item: object) -> bool:
        if not isinstance(item, str):
            return False
        try:
            return len(item.encode("utf-8")) <= 64
        except UnicodeEncodeError:
            return False

    bad = {i for i, item in enumerate(items) if not ok(item)}
    if bad:
        with pytest.raises(InvalidInputError) as info:
            validate_texts(items, max_bytes=64)
        assert set(info.value.problems) == bad
    else:
        assert validate_texts(items, max_bytes=64) == items


@pytest.mark.parametrize(
    "options",
    [
        {"dim": 0},
        {"dim": -3},
        {"dim": 2.5},
        {"dim": True},
        {"timeout": 0},
        {"timeout": "5"},
        {"timeout": float("nan")},
        {"timeout": float("inf")},
        {"instruction": None},
    ],
)
def test_bad_options_are_refused(options: dict[str, object]) -> None:
    values = {"instruction": "", "dim": None, "timeout": None, **options}
    with pytest.raises(InvalidInputError):
        validate_options(values["instruction"], values["dim"], values["timeout"], max_bytes=100)
