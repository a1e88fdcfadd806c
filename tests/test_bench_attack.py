"""The attack suite's quick cases (bench/attack.py), each against its own real ``guard serve``:
every one must hold. The long cases (three maximum-size batches in a 2 GiB cgroup, the zip
bomb) run with ``python -m bench.attack``; their findings have their own tests too."""

from __future__ import annotations

import pytest

from bench import attack

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

QUICK = [name for name, case in attack.CASES.items() if case.quick]


def test_every_finding_of_issues_19_and_21_has_a_case() -> None:
    findings = {case.finding for case in attack.CASES.values()}
    assert {f"19.{n}" for n in range(1, 8)} | {"19 (weak)", "21"} <= findings
    assert len(QUICK) >= 15


@pytest.mark.parametrize("name", QUICK)
def test_the_guard_holds(name: str) -> None:
    outcome = attack.run_case(name)
    assert outcome.verdict == "held", f"{outcome.case}: {outcome.verdict}: {outcome.detail}"


def test_the_report_counts_each_verdict() -> None:
    outcomes = [attack.Outcome("a", "19.1", "held", "fine"),
                attack.Outcome("b", "19.2", "broken", "died"),
                attack.Outcome("c", "21", "weak", "slow")]
    text = attack.report(outcomes)
    assert text.startswith("1 held, 1 weak, 1 broken (3 cases).")
    assert any(line.split("|")[1:5] == [" 19.2    ", " b    ", " broken  ", " died          "]
               for line in text.splitlines())
