"""Reads the Autobahn|Testsuite fuzzingclient's ``index.json`` (``{agent: {case id: {"behavior",
"behaviorClose", ...}}}``) into a per-category tally and judges it. Python 3, standard library
only; used by tools/conformance/run.py and tests/test_conformance_tools.py.

A case's outcome follows the suite's own HTML report (autobahntestsuite/fuzzing.py,
``createMasterReport``):

* ``behavior`` UNIMPLEMENTED (the server refused the extension the case needs, e.g. no
  permessage-deflate): **unimplemented**;
* ``behavior`` OK / NON-STRICT / INFORMATIONAL: **passed** / **non-strict** / **informational**,
  anything else (FAILED, NO_CLOSE, ...): **failed**;
* then the closing handshake: ``behaviorClose`` UNCLEAN, FAILED or any unknown value makes the
  case **failed** (the report paints it red); WRONG CODE or FAILED BY CLIENT (the report's
  amber) turn a pass into **non-strict**; OK and INFORMATIONAL leave it as it is.

A case the spec asked for that is absent from the index (the run stopped, the server died) is
**missing**. ``passes()`` is the gate: every required category has cases and none of them is
failed, unimplemented or missing.

The run is split into wstest processes (``batches()``: every case outside categories 12 and 13
in one, each subcategory of 12 and 13 in one, each of their large cases, ``LARGE_CASES``, in one
of its own), and their reports are joined into one index (``merge_indexes()``) before it is
tallied.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

#: The suite's case categories (autobahntestsuite 25.10.1, case/__init__.py ``CaseCategories``;
#: 0 and 8 hold no case in its registry) and how many cases each has there.
CATEGORIES: dict[int, tuple[str, int]] = {
    1: ("Framing", 16),
    2: ("Pings/Pongs", 11),
    3: ("Reserved Bits", 7),
    4: ("Opcodes", 10),
    5: ("Fragmentation", 20),
    6: ("UTF-8 Handling", 145),
    7: ("Close Handling", 37),
    9: ("Limits/Performance", 54),
    10: ("Misc", 1),
    12: ("Compression (different payloads)", 90),
    13: ("Compression (different parameters)", 126),
}
#: The large permessage-deflate cases, category -> first large sub-case: 12.*.10-18 and
#: 13.*.10-18 (1000 messages of 128 KiB each, some auto-fragmented). The suite itself (PyPy 2.7,
#: autobahn 0.10.9) never gives back the zlib objects of a compressed message: in one wstest
#: process it grows by 90-340 MiB per case of these categories (sub-cases 1-9) and 400-500 MiB
#: per large case, tens of GiB over categories 12 and 13 (the --max-rss-mib watchdog killed it,
#: or the machine swapped). So ``batch_key()`` gives each large case a wstest process of its
#: own, and the other cases of these categories one per subcategory (in a run of category 12
#: they peaked at 0.35-0.8 GiB and 1.6-1.8 GiB).
LARGE_CASES: dict[int, int] = {12: 10, 13: 10}
OUTCOMES = ("passed", "non-strict", "informational", "failed", "unimplemented", "missing")
#: Outcomes that fail a required category.
BAD = ("failed", "unimplemented", "missing")


def parse_categories(text: str) -> list[int]:
    """``"1-7,9,10,12,13"`` -> ``[1, ..., 7, 9, 10, 12, 13]``. A range keeps only the categories
    the suite has (``1-10`` has no 8); a category named alone must exist."""
    out: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if "-" in part:
            lo, hi = (int(x) for x in part.split("-", 1))
            if lo > hi:
                raise ValueError(f"empty range {part!r}")
            picked = [c for c in range(lo, hi + 1) if c in CATEGORIES]
            if not picked:
                raise ValueError(f"no Autobahn category in {part!r}")
        else:
            if int(part) not in CATEGORIES:
                raise ValueError(f"no Autobahn category {part!r} (known: {sorted(CATEGORIES)})")
            picked = [int(part)]
        out += [c for c in picked if c not in out]
    if not out:
        raise ValueError("no category given")
    return sorted(out)


def spec_cases(categories: Iterable[int]) -> list[str]:
    """The fuzzingclient spec's ``cases`` patterns for ``categories``."""
    return [f"{c}.*" for c in categories]


def category_of(case_id: str) -> int:
    return int(case_id.split(".", 1)[0])


def is_large(case_id: str) -> bool:
    """Whether ``case_id`` (e.g. "12.3.14") is one of ``LARGE_CASES``."""
    key = _case_key(case_id)
    first = LARGE_CASES.get(key[0])
    return first is not None and len(key) == 3 and key[2] >= first


def batch_key(case_id: str) -> str:
    """Which wstest process runs ``case_id``: "rest" (one for every case outside the categories
    of ``LARGE_CASES``), the subcategory ("12.3": its cases that are not large) or the case
    itself (a large one)."""
    key = _case_key(case_id)
    if key[0] not in LARGE_CASES:
        return "rest"
    return case_id if is_large(case_id) else f"{key[0]}.{key[1]}"


def batches(case_ids: Iterable[str]) -> list[list[str]]:
    """``case_ids`` (the ids the spec selected) grouped by ``batch_key()``: one list per wstest
    process, in the order of their first cases; the ids keep their order."""
    out: dict[str, list[str]] = {}
    for case_id in case_ids:
        out.setdefault(batch_key(case_id), []).append(case_id)
    return list(out.values())


