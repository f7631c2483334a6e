"""osteo-sim's report says which sites a round's model lacks and why (a DP budget that ran out, a withheld
or rejected update), and its upload line comes from the last round anyone uploaded in."""
from __future__ import annotations

from osteofl.simulation.sim import missed_rounds, render

SPENT = "site site_a: privacy budget spent (epsilon 8.750 >= 8.0); not training any more"
HISTORY = [
    {"round": 1, "failed": [], "withheld": [], "rejected": [], "upload_bytes": {"site_a": 2000, "site_b": 2000}},
    {"round": 2, "failed": [], "withheld": [{"site": "site_b", "reason": "train: fewer than 10 patients"}],
     "rejected": [], "upload_bytes": {"site_a": 2000}},
    {"round": 3, "failed": [{"node": "1", "site": "site_a", "reason": SPENT}], "withheld": [], "rejected": [],
     "upload_bytes": {}},
    {"round": 4, "failed": [{"node": "1", "site": "site_a", "reason": SPENT}], "withheld": [], "rejected": [],
     "upload_bytes": {}},
]


def test_the_report_names_the_rounds_a_site_missed_and_the_last_upload() -> None:
    missed = missed_rounds(HISTORY)
    assert missed == {"site_a": [f"rounds 3, 4: {SPENT}"], "site_b": ["round 2: train: fewer than 10 patients"]}
    report = {"payload": {"shared_bytes": 900, "whole_model_bytes": 1000,
                          "upload_bytes_per_round": {"site_a": 2000}},
              "external": {"site": "site_ext", "before_onboarding": {}, "after_onboarding": {},
                           "onboarding_labeled_vertebrae": 0},
              "results": {"osteofl": {"site_a": {}, "site_b": {}}}, "round_seconds_flower": [1.0], "seconds": {},
              "missed_rounds": missed}
    text = render(report, ["site_a", "site_b"])
    assert f"site_a did not train in OsteoFL's rounds 3, 4: {SPENT}" in text
    assert "upload per site per round: site_a 2.0 kB;" in text
