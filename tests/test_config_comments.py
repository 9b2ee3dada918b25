"""The run configs' comments give a reason per setting and link the results page that holds its figures; the
measured figures themselves live on those pages (docs/results/*.md), once, with the command that reproduces them."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"(docs/(?:results/)?[\w.-]+\.md)(?:#([\w-]+))?")
FIGURE = re.compile(r"\b0\.\d{4}\b")  # an AUC, GAUC or lift as the results pages print them


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _comments(path: Path) -> list[tuple[int, str]]:
    return [(n, line.split("#", 1)[1]) for n, line in enumerate(path.read_text().splitlines(), 1) if "#" in line]


def test_config_comments_link_existing_results_sections_and_hold_no_figures():
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert configs
    problems, links = [], 0
    for path in configs:
        for n, comment in _comments(path):
            where = f"{path.relative_to(ROOT)}:{n}"
            if FIGURE.search(comment):
                problems.append(f"{where}: a measured figure ({FIGURE.search(comment).group()}): link its results page instead")
            for page, anchor in LINK.findall(comment):
                links += 1
                if not (ROOT / page).is_file():
                    problems.append(f"{where}: {page} does not exist")
                elif anchor and anchor not in {_anchor(h) for h in re.findall(r"^#+ (.+)$", (ROOT / page).read_text(), re.M)}:
                    problems.append(f"{where}: {page} has no section #{anchor}")
    assert links >= 5, "the configs link their results pages"
    assert not problems, "\n".join(problems)


def test_the_anchor_rule():
    assert _anchor("Offline engines (2026-12-07)") == "offline-engines-2026-12-07"
    assert _anchor("The deployable share of the rolling lift, over the same DIN baseline") == \
        "the-deployable-share-of-the-rolling-lift-over-the-same-din-baseline"