def outcome(case: Mapping[str, object]) -> str:
    """One case of index.json -> one of ``OUTCOMES`` (but "missing")."""
    behavior, close = case.get("behavior"), case.get("behaviorClose")
    if behavior == "UNIMPLEMENTED":
        return "unimplemented"
    result = {"OK": "passed", "NON-STRICT": "non-strict",
              "INFORMATIONAL": "informational"}.get(str(behavior), "failed")
    if close in ("OK", "INFORMATIONAL") or result == "failed":
        return result
    if close in ("WRONG CODE", "FAILED BY CLIENT"):
        return "non-strict" if result == "passed" else result
    return "failed"  # UNCLEAN, FAILED, or a value this parser does not know


@dataclass
class Tally:
    """The outcome counts of one category (or of all), and the ids of the cases that are not a
    plain pass."""
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    cases: dict[str, list[str]] = field(default_factory=dict)

    def add(self, case_id: str, result: str) -> None:
        self.counts[result] += 1
        if result != "passed":
            self.cases.setdefault(result, []).append(case_id)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def bad(self) -> int:
        return sum(self.counts[o] for o in BAD)


def _case_key(case_id: str) -> tuple[int, ...]:
    return tuple(int(x) for x in case_id.split("."))


def load_index(path: str | Path) -> dict[str, dict[str, dict[str, object]]]:
    return json.loads(Path(path).read_text())


def merge_indexes(parts: Mapping[str, Mapping[str, Mapping[str, Mapping[str, object]]]]
                  ) -> dict[str, dict[str, dict[str, object]]]:
    """The index.json of each batch, keyed by its folder relative to where the merged index
    goes (e.g. "batch-2"), -> one index of all their cases, each ``reportfile`` prefixed with its
    batch's folder so that it still names the case's report. A case in two batches is an error."""
    out: dict[str, dict[str, dict[str, object]]] = {}
    for folder, index in parts.items():
        for agent, cases in index.items():
            merged = out.setdefault(agent, {})
            for case_id, record in cases.items():
                if case_id in merged:
                    raise ValueError(f"case {case_id} of agent {agent!r} is in two batches ({folder})")
                merged[case_id] = dict(record)
                if "reportfile" in record:
                    merged[case_id]["reportfile"] = f"{folder}/{record['reportfile']}"
    return out


def tally(index: Mapping[str, Mapping[str, Mapping[str, object]]], agent: str,
          categories: Iterable[int], expected: Iterable[str] | None = None) -> dict[int, Tally]:
    """Per category of ``categories``: the outcomes of ``agent``'s cases in ``index``, plus a
    "missing" for every id of ``expected`` (the ids the spec selected) that the index lacks.
    Cases of other categories are left out."""
    if agent not in index:
        raise KeyError(f"agent {agent!r} not in the report (agents: {sorted(index)})")
    cases = index[agent]
    out = {c: Tally() for c in categories}
    for case_id in sorted(cases, key=_case_key):
        if category_of(case_id) in out:
            out[category_of(case_id)].add(case_id, outcome(cases[case_id]))
    for case_id in sorted(set(expected or ()) - set(cases), key=_case_key):
        if category_of(case_id) in out:
            out[category_of(case_id)].add(case_id, "missing")
    return out


def total(per_category: Mapping[int, Tally]) -> Tally:
    t = Tally()
    for tl in per_category.values():
        for o in OUTCOMES:
            t.counts[o] += tl.counts[o]
        for o, ids in tl.cases.items():
            t.cases.setdefault(o, []).extend(ids)
    return t


def passes(per_category: Mapping[int, Tally]) -> bool:
    """True when every category has cases and none failed, unimplemented or missing."""
    return all(t.total > 0 and t.bad == 0 for t in per_category.values())


def table(per_category: Mapping[int, Tally]) -> str:
    """A Markdown table: one row per category, then the total."""
    head = ["category", "cases", "passed", "non-strict", "info", "failed", "unimplemented", "missing"]
    rows = [[f"{c} {CATEGORIES.get(c, ('?', 0))[0]}", str(t.total)] + [str(t.counts[o]) for o in OUTCOMES]
            for c, t in sorted(per_category.items())]
    all_ = total(per_category)
    rows.append(["**total**", str(all_.total)] + [str(all_.counts[o]) for o in OUTCOMES])
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    sep = "| " + " | ".join("-" * w if i == 0 else "-" * (w - 1) + ":" for i, w in enumerate(widths)) + " |"
    return "\n".join([line(head), sep] + [line(r) for r in rows])


def notable(per_category: Mapping[int, Tally], limit: int = 12) -> list[str]:
    """Lines naming the cases that are not a plain pass (at most ``limit`` ids per outcome)."""
    all_ = total(per_category)
    out = []
    for o in OUTCOMES[1:]:
        ids = all_.cases.get(o, [])
        if ids:
            more = f" ... (+{len(ids) - limit})" if len(ids) > limit else ""
            out.append(f"{o}: {', '.join(ids[:limit])}{more}")
    return out


def summary_line(per_category: Mapping[int, Tally]) -> str:
    t = total(per_category)
    return (f"{t.counts['passed']} passed, {t.counts['non-strict']} non-strict, "
            f"{t.counts['informational']} informational, {t.counts['failed']} failed, "
            f"{t.counts['unimplemented']} unimplemented, {t.counts['missing']} missing")
