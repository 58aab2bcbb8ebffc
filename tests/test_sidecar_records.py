"""The sidecar's records are checked all at once (tarball._records_fast);
it must accept exactly what the record-by-record check accepts."""
from hypothesis import given, settings, strategies as st

from conda_stage.tarball import MAX_TEXT, MalformedSidecar, _record, _records_fast

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
