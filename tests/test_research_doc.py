"""docs/research.md runs: each python block is executed in order, in one namespace, and what it
prints is compared with the text block after it (numbers within a tolerance, words exactly).

    python tests/test_research_doc.py      # print each block's output, to update the page
"""

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "research.md"
BLOCK = re.compile(r"```(python|text)\n(.*?)```", re.DOTALL)
NUMBER = re.compile(r"-?\d+\.\d+|-?\d+")


def blocks() -> list[tuple[str, str | None]]:
    """(code, the output shown after it or None) for each python block of the page."""
    found = BLOCK.findall(DOC.read_text())
    pairs = []
    for i, (kind, body) in enumerate(found):
        if kind == "python":
            after = found[i + 1] if i + 1 < len(found) else None
            pairs.append((body, after[1] if after and after[0] == "text" else None))
    return pairs


def run_page() -> list[tuple[str, str, str | None]]:
    """(code, printed, shown) per block, run as the page was: seeded, one thread."""
    namespace: dict = {"__name__": "research_doc"}
    results = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for code, shown in blocks():
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(compile(code, str(DOC), "exec"), namespace)
            results.append((code, out.getvalue(), shown))
    finally:
        torch.set_num_threads(threads)
    return results


def same_output(printed: str, shown: str, tolerance: float = 0.05) -> bool:
    """Equal words; numbers within tolerance (absolute) or 5% (relative)."""
    if NUMBER.sub("#", printed).split() != NUMBER.sub("#", shown).split():
        return False
    for a, b in zip(NUMBER.findall(printed), NUMBER.findall(shown)):
        a, b = float(a), float(b)
        if abs(a - b) > max(tolerance, 0.05 * abs(b)):
            return False
    return True


@pytest.mark.slow
def test_research_page_runs_and_prints_what_it_shows():
    results = run_page()
    assert len(results) >= 6
    for code, printed, shown in results:
        assert shown is not None, f"no output shown after:\n{code}"
        assert same_output(printed, shown), (
            f"the page shows\n{shown}\nbut the code printed\n{printed}\nfor\n{code}")


def test_output_comparison():
    assert same_output("loss 0.41 | L0H1 2.00", "loss 0.43 | L0H1 2.01")
    assert not same_output("loss 0.41", "loss 0.61")
    assert not same_output("loss 0.41", "gain 0.41")
    assert not same_output("a 1 2", "a 1")


if __name__ == "__main__":
    for code, printed, _ in run_page():
        print(code.splitlines()[0], "...\n" + printed)
