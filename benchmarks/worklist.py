"""Time to write the worklist of a busy week: the paged table against the tables the worklist was made of before.

    python benchmarks/worklist.py [--studies 2000] [--skipped 2000] [--repeat 3]

A `watch` daemon rewrites worklist.pdf every 30 s while studies come (every study of the last
`--worklist-days`, 7 by default, and every file not screened): at a site that takes a frontal and a lateral
view of each of 300 chest studies a day, 2,000 studies and 2,000 skipped laterals. Builds such rows
(generated, nothing from ../shared), then writes them with :func:`cxrscreen.report.write_worklist` and with
the baseline, the worklist as cxrscreen 0.3.6 laid it out: a reportlab table of 50 studies with a page
break after each, every name, ID and report link a paragraph, and the files not screened as one table that
reportlab splits at each page's end (measuring every row it has left each time). Prints the best of
--repeat runs of each, their ratio and the pages each wrote.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def week_rows(studies: int, skipped: int) -> list[dict]:
    from cxrscreen.pipeline import file_rows, rank_rows, study_row
    from cxrscreen.records import FileOutcome, Status

    rnd = random.Random(0)
    rows = rank_rows([study_row(f"1.2.826.0.1.3680043.8.498.{10 ** 12 + i}", 0.69, status="scored",
                                flag="yes" if rnd.random() < 0.3 else "no", score=round(rnd.random(), 6),
                                patient_id=f"P{i:08d}", patient_name="DOE^JANE", accession=f"A{i:010d}",
                                study_date="20261120", version=1, files=[f"/srv/inbox/{i}/IM0001.dcm"],
                                report=f"DOE_JANE_20261120_A{i:010d}_{rnd.getrandbits(40):010x}.pdf")
                      for i in range(studies)])
    return rows + file_rows([FileOutcome(Path(f"/srv/inbox/{i}/IM0002.dcm"), Status.SKIPPED,
                                         "view 'LL' is not frontal (PA/AP; --frontal-view adds a site's own name "
                                         "for one)", step="select", tag="(0018,5101) ViewPosition",
                                         study_uid=f"1.2.826.0.1.3680043.8.498.{10 ** 12 + i}")
                             for i in range(skipped)])


def worklist_before(path: Path, rows: list[dict], meta: dict, per_page: int = 50) -> None:
    """The worklist's tables as cxrscreen 0.3.6 built them (the title lines left out)."""
    from reportlab.lib import colors
    from reportlab.lib.pagesizes import A4, landscape
    from reportlab.lib.styles import getSampleStyleSheet
    from reportlab.lib.units import mm
    from reportlab.platypus import PageBreak, Paragraph, SimpleDocTemplate, Table, TableStyle

    from cxrscreen.report import _p, brief_caution, display_date
    from cxrscreen.typeset import paragraph, person_name

    styles = getSampleStyleSheet()
    small = styles["BodyText"].clone("cell", fontSize=7, leading=8)
    studies = [r for r in rows if r["kind"] == "study"]
    others = [r for r in rows if r["kind"] == "file"]
    story = [Paragraph("cxrscreen worklist - highest risk first", styles["Title"])]
    header = ["#", "Flag", "Score", "Patient ID", "Patient", "Accession", "Study date", "Study UID", "Report", "Caution"]
    for start in range(0, max(len(studies), 1), per_page):
        chunk = studies[start:start + per_page]
        data = [header] + [[r["rank"], "REVIEW" if r["flag"] == "yes" else "", f"{float(r['score']):.3f}",
                            paragraph(r["patient_id"], small), paragraph(person_name(r["patient_name"]), small),
                            paragraph(r["accession"], small), display_date(r["study_date"]), r["study_uid"][-24:],
                            Paragraph(f'<a href="pdf:{r["report"]}" color="#1a4f9c">{r["report"]}</a>', small),
                            Paragraph(_p(brief_caution(r.get("warning", ""), r.get("appearance_caution", ""),
                                                        r.get("unscored_frames", 0))), small)]
                           for r in chunk]
        table = Table(data, repeatRows=1, colWidths=[w * mm for w in (7, 12, 10, 22, 32, 24, 15, 38, 78, 35)])
        style = [("FONTSIZE", (0, 0), (-1, -1), 7), ("BACKGROUND", (0, 0), (-1, 0), colors.lightgrey),
                 ("VALIGN", (0, 0), (-1, -1), "TOP")]
        style += [("TEXTCOLOR", (1, i), (2, i), colors.HexColor("#b00020"))
                  for i, r in enumerate(chunk, start=1) if r["flag"] == "yes"]
        table.setStyle(TableStyle(style))
        story.append(table)
        if start + per_page < len(studies):
            story.append(PageBreak())
    if others:
        data = [["Status", "File", "Study UID", "Step / tag", "Reason"]] + [
            [r["status"], paragraph(Path(r["path"]).name, small), r["study_uid"][-24:],
             Paragraph(_p(" ".join(x for x in (r["step"], r["tag"]) if x)), small),
             paragraph(r["reason"], small, base="L")] for r in others]
        table = Table(data, repeatRows=1, colWidths=[16 * mm, 50 * mm, 42 * mm, 40 * mm, 98 * mm])
        table.setStyle(TableStyle([("FONTSIZE", (0, 0), (-1, -1), 7), ("VALIGN", (0, 0), (-1, -1), "TOP"),
                                   ("BACKGROUND", (0, 0), (-1, 0), colors.lightgrey)]))
        story.append(table)
    SimpleDocTemplate(str(path), pagesize=landscape(A4), leftMargin=12 * mm, rightMargin=12 * mm).build(story)


def best_of(repeat: int, write, path: Path, rows: list[dict], meta: dict) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        write(path, rows, meta)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> int:
    from pypdf import PdfReader

    from cxrscreen.report import write_worklist

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=2000)
    parser.add_argument("--skipped", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rows = week_rows(args.studies, args.skipped)
    meta = {"model": "cxr-default.keras", "threshold": 0.69}
    with tempfile.TemporaryDirectory() as tmp:
        before, now = Path(tmp) / "before.pdf", Path(tmp) / "now.pdf"
        t_before = best_of(args.repeat, worklist_before, before, rows, meta)
        t_now = best_of(args.repeat, write_worklist, now, rows, meta)
        pages_before, pages_now = len(PdfReader(before).pages), len(PdfReader(now).pages)
    print(f"{args.studies} studies, {args.skipped} files not screened; best of {args.repeat}")
    print(f"0.3.6's tables (50 studies, then a page break): {t_before:.2f} s, {pages_before} pages")
    print(f"write_worklist (rows measured once, pages filled): {t_now:.2f} s, {pages_now} pages")
    print(f"ratio: {t_before / t_now:.1f}x faster, {pages_before / pages_now:.2f}x the pages before")
    return 0


if __name__ == "__main__":
    sys.exit(main())
