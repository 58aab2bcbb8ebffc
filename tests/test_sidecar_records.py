"""The sidecar's records are checked all at once (tarball._records_fast);
it must accept exactly what the record-by-record check accepts."""
from hypothesis import given, settings, strategies as st

from conda_stage.tarball import MAX_RECORDS, MAX_TEXT, MalformedSidecar, _record, _records_fast

_parts = st.sampled_from(["a", "b.py", ".", "..", "", "bin", "é", "\udcff", "\ud800", "x\0y",
                          " ", "lib", "/", "\n"])
_paths = st.lists(_parts, min_size=0, max_size=4).map("/".join) | st.text(max_size=8)
_values = (_paths | st.integers() | st.none() | st.booleans() | st.lists(st.integers(), max_size=2)
           | st.just("a" * (MAX_TEXT + 1)) | st.just("/" + "é" * 1500))
_placeholders = (st.lists(_parts, min_size=0, max_size=4).map(lambda p: "/" + "/".join(p))
                 | _values)
_modes = st.sampled_from(["text", "binary", "Text", "", None, 1]) | st.lists(st.none(), max_size=1)
_record_values = (st.tuples(_paths, _placeholders, _modes).map(list)
                  | st.lists(_values, max_size=4) | _values)


def _slow(records):
    try:
        return [_record(i, r) for i, r in enumerate(records)]
    except MalformedSidecar:
        return None


@settings(max_examples=3000, deadline=None)
@given(st.lists(_record_values, max_size=6))
def test_the_fast_check_accepts_exactly_what_the_slow_one_does(records):
    fast = _records_fast(records)
    slow = _slow(records)
    if fast is not None:  # fast says well-formed: the slow check agrees, same values
        assert slow == fast
    # the caller falls back to the slow check whenever fast says None, so
    # the only thing that matters is that fast never accepts more


def test_the_fast_check_takes_a_real_sidecars_records():
    records = [[f"lib/python3.11/site-packages/pkg{i}/mod.py", "/opt/conda/envs/x", "text"]
               for i in range(10_000)] + [["bin/python3.11", "/opt/conda/envs/x", "binary"]]
    assert _records_fast(records) == records


def test_the_fast_check_refuses_what_it_cannot_judge_alone():
    assert _records_fast([["a", "/p", "text"], ["../etc", "/p", "text"]]) is None
    assert _records_fast([["a", "/", "text"]]) is None
    assert _records_fast([["a", "/p", "text", "extra"]]) is None
    assert _records_fast([["a\0b", "/p", "text"]]) is None
    assert _records_fast([["a", "/p\ud800", "text"]]) is None


_good_parts = st.sampled_from(["a", "b.py", "bin", "é", "\udcff", " x", "lib", "\n", "..a", ".b"])
_good_paths = st.lists(_good_parts, min_size=1, max_size=4).map("/".join)
_good = st.tuples(_good_paths, _good_paths.map(lambda p: "/" + p.replace("\udcff", "z")),
                  st.sampled_from(["text", "binary"])).map(list)


@settings(max_examples=500, deadline=None)
@given(st.lists(_good, max_size=6))
def test_the_fast_check_accepts_well_formed_records(records):
    assert _records_fast(records) == _slow(records) == records


# ------------------------------------------------ the quick freshness record
import json  # noqa: E402

import pytest  # noqa: E402

from conda_stage import fingerprint as fp  # noqa: E402
from conda_stage.tarball import parse_meta  # noqa: E402

_BASE = {"format": "tar.zst", "archive": "e.tar.zst", "size": 1, "mtime_ns": 1,
         "prefix": "/p/e", "fingerprint": "0" * 32, "tool_version": "t", "created": "c",
         "pack_seconds": 1.0, "files": 1, "unpacked_bytes": 1, "records": [],
         "meta_version": 1}
_GOOD_QUICK = [[p, [1, 2, 3, 4]] for p in fp.QUICK_FIXED] + [
    ["lib/python3.11/site-packages", None]]


def _parse(**fields):
    return parse_meta(json.dumps({**_BASE, **fields}).encode())


def test_a_sidecar_with_or_without_a_quick_record_is_read():
    assert _parse().quick is None  # written by an earlier conda-stage
    assert _parse(quick=None).quick is None
    assert _parse(quick=_GOOD_QUICK).quick == _GOOD_QUICK
    assert _parse(quick=[]).quick == []  # valid, and never trusted (fp.unchanged)


@pytest.mark.parametrize("quick, reason", [
    ({"conda-meta": [1, 2, 3, 4]}, "quick must be a list"),
    ([["conda-meta", [1, 2, 3, 4]]] * (fp.MAX_QUICK + 1), "at most"),
    ([["conda-meta"]], "pair"),
    ([["conda-meta", [1, 2, 3, 4], "x"]], "pair"),
    (["conda-meta"], "pair"),
    ([[1, [1, 2, 3, 4]]], "must be a string"),
    ([["/etc/passwd", [1, 2, 3, 4]]], "clean relative path"),
    ([["../x/conda-meta", [1, 2, 3, 4]]], "clean relative path"),
    ([["conda-meta/../../x", [1, 2, 3, 4]]], "clean relative path"),
    ([["bin/python", [1, 2, 3, 4]]], "not an input"),
    ([["lib/x/site-packages", [1, 2, 3, 4]]], "not an input"),
    ([["lib/python3/../site-packages", [1, 2, 3, 4]]], "clean relative path"),
    ([["lib/python3.11/site-packages/x", [1, 2, 3, 4]]], "not an input"),
    ([["conda-meta", [1, 2, 3, 4]], ["conda-meta", None]], "twice"),
    ([["conda-meta", [1, 2, 3]]], "the stat must be"),
    ([["conda-meta", "1:2:3:4"]], "the stat must be"),
    ([["conda-meta", [1, 2, 3, -4]]], "out of range"),
    ([["conda-meta", [1, 2, 3, 1 << 63]]], "out of range"),
    ([["conda-meta", [1, 2, 3, True]]], "whole number"),
    ([["conda-meta", [1, 2, 3, 4.0]]], "whole number"),
    ([["conda-meta", [1, 2, 3, None]]], "whole number"),
    ([["conda\0meta", [1, 2, 3, 4]]], "NUL"),
])
def test_a_malformed_quick_record_makes_the_sidecar_malformed(quick, reason):
    with pytest.raises(MalformedSidecar, match=reason):
        _parse(quick=quick)


def test_a_quick_record_never_leads_outside_the_environment(tmp_path):
    """Every path a valid record names is one of the fingerprint's inputs,
    relative to the prefix: the check stats nothing else."""
    for rel, _ in _parse(quick=_GOOD_QUICK).quick:
        assert fp.is_quick_path(rel) and not rel.startswith("/") and ".." not in rel.split("/")


def test_the_largest_sidecar_still_fits_the_value_bound():
    """MAX_RECORDS records and a full quick record: within what parse_meta
    counts before parsing."""
    quick = [[p, [1 << 62] * 4] for p in fp.QUICK_FIXED] + [
        [f"lib/python3.{i}/site-packages", [1, 2, 3, 4]]
        for i in range(fp.MAX_QUICK - len(fp.QUICK_FIXED))]
    records = [[f"lib/f{i}", "/p/e", "text"] for i in range(MAX_RECORDS)]
    meta = _parse(quick=quick, records=records)
    assert len(meta.records) == MAX_RECORDS and meta.quick == quick
