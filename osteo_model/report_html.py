"""index.html of a screening report: one card per study (its PNG, linked relatively, and its numbers),
sortable by patient T-score with a few lines of inline JavaScript. One self-contained file that opens from
disk without a server; every value is HTML-escaped.
"""
from __future__ import annotations

import math
from html import escape
from pathlib import Path
from typing import Iterable

from osteo_model.report_png import category_colour
from osteo_model.screening import RESEARCH_USE, SCREENING_ESTIMATE, StudyReport, region_name

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
header p{margin:.2em 0}.ruo{color:#b30000;font-weight:bold}
.card{border:1px solid #ccc;border-radius:6px;padding:.8em;margin:1em 0}
.card h2{margin:.1em 0 .4em;font-size:1.1em}.card img{max-width:100%;height:auto;display:block}
table{border-collapse:collapse;font-size:.9em;margin:.5em 0}td,th{border:1px solid #ddd;padding:.2em .5em;text-align:right}
td.l,th.l{text-align:left}.flag{color:#b35806}.na{color:#777}
"""
_SCRIPT = """
function sortCards(how){
  const box=document.getElementById('cards');
  const cards=Array.from(box.querySelectorAll('.card'));
  const t=c=>{const v=parseFloat(c.dataset.t);return isNaN(v)?Infinity:v;};
  cards.sort((a,b)=>how==='id'?a.dataset.study.localeCompare(b.dataset.study):how==='t-desc'?
    (t(b)===Infinity?-1:t(a)===Infinity?1:t(b)-t(a)):t(a)-t(b));
  cards.forEach(c=>box.appendChild(c));
}
"""


def _num(value: float, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) and math.isfinite(value) else "&ndash;"


def _level_rows(report: StudyReport) -> Iterable[str]:
    for lv in report.levels:
        if not lv.evaluable:
            yield (f'<tr><td class="l">{lv.level}</td><td class="l na" colspan="7">not evaluable: '
                   f"{escape(lv.reason)}</td></tr>")
            continue
        interval = f" [{_num(lv.t_low, '.1f')}, {_num(lv.t_high, '.1f')}]" if math.isfinite(lv.t_low) else ""
        flags = f'<br><span class="flag">&#9888; {escape("; ".join(lv.flags))}</span>' if lv.flags else ""
        yield (f'<tr><td class="l">{lv.level}</td><td>{_num(lv.hu_mean, ".0f")}</td><td>{_num(lv.hu_median, ".0f")}</td>'
               f"<td>{_num(lv.sbmd, '.3f')}</td><td>{_num(lv.bmd, '.3f')}</td><td>{_num(lv.t_score, '+.1f')}{interval}</td>"
               f'<td class="l" style="color:{category_colour(lv.category)}">{escape(lv.category)}{flags}</td>'
               f"<td>{_num(lv.p_osteoporosis, '.2f')}</td></tr>")


def _card(report: StudyReport) -> str:
    p = report.patient
    t_attr = f"{p.t_score:.3f}" if p.evaluable else "NaN"
    if p.evaluable:
        interval = f" [{_num(p.t_low, '.1f')}, {_num(p.t_high, '.1f')}]" if math.isfinite(p.t_low) else ""
        headline = (f'{escape(region_name(p.levels_used))}: BMD {p.bmd:.3f} g/cm&sup2;, T {p.t_score:+.1f}{interval}, '
                    f'<b style="color:{category_colour(p.category)}">{escape(p.category)}</b> '
                    f'<small>({escape(SCREENING_ESTIMATE)})</small>')
    else:
        headline = f'<span class="na">{escape(p.reason)}</span>'
    image = (f'<img src="{escape(report.image)}" alt="reformats of study {escape(report.study_id)}" loading="lazy">'
             if report.image else "")
    note = f'<p class="na">image: {escape(report.image_note)}</p>' if report.image_note else ""
    flags = "".join(f'<li class="flag">{escape(f)}</li>' for f in report.flags)
    return (f'<section class="card" data-study="{escape(report.study_id)}" data-t="{t_attr}">'
            f"<h2>{escape(report.study_id)} <small>({escape(report.source)})</small></h2><p>{headline}</p>"
            + (f"<p>{escape(p.without_flagged)}</p>" if p.without_flagged else "")
            + f'<p class="na">{escape("; ".join(n for n in (p.t_note, p.interval_note) if n))}</p>{image}{note}'
            '<table><tr><th class="l">level</th><th>HU mean</th><th>HU median</th><th>sBMD</th><th>BMD g/cm&sup2;</th>'
            '<th>T-score</th><th class="l">category</th><th>P(osteoporosis)</th></tr>'
            + "".join(_level_rows(report)) + "</table>"
            f"<p>L1-HU rule (Pickhardt 2013): {escape(p.l1_hu_rule)}; TotalSegmentator rule: {escape(p.l1_totalseg_flag)}</p>"
            + (f"<ul>{flags}</ul>" if flags else "") + "</section>")


def write_index(path: Path, reports: list[StudyReport], site: str, model_line: str) -> Path:
    """Write index.html (cards in T-score order, lowest first); returns its path."""
    order = sorted(reports, key=lambda r: r.patient.t_score if r.patient.evaluable else math.inf)
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>Screening report {escape(site)}</title><style>{_STYLE}</style><script>{_SCRIPT}</script></head><body>"
        f"<header><h1>Opportunistic osteoporosis screening: {escape(site)}</h1>"
        f'<p class="ruo">{escape(RESEARCH_USE)}</p><p>{escape(model_line)}</p>'
        f"<p>{len(reports)} studies. Sort by: "
        '<button type="button" onclick="sortCards(\'t-asc\')">T-score, lowest first</button> '
        '<button type="button" onclick="sortCards(\'t-desc\')">T-score, highest first</button> '
        '<button type="button" onclick="sortCards(\'id\')">study id</button></p></header>'
        '<main id="cards">' + "".join(_card(r) for r in order) + "</main></body></html>\n"
    )
    path.write_text(page, encoding="utf-8")
    return path
