"""Every leaf of every entry point's config, given values a user could mistype: each is refused in one line that
names the key, the value and a fix (exit status 2, before anything is built), or is valid and stated so with its
reason in fuzz_cases.ACCEPTED. docs/bad_inputs.md lists every case with what the entry point said."""

import re

import pytest

from fuzz_cases import BASE, Case, accepted_reason, cases, full_outcome, outcome
from helpers import ROOT, run_script

CASES = cases()
DOC = (ROOT / "docs" / "bad_inputs.md").read_text()


def shown(value: str) -> list[str]:
    """How a message may spell the value: as typed, or as Python reads it (1e30 -> 1e+30, 0 -> 0.0)."""
    forms = {value, value.strip("'")}
    try:
        number = float(value)
        forms |= {repr(number), str(int(number)) if number.is_integer() and abs(number) < 1e16 else repr(number)}
    except ValueError:
        pass
    return [f for f in forms if f] or ["''"]


@pytest.mark.parametrize("case", CASES, ids=[f"{c.entry}:{c.override}" for c in CASES])
def test_a_bad_value_is_one_line_or_stated_valid(case: Case):
    code, err = outcome(case)
    why = accepted_reason(case)
    if code == 0:
        assert why is not None, \
            f"{case.entry}.py accepted {case.override}, which fuzz_cases.ACCEPTED does not state valid"
    else:
        assert why is None, f"{case.override} is stated valid ({why}) but was refused: {err}"
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
        line = lines[0]
        assert case.key in line or case.key.split(".")[-1] in line, f"the key is not named: {line}"
        if case.value != "''":
            assert any(form in line for form in shown(case.value)), f"the value is not named: {line}"
        assert re.search(r"; (try|use|choose|give|set|fix|drop|write|pick|lower|add|keep|remove|did you)", line), \
            f"no fix offered: {line}"
    row = f"| `{case.entry}.py` | `{case.override}` |"
    assert row in DOC, f"{row} missing from docs/bad_inputs.md: run docs/bad_input_table.py"


@pytest.mark.parametrize("case", CASES[::37], ids=[f"{c.entry}:{c.override}" for c in CASES[::37]])
def test_the_fast_path_is_the_whole_composition(case: Case):
    """outcome() applies each value to a composed copy; precheck composes the command line anew: the same."""
    assert outcome(case) == full_outcome(case)


@pytest.mark.parametrize("case", [Case("train", "trainer.devices", "0"), Case("sample", "num_samples", "0"),
                                  Case("evaluate", "bpd.batch_size", "0"), Case("figures", "num_images", "1")],
                         ids=lambda c: f"{c.entry}:{c.override}")
def test_the_real_entry_points_say_the_same(case: Case, tmp_path):
    """In-process above; here the scripts themselves, as a user runs them."""
    result = run_script(f"{case.entry}.py", *BASE[case.entry], case.override, f"hydra.run.dir={tmp_path}",
                        cwd=tmp_path)
    code, err = outcome(case)
    assert result.returncode == code == 2
    assert result.stderr.strip().splitlines()[-1] == err.strip()
    assert "Traceback" not in result.stderr


def test_the_walk_covers_every_entry_point_and_kind():
    entries = {c.entry for c in CASES}
    assert entries == set(BASE)
    assert len(CASES) > 400
    for key in ("data.batch_size", "optim.optimizer.betas", "trainer.devices", "callbacks.quality.seed",
                "sampler.name", "bpd.batch_size", "num_lambdas"):
        assert any(c.key == key for c in CASES), key
