"""Label matching and resource specifications: scenarios a1-a9."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.core.events import Resource
from daemon.core.matching import ResourceSpecification, compile_pattern, compiled_matches, matches


def resource(**labels: str) -> Resource:
    return Resource({"prefect.resource.id": "the-thing", **labels})


def spec(root: dict[str, str | list[str]]) -> ResourceSpecification:
    return ResourceSpecification(root)


@pytest.mark.parametrize(
    ("expected", "value"),
    [
        ("*", "any.old.thing"),
        ("*.csv", "file.csv"),
        ("!*.csv", "file.parquet"),
        ("s3://*.csv", "s3://bucket/object.csv"),
        ("s3://*", "s3://bucket/file.csv"),
        ("!s3://*", "http://example.com"),
        ("exactamundo", "exactamundo"),
    ],
)
def test_a1_matches_positives(expected: str, value: str) -> None:
    assert matches(expected, value)


@pytest.mark.parametrize(
    ("expected", "value"),
    [
        ("*", None),
        ("*.csv", "file.parquet"),
        ("!*.csv", "file.csv"),
        ("s3://*.csv", "https://host/file.csv"),
        ("s3://*", "https://host/file.csv"),
        ("!s3://*", "s3://bucket/file.csv"),
        ("exactamundo", "positively not"),
    ],
)
def test_a2_matches_negatives(expected: str, value: str | None) -> None:
    assert not matches(expected, value)


def test_a2_absent_value_never_matches_a_negation() -> None:
    assert not matches("!anything", None)


def test_a1_matching_is_case_sensitive_and_full_string() -> None:
    assert not matches("File.csv", "file.csv")
    assert not matches("file", "file.csv")
    assert matches("f?le.[ct]sv", "file.csv")


def test_a3_exact_label_spec() -> None:
    exact = spec({"a-label": "a-value"})
    assert exact.matches(resource(**{"a-label": "a-value"}))
    assert exact.matches(resource(**{"a-label": "a-value", "another": "label"}))
    assert not exact.matches(resource())
    assert not exact.matches(resource(**{"a-label": "another-value"}))
    assert not exact.matches(resource(**{"a-label": ""}))


@pytest.mark.parametrize(
    "value",
    ["a-value", "a-val", "a-valerie", "a-val kilmer", "a-valiant-effort", "a-val.iant-effort"],
)
def test_a4_wildcard_label_spec_matches(value: str) -> None:
    assert spec({"a-label": "a-val*"}).matches(resource(**{"a-label": value}))


@pytest.mark.parametrize("value", [None, "another-value", "", "a-vanquishment", "a-va"])
def test_a4_wildcard_label_spec_does_not_match(value: str | None) -> None:
    labels = {} if value is None else {"a-label": value}
    assert not spec({"a-label": "a-val*"}).matches(resource(**labels))


@pytest.mark.parametrize(
    ("value", "included"),
    [("yes", True), ("woohoo!", True), ("!nah", True), ("nah, chief", True), ("nah", False)],
)
def test_a5_single_negation(value: str, included: bool) -> None:
    negative = spec({"only-a-negative": ["!nah"]})
    assert negative.includes([resource(**{"only-a-negative": value})]) is included


def test_a5_negation_excludes_resource_without_the_label() -> None:
    assert not spec({"only-a-negative": ["!nah"]}).includes([resource()])


@pytest.mark.parametrize(
    ("value", "included"),
    [
        ("yes", True),
        ("woohoo!", True),
        ("!nah", True),
        ("is it? nah", True),
        ("nah", False),
        ("nah, chief", False),
        ("nah, pal", False),
        (None, False),
    ],
)
def test_a6_negated_wildcard(value: str | None, included: bool) -> None:
    labels = {} if value is None else {"only-a-negative": value}
    assert spec({"only-a-negative": ["!nah*"]}).includes([resource(**labels)]) is included


MIXED = {
    "some-label": ["this-value", "!that-value", "other-value"],
    "another-label": ["yes", "!no", "maybe"],
    "only-a-negative": ["!nah"],
}


@pytest.mark.parametrize(
    "labels",
    [
        {"some-label": "this-value", "another-label": "yes", "only-a-negative": "yes"},
        {"some-label": "other-value", "another-label": "maybe", "only-a-negative": "woohoo!"},
        {
            "some-label": "this-value",
            "another-label": "yes",
            "only-a-negative": "!nah",
            "totally-other": "no",
        },
    ],
)
def test_a7_mixed_spec_includes(labels: dict[str, str]) -> None:
    assert spec(dict(MIXED)).includes([resource(**labels)])


@pytest.mark.parametrize(
    "labels",
    [
        {"some-label": "that-value", "another-label": "yes", "only-a-negative": "yes"},
        {"some-label": "that-value", "another-label": "maybe", "only-a-negative": "yes"},
        {"some-label": "this-value", "another-label": "yes", "only-a-negative": "nah"},
        {"some-label": "that-value", "another-label": "no", "only-a-negative": "nah"},
    ],
)
def test_a7_mixed_spec_excludes(labels: dict[str, str]) -> None:
    assert not spec(dict(MIXED)).includes([resource(**labels)])


def test_a7_or_of_negations_accepts_every_present_value() -> None:
    both = spec({"x": ["!a", "!b"]})
    assert both.matches(resource(x="a"))
    assert both.matches(resource(x="b"))
    assert not both.matches(resource())


def test_a7_empty_candidate_list_never_matches() -> None:
    assert not spec({"x": []}).matches(resource(x="anything"))
    assert spec({"x": ""}).matches(resource(x=""))
    assert not spec({"x": ""}).matches(resource(x="y"))


def test_a8_empty_spec_matches_everything() -> None:
    empty = spec({})
    assert empty.matches_every_resource()
    assert empty.matches(resource())
    assert empty.includes([])
    assert empty.includes([resource(anything="at all")])
    assert empty.matches_every_resource_of_kind("any.kind")
    assert empty.matches_every_resource_of_kind("prefect.flow-run")


def test_a8_spec_of_a_kind() -> None:
    kind = spec({"prefect.resource.id": "any.old.*"})
    assert not kind.matches_every_resource()
    assert kind.matches_every_resource_of_kind("any.old")
    assert not kind.matches_every_resource_of_kind("nope.not.this")
    listed = spec({"prefect.resource.id": ["x.*", "any.old.*"]})
    assert listed.matches_every_resource_of_kind("any.old")
    more = spec({"prefect.resource.id": "any.old.*", "other": "label"})
    assert not more.matches_every_resource_of_kind("any.old")


def test_a8_non_empty_spec_includes_nothing_from_no_candidates() -> None:
    assert not spec({"a": "b"}).includes([])


def test_a9_dict_like_access() -> None:
    weird = spec(
        {
            "prefect.resource.id": "any.old.*",
            "but-also": ["another-thing", "or-this"],
            "": ["is kinda weird"],
            "also": "kinda weird",
            "empty": "",
        }
    )
    assert weird["prefect.resource.id"] == ["any.old.*"]
    assert weird["but-also"] == ["another-thing", "or-this"]
    assert weird[""] == ["is kinda weird"]
    assert weird["also"] == ["kinda weird"]
    assert weird["empty"] == []
    assert weird.get("not-here") == []
    assert weird.get("also") == ["kinda weird"]
    assert "empty" in weird
    assert "not-here" not in weird
    assert len(weird) == 5
    with pytest.raises(KeyError):
        weird["not-here"]
    # items() keeps a scalar "" as a candidate so that it still matches only "".
    assert ("empty", [""]) in weird.items()


def test_spec_copies_rederive_their_candidates() -> None:
    original = spec({"a": "b"})
    copied = original.model_copy(update={"root": {"a": "c"}})
    assert copied.matches(resource(a="c"))
    assert not copied.matches(resource(a="b"))
    assert copied.items() == [("a", ["c"])]


def test_spec_round_trips_through_json() -> None:
    original = spec({"a": "b", "c": ["d", "!e"]})
    assert original.model_dump_json() == '{"a":"b","c":["d","!e"]}'
    again = ResourceSpecification.model_validate_json(original.model_dump_json())
    assert again == original
    assert again.matches(resource(a="b", c="d"))


labels = st.text(alphabet="abc.-*!?", min_size=0, max_size=6)


@settings(deadline=None)  # timing varies under a loaded CI machine
@given(pattern=labels, value=labels)
def test_negation_inverts_a_present_value(pattern: str, value: str) -> None:
    if pattern.startswith("!"):
        return
    assert matches("!" + pattern, value) is not matches(pattern, value)


globs = st.text(alphabet="ab.-*!?[]^\\", min_size=0, max_size=7)


@settings(deadline=None)
@given(patterns=st.lists(globs, min_size=1, max_size=3), value=st.none() | globs)
def test_compiled_patterns_agree_with_matches(patterns: list[str], value: str | None) -> None:
    """The models test compiled patterns; they must say what `matches` says, bracket
    expressions, escapes and negation included."""
    compiled = [compile_pattern(p) for p in patterns]
    assert compiled_matches(compiled, value) is any(matches(p, value) for p in patterns)
