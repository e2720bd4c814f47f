"""Hypothesis-fuzzed raw data: whatever the bytes, the readers either parse or raise the project's
own DataFormatError (which names the file and line), never anything else."""
import gzip
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from train.config import TableConfig
from train.data.formats import DataFormatError, read_abxi, read_table

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
COLS = TableConfig(user="u", item="i", timestamp="t", domain="d", rating="r")

# tokens near the valid grammar, plus arbitrary text
abxi_token = st.one_of(
    st.from_regex(r"[0-9]{1,4}\|-?[0-9]{1,12}", fullmatch=True),
    st.from_regex(r"[0-9]{0,3}[|:;, ]?[0-9a-z²٣.]{0,5}", fullmatch=True),
    st.text(max_size=8),
)
abxi_line = st.one_of(
    st.builds(lambda u, evs: " ".join([u, *evs]), st.from_regex(r"[0-9]{1,3}", fullmatch=True), st.lists(abxi_token, max_size=5)),
    st.text(max_size=40),
)


def _consume(it):
    try:
        for _ in it:
            pass
    except DataFormatError:
        pass


@FUZZ
@given(lines=st.lists(abxi_line, min_size=1, max_size=6), raw=st.binary(max_size=60))
def test_abxi_lines(tmp_path_factory, lines, raw):
    d = tmp_path_factory.mktemp("abxi")
    (d / "map_item_1.txt").write_text(json.dumps({f"a{k}": [k, k % 2] for k in range(1, 40)}))
    (d / "x_preprocessed.txt").write_bytes("\n".join(lines).encode("utf-8", "surrogatepass") + b"\n" + raw)
    _consume(read_abxi(d, 2))


cell = st.one_of(st.text(max_size=6), st.integers(), st.floats(allow_nan=True), st.none(), st.booleans(),
                 st.lists(st.integers(), max_size=2), st.sampled_from(["A", "B", "2024-01-02T03:04:05", "nan", "inf"]))


@FUZZ
@given(rows=st.lists(st.dictionaries(st.sampled_from(["u", "i", "t", "d", "r", "x"]), cell, max_size=6), max_size=5),
       junk=st.binary(max_size=40))
def test_json_lines(tmp_path_factory, rows, junk):
    p = tmp_path_factory.mktemp("jl") / "t.jsonl"
    p.write_bytes(b"".join(json.dumps(r, default=str).encode() + b"\n" for r in rows) + junk)
    _consume(read_table(p, COLS, ["A", "B"]))


@FUZZ
@given(text=st.text(max_size=200), header=st.booleans(), gz=st.booleans(), cut=st.integers(0, 30))
def test_csv_tables(tmp_path_factory, text, header, gz, cut):
    d = tmp_path_factory.mktemp("csv")
    body = ("u,i,t,d,r\n" if header else "") + text
    data = body.encode("utf-8", "surrogatepass")
    if gz:
        data = gzip.compress(data)
        data = data[:len(data) - cut]
        p = d / "t.csv.gz"
    else:
        p = d / "t.csv"
    p.write_bytes(data)
    _consume(read_table(p, COLS, ["A", "B"]))


def test_fuzz_reaches_the_error_paths(tmp_path):
    """The grammar above does produce both outcomes: a valid file parses, a bad one is named."""
    p = tmp_path / "t.csv"
    p.write_text("u,i,t,d,r\nx,y,5,A,1\n")
    assert [e.user for e in read_table(p, COLS, ["A", "B"])] == ["x"]
    p.write_bytes(b"u,i,t,d,r\nx,y,\xff,A,1\n")
    with pytest.raises(DataFormatError, match=r"t.csv:2: not UTF-8"):
        list(read_table(p, COLS, ["A", "B"]))
