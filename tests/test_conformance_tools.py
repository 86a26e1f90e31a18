"""tools/conformance/results.py, the reader of the Autobahn|Testsuite's index.json behind
``make conformance`` and its split of the run into wstest batches: fed real reports
(tests/data/), no server and no suite run.

* autobahn_index_native_sansio.json: one fuzzingclient run (autobahntestsuite 25.10.1) of 17
  cases against two agents at once, "native" (python -m wsmanager) and "uvicorn-sansio" (stock
  uvicorn 0.54, --ws websockets-sansio), both serving tests/hostile_support.py's /echo.
* autobahn_index_uvicorn_legacy.json: six cases kept from a run of categories 1-10 against stock
  uvicorn --ws websockets (its 9.3.1 and 9.4.3 fail: "1009 too many fragments").
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(10)

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"


def _load_results():
    spec = importlib.util.spec_from_file_location("conformance_results", ROOT / "tools" / "conformance" / "results.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


R = _load_results()
ALL = sorted(R.CATEGORIES)
QUICK = R.parse_categories("1-10")
TWO = R.load_index(DATA / "autobahn_index_native_sansio.json")
LEGACY = R.load_index(DATA / "autobahn_index_uvicorn_legacy.json")


def test_categories_parse_as_make_passes_them() -> None:
    assert R.parse_categories("1-7,9,10,12,13") == [1, 2, 3, 4, 5, 6, 7, 9, 10, 12, 13]
    assert QUICK == [1, 2, 3, 4, 5, 6, 7, 9, 10]  # a range skips 8, which holds no case
    assert R.parse_categories(" 12 , 13,12") == [12, 13]
    assert R.spec_cases([1, 12]) == ["1.*", "12.*"]
    for bad in ("8", "11", "", "13-12", "14-20", "x"):
        with pytest.raises(ValueError):
            R.parse_categories(bad)


def test_registry_counts_add_up_to_the_suite() -> None:
    # The suite's own registry (CaseSet over "*") resolves to 517 cases, 301 of them in 1-10.
    assert sum(n for _, n in R.CATEGORIES.values()) == 517
    assert sum(R.CATEGORIES[c][1] for c in QUICK) == 301


def test_native_agent_tally() -> None:
    per = R.tally(TWO, "native", ALL)
    t = R.total(per)
    assert t.counts == {"passed": 8, "non-strict": 3, "informational": 2, "failed": 0,
                        "unimplemented": 4, "missing": 0}
    assert t.cases["non-strict"] == ["3.2", "4.1.3", "5.15"]
    assert t.cases["informational"] == ["7.1.6", "7.13.1"]
    assert t.cases["unimplemented"] == ["12.1.1", "12.5.18", "13.1.1", "13.7.18"]
    assert per[12].counts["unimplemented"] == 2 and per[13].counts["unimplemented"] == 2
    # Categories 1-10 pass; without permessage-deflate, 12 and 13 fail the gate.
    assert R.passes({c: per[c] for c in QUICK})
    assert not R.passes(per)
    assert not R.passes({12: per[12]})


def test_stock_sansio_agent_tally() -> None:
    per = R.tally(TWO, "uvicorn-sansio", ALL)
    t = R.total(per)
    # 7.1.5: behavior FAILED, behaviorClose WRONG CODE (1002 instead of echoing 1000).
    assert t.cases["failed"] == ["7.1.5"]
    assert t.cases["non-strict"] == ["3.2", "4.1.3", "5.15", "6.4.1", "6.4.3"]
    assert per[12].counts["passed"] == 2 and per[13].counts["passed"] == 2
    assert t.counts["unimplemented"] == 0
    assert not R.passes(per)
    assert R.passes({c: t_ for c, t_ in per.items() if c != 7})


def test_legacy_uvicorn_failures() -> None:
    per = R.tally(LEGACY, "uvicorn", QUICK)
    assert per[9].cases == {"failed": ["9.3.1", "9.4.3"]}
    assert per[6].counts["non-strict"] == 1 and per[7].counts["informational"] == 1
    assert not R.passes(per)


def test_missing_cases_and_empty_categories_fail() -> None:
    ids = list(TWO["native"]) + ["1.1.2", "2.1"]
    per = R.tally(TWO, "native", [1, 2], expected=ids)
    assert per[1].cases["missing"] == ["1.1.2"] and per[2].cases["missing"] == ["2.1"]
    assert not R.passes(per)
    # The legacy fixture has no 2.* case at all: a category with nothing run never passes.
    assert R.tally(LEGACY, "uvicorn", [2])[2].total == 0
    assert not R.passes(R.tally(LEGACY, "uvicorn", [2]))
    with pytest.raises(KeyError):
        R.tally(TWO, "nobody", QUICK)


def test_closing_handshake_rules() -> None:
    # The fixtures' own entries, then the same behaviour under each closing-handshake verdict
    # the suite's Case.onConnectionLost can give (the HTML report's colours).
    ok = TWO["native"]["1.1.1"]
    assert R.outcome(ok) == "passed"
    assert R.outcome(TWO["native"]["7.1.6"]) == "informational"
    assert R.outcome(TWO["uvicorn-sansio"]["7.1.5"]) == "failed"
    assert R.outcome(LEGACY["uvicorn"]["9.3.1"]) == "failed"
    assert R.outcome({**ok, "behaviorClose": "WRONG CODE"}) == "non-strict"
    assert R.outcome({**ok, "behaviorClose": "FAILED BY CLIENT"}) == "non-strict"
    assert R.outcome({**ok, "behaviorClose": "UNCLEAN"}) == "failed"
    assert R.outcome({**ok, "behaviorClose": "FAILED"}) == "failed"
    assert R.outcome({**ok, "behavior": "NO_CLOSE"}) == "failed"


def test_table_and_summary() -> None:
    per = R.tally(TWO, "native", [1, 3, 12])
    lines = R.table(per).splitlines()
    assert lines[0].split("|")[1].strip() == "category" and len(lines) == 2 + 3 + 1
    assert [c.strip() for c in lines[-1].split("|")[1:-1]] == ["**total**", "5", "2", "1", "0", "0", "2", "0"]
    assert R.summary_line(per) == ("2 passed, 1 non-strict, 0 informational, 0 failed, "
                                   "2 unimplemented, 0 missing")
    assert R.notable(per) == ["non-strict: 3.2", "unimplemented: 12.1.1, 12.5.18"]


def _deflate_ids(*categories: int) -> list[str]:
    """The suite's ids of ``categories`` among 12 and 13 (its registry: 12.1-12.5 and 13.1-13.7,
    sub-cases 1-18 each), in its order."""
    return [f"{c}.{s}.{n}" for c, subs in ((12, 5), (13, 7)) if c in categories
            for s in range(1, subs + 1) for n in range(1, 19)]


def test_large_cases_are_sub_cases_10_to_18_of_12_and_13() -> None:
    ids = _deflate_ids(12, 13)
    assert [c for c in ids if R.is_large(c)] == [c for c in ids if int(c.split(".")[2]) >= 10]
    assert (len(_deflate_ids(12)), len(_deflate_ids(13))) == (R.CATEGORIES[12][1], R.CATEGORIES[13][1])
    assert sum(map(R.is_large, _deflate_ids(12, 13))) == 108 == 12 * 9
    for small in ("1.1.1", "9.1.6", "10.1.1", "12.1.9", "13.7.9", "6.4.10", "7.13.2"):
        assert not R.is_large(small)
    assert R.is_large("12.5.10") and R.is_large("13.1.18")


def test_batches_split_the_large_cases_off() -> None:
    quick = ["1.1.1", "2.1", "9.7.6", "10.1.1"]
    assert R.batches(quick) == [quick]  # no case of 12 or 13: one run, as before
    assert R.batches([]) == []
    assert [R.batch_key(c) for c in ("1.1.1", "12.1.1", "12.1.9", "12.1.10", "13.7.18")] == \
        ["rest", "12.1", "12.1", "12.1.10", "13.7.18"]
    ids = quick + _deflate_ids(12, 13)
    plan = R.batches(ids)
    assert plan[0] == quick
    # Per subcategory: its sub-cases 1-9 in one run, then each of 10-18 in one of its own.
    assert plan[1:11] == [[f"12.1.{n}" for n in range(1, 10)]] + [[f"12.1.{n}"] for n in range(10, 19)]
    assert plan[-1] == ["13.7.18"] and plan[-10] == [f"13.7.{n}" for n in range(1, 10)]
    assert len(plan) == 1 + 12 * (1 + 9)
    assert [c for b in plan for c in b] == ids  # every id once, in the suite's order
    # A selection that is not in the suite's order keeps its order within each run.
    assert R.batches(["12.2.3", "1.1.1", "12.2.1", "12.2.11"]) == [["12.2.3", "12.2.1"], ["1.1.1"], ["12.2.11"]]


def test_merge_indexes_joins_batches_and_points_into_their_folders() -> None:
    first = {"native": {k: TWO["native"][k] for k in ("1.1.1", "12.1.1")}}
    second = {"native": {"12.5.18": TWO["native"]["12.5.18"]}}
    merged = R.merge_indexes({"batch-1": first, "batch-2": second})
    assert sorted(merged["native"]) == ["1.1.1", "12.1.1", "12.5.18"]
    assert merged["native"]["1.1.1"]["reportfile"] == "batch-1/native_case_1_1_1.json"
    assert merged["native"]["12.5.18"]["reportfile"] == "batch-2/native_case_12_5_18.json"
    assert {k: v for k, v in merged["native"]["12.5.18"].items() if k != "reportfile"} == \
        {k: v for k, v in TWO["native"]["12.5.18"].items() if k != "reportfile"}
    assert TWO["native"]["1.1.1"]["reportfile"] == "native_case_1_1_1.json"  # inputs left as they were
    # The merged index reads as one run's would: the whole fixture, split in two and merged.
    ids = sorted(TWO["native"])
    halves = {f"batch-{i}": {a: {k: TWO[a][k] for k in part if k in TWO[a]} for a in TWO}
              for i, part in enumerate((ids[:8], ids[8:]), 1)}
    whole = R.total(R.tally(TWO, "native", ALL)).counts
    assert R.total(R.tally(R.merge_indexes(halves), "native", ALL)).counts == whole
    assert R.merge_indexes({}) == {}
    with pytest.raises(ValueError):
        R.merge_indexes({"batch-1": first, "batch-2": first})
