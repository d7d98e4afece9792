"""Evaluation reports as Markdown: one model, a comparison, a model card section."""

from __future__ import annotations

import json
import posixpath

from raysst.storage import local_dir

FIGURES = {"confusion": "confusion_matrix.png", "reliability": "reliability_diagram.png",
           "length": "accuracy_by_length.png"}
CURVES = "training_curves.png"


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _ci(ci) -> str:
    return "n/a" if ci[0] is None else f"{ci[0]:.4f} to {ci[1]:.4f}"


def _cell(text: str) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").replace("\r", " ")


def _table(header: list, rows: list, left: int = 1) -> str:
    """A Markdown table; the first `left` columns are left-aligned (labels, text), the rest right (numbers)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] * left + ["---:"] * (len(header) - left)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def report_markdown(report: dict, figures: dict = FIGURES) -> str:
    """report.md: every figure of report.json next to its picture, readable without the JSON."""
    rows, cal, cm = report.get("rows", {}), report["calibration"], report["confusion_matrix"]
    not_scored = ", ".join(f"{n} {s}" for s, n in rows.get("not_scored", {}).items()) or "none"
    names = cm["labels"]
    mistakes = report["most_confident_mistakes"]
    parts = [
        f"# Evaluation of `{report.get('model', 'model')}`",
        f"Data: `{report.get('data', '?')}`, gold labels from column `{report.get('label_column', 'label')}`. "
        f"{report['n']} rows evaluated"
        + (f" of {rows['total']}; not scored: {not_scored}; truncated to the maximum sequence length "
           f"(scored on their start): {rows['truncated']}." if rows else ".")
        + (f" Scores computed in {report['precision']}." if "precision" in report else ""),
        "## Summary",
        _table(["Metric", "Value"], [
            ["Accuracy", f"{report['accuracy']:.4f} (95% CI {_ci(report['accuracy_ci95'])}, Wilson score)"],
            ["Macro F1", f"{report['macro_f1']:.4f}"],
            [f"Expected calibration error ({cal['n_bins']} bins)", f"{cal['ece']:.4f}"],
            ["Brier score", f"{cal['brier']:.4f}"]]),
        "## Per class",
        _table(["Class", "Precision", "Recall", "F1", "Support"],
               [[n, f"{c['precision']:.4f}", f"{c['recall']:.4f}", f"{c['f1']:.4f}", c["support"]]
                for n, c in report["per_class"].items()]),
        "## Confusion matrix",
        "Rows are the gold labels, columns the predictions.",
        _table(["gold \\ predicted", *names], [[g, *row] for g, row in zip(names, cm["matrix"])]),
        f"![Confusion matrix]({figures['confusion']})",
        "## Calibration",
        "Confidence is the probability the model gives its predicted label. The expected calibration error "
        f"is the row-weighted mean gap between accuracy and mean confidence over {cal['n_bins']} equal-width "
        "confidence bins (0 is perfectly calibrated). The Brier score is the mean squared difference between "
        "the probability of `positive` and the gold label (0 or 1): 0 is perfect, 0.25 is a constant 0.5.",
        _table(["Confidence", "Rows", "Accuracy", "Mean confidence", "Gap"],
               [[f"({b['lo']:.1f}, {b['hi']:.1f}]", b["count"], _pct(b["accuracy"]), _pct(b["confidence"]),
                 f"{b['confidence'] - b['accuracy']:+.4f}"] for b in cal["bins"] if b["count"]]),
        f"![Reliability diagram]({figures['reliability']})",
        "## Accuracy by length",
        f"Length in {report['accuracy_by_length']['unit']}.",
        _table(["Words", "Rows", "Accuracy", "95% CI"],
               [[b["words"], b["count"], _pct(b["accuracy"]), _ci(b["ci95"])]
                for b in report["accuracy_by_length"]["buckets"]]),
        f"![Accuracy by length]({figures['length']})",
        f"## The {len(mistakes)} most confident mistakes",
        _table(["#", "Text", "Gold", "Predicted", "Confidence"],
               [[i + 1, _cell(m["text"]), m["gold"], m["predicted"], f"{m['confidence']:.4f}"]
                for i, m in enumerate(mistakes)], left=4) if mistakes else "No mistakes.",
    ]
    return "\n\n".join(parts) + "\n"


def summary(report: dict) -> dict:
    """The headline figures of one report, flat, for side-by-side tables."""
    row = {"rows evaluated": report["n"], "accuracy": report["accuracy"],
           "accuracy 95% CI": report["accuracy_ci95"], "macro F1": report["macro_f1"]}
    for name, c in report["per_class"].items():
        row.update({f"{m} {name}": c[m] for m in ("precision", "recall", "f1")})
    row.update({"ECE (lower is better)": report["calibration"]["ece"],
                "Brier score (lower is better)": report["calibration"]["brier"]})
    row.update({f"accuracy, {b['words']} words": b["accuracy"] for b in report["accuracy_by_length"]["buckets"]
                if b["count"]})
    return row


def write_comparison(reports: dict, out_dir: str) -> str:
    """comparison.md and comparison.json: one column per model, then each model's difference to the first."""
    names = list(reports)
    rows = {n: summary(r) for n, r in reports.items()}
    first = names[0]
    header = ["Metric", *names, *(f"{n} - {first}" for n in names[1:])]
    table = [["model", *(f"`{reports[n].get('model', n)}`" for n in names), *([""] * (len(names) - 1))]]
    for metric in rows[first]:
        values = [rows[n].get(metric) for n in names]
        fmt = {"rows evaluated": str, "accuracy 95% CI": _ci}.get(metric, _pct)
        deltas = ["" if v is None or values[0] is None or metric in ("rows evaluated", "accuracy 95% CI")
                  else f"{v - values[0]:+.4f}" for v in values[1:]]
        table.append([metric, *map(fmt, values), *deltas])
    table.append(["full report", *(f"[{n}/report.md]({n}/report.md)" for n in names), *([""] * (len(names) - 1))])
    data = reports[first].get("data", "?")
    md = (f"# Model comparison\n\nData: `{data}`. One column per model; the last columns are each model's "
          f"difference to `{first}` (positive means higher).\n\n{_table(header, table)}\n")
    with local_dir(out_dir) as out:
        (out / "comparison.md").write_text(md)
        (out / "comparison.json").write_text(json.dumps(
            {"data": data, "models": {n: {"model": reports[n].get("model"), **rows[n]} for n in names}}, indent=2))
    return md


