"""Time to write a study's PDF report: cxrscreen's report against the same report drawn as 0.3.6 drew it.

    python benchmarks/study_reports.py [--repeat 10] [INPUT ...]

Screens INPUT (the bundled samples when none is given) once with the default model, Grad-CAM on, then
writes every study's report with :func:`cxrscreen.report.write_study_report` and with the baseline: the same
function with its pictures drawn by reportlab's ``Image`` flowable, which decodes every JPEG it embeds to
name it, and every identifier of the table at its top a paragraph, as cxrscreen 0.3.6 drew them. The
rounds of the two alternate; prints the best round of each, per report, and their ratio.

Reports are written while the model scores, by one thread of the screening process (or ``--report-processes``):
on a 2-core CPU server they share its cores with the model, and on a GPU server one writer is what a run
waits for (README, *Benchmarks*), so a report's time is a run's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def screened(inputs: list[Path]) -> tuple[list, dict, float]:
    """The studies of ``inputs`` screened as `batch` screens them: (results, operating point, threshold)."""
    from cxrscreen import ingest, infer, pipeline

    studies, _ = ingest.group_studies(ingest.scan(inputs))
    model = infer.load_model()
    threshold = model.card.threshold
    results = list(pipeline.Screener(model, threshold, gradcam="all").screen(studies))
    return results, pipeline.card_operating_point(model.card), threshold


@contextmanager
def as_before():
    """write_study_report drawing as 0.3.6 did: reportlab's Image flowable, a paragraph for every identifier."""
    from reportlab.platypus import Image

    from cxrscreen import report
    from cxrscreen.typeset import paragraph

    saved = report._Picture, report.cell
    report._Picture = lambda arr, width, height: Image(report._jpeg(arr), width=width, height=height)
    report.cell = lambda text, style, width: paragraph(text, style)
    try:
        yield
    finally:
        report._Picture, report.cell = saved


def write_round(results: list, out: Path, operating_point: dict, threshold: float) -> float:
    from cxrscreen.report import write_study_report

    started = time.perf_counter()
    for i, result in enumerate(results):
        write_study_report(out / f"{i}.pdf", result, threshold=threshold, operating_point=operating_point,
                           model_name="cxr-default", model_sha256="0" * 64, population="children aged 1-5")
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("inputs", nargs="*", type=Path, default=[ROOT / "samples"])
    parser.add_argument("--repeat", type=int, default=10, help="rounds of each (default 10)")
    args = parser.parse_args()
    results, operating_point, threshold = screened(args.inputs)
    images = sum(len(r.images) for r in results)
    print(f"{len(results)} studies, {images} images screened; {args.repeat} rounds of their reports each")
    best = {"before": float("inf"), "now": float("inf")}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        write_round(results, out, operating_point, threshold)      # fonts, imports: not timed
        for _ in range(args.repeat):
            with as_before():
                best["before"] = min(best["before"], write_round(results, out, operating_point, threshold))
            best["now"] = min(best["now"], write_round(results, out, operating_point, threshold))
    for name, label in (("before", "0.3.6's drawing (baseline)"), ("now", "write_study_report")):
        per = best[name] / len(results)
        print(f"  {label:28s} {per * 1000:6.1f} ms a report ({1 / per:5.0f} reports/s from one writer)")
    print(f"  ratio {best['before'] / best['now']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