def card_section(report: dict, eval_dir: str = "eval") -> str:
    """The model card's evaluation section, with links relative to the model directory."""
    cal = report["calibration"]
    link = lambda name: posixpath.join(eval_dir, name)  # noqa: E731
    return f"""## Evaluation report

On the validation set ({report['n']} sentences): accuracy **{report['accuracy']:.2%}**
(95% CI {report['accuracy_ci95'][0]:.2%} to {report['accuracy_ci95'][1]:.2%}), macro F1 {report['macro_f1']:.4f},
expected calibration error {cal['ece']:.4f} ({cal['n_bins']} bins), Brier score {cal['brier']:.4f}.
Per-class scores, calibration, accuracy by length and the most confident mistakes are in
[{link('report.md')}]({link('report.md')}); the figures as JSON in [{link('report.json')}]({link('report.json')}).

![Training curves]({link(CURVES)})
![Confusion matrix]({link(FIGURES['confusion'])})
![Reliability diagram]({link(FIGURES['reliability'])})
![Accuracy by length]({link(FIGURES['length'])})
"""


def with_card_section(card: str, section: str, before: str = "## Intended uses and limitations") -> str:
    """The model card with `section` in place of an earlier one of the same heading, else just before `before`."""
    heading = section.split("\n", 1)[0]
    if heading in card:  # a rerun replaces its section instead of adding a second one
        start = card.index(heading)
        end = card.find("\n## ", start + len(heading))
        card = card[:start] + card[end + 1:] if end >= 0 else card[:start]
    if before in card:
        return card.replace(before, section + "\n" + before, 1)
    return card.rstrip() + "\n\n" + section
