"""Evaluation reports as Markdown: one model, a comparison, a model card section."""

from __future__ import annotations

import json
import posixpath

from raysst.storage import local_dir

FIGURES = {"confusion": "confusion_matrix.png", "reliability": "reliability_diagram.png",
           "length": "accuracy_by_length.png", "per_label": "per_label_f1.png", "scatter": "scatter.png"}
ALT = {"confusion": "Confusion matrix", "reliability": "Reliability diagram", "length": "Accuracy by length",
       "per_label": "Per-label F1", "scatter": "Predicted against gold"}
FIGURES_BY_KIND = {"single": ("confusion", "reliability", "length"), "multi-label": ("per_label",),
                   "regression": ("scatter",)}
CURVES = "training_curves.png"


def figures_for(report: dict) -> dict:
    """The figures of a report's task kind, {kind: file name}."""
    return {k: FIGURES[k] for k in FIGURES_BY_KIND[report.get("task", {}).get("kind", "single")]}


def _kind(report: dict) -> str:
    return report.get("task", {}).get("kind", "single")


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
    rows = report.get("rows", {})
    not_scored = ", ".join(f"{n} {s}" for s, n in rows.get("not_scored", {}).items()) or "none"
    task = report.get("task", {"kind": "single"})
    head = [
        f"# Evaluation of `{report.get('model', 'model')}`",
        f"Data: `{report.get('data', '?')}`, gold labels from column `{report.get('label_column', 'label')}`; "
        f"task: {task['kind']}" + (f" ({', '.join(map(str, task['labels']))})" if task["kind"] != "regression"
                                   else "") + f". {report['n']} rows evaluated"
        + (f" of {rows['total']}; not scored: {not_scored}; truncated to the maximum sequence length "
           f"(scored on their start): {rows['truncated']}." if rows else ".")
        + (f" Scores computed in {report['precision']}." if "precision" in report else ""),
        "## Summary"]
    body = {"single": _single_md, "multi-label": _multi_md, "regression": _regression_md}[task["kind"]]
    return "\n\n".join(head + body(report, figures)) + "\n"


def _single_md(report: dict, figures: dict) -> list:
    cal, cm, mistakes = report["calibration"], report["confusion_matrix"], report["most_confident_mistakes"]
    names = cm["labels"]
    return [
        _table(["Metric", "Value"], [
            ["Accuracy", f"{report['accuracy']:.4f} (95% CI {_ci(report['accuracy_ci95'])}, Wilson score)"],
            ["Macro F1", f"{report['macro_f1']:.4f}"],
            [f"Expected calibration error ({cal['n_bins']} bins)", f"{cal['ece']:.4f}"],
            ["Brier score", f"{cal['brier']:.4f}"]]),
        "## Per class",
        _per_label_table(report["per_class"], "Class"),
        "## Confusion matrix",
        "Rows are the gold labels, columns the predictions.",
        _table(["gold \\ predicted", *names], [[g, *row] for g, row in zip(names, cm["matrix"])]),
        f"![Confusion matrix]({figures['confusion']})",
        "## Calibration",
        "Confidence is the probability the model gives its predicted label. The expected calibration error "
        f"is the row-weighted mean gap between accuracy and mean confidence over {cal['n_bins']} equal-width "
        "confidence bins (0 is perfectly calibrated). The Brier score is the mean squared difference between "
        "the class probabilities and the one-hot gold label, over rows and classes (with two classes, that of "
        "one class's probability against 0 or 1): 0 is perfect, 0.25 is a constant 0.5 on two classes.",
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


def _multi_md(report: dict, figures: dict) -> list:
    per_row = report["labels_per_row"]
    return [
        _table(["Metric", "Value"], [
            [f"Micro F1 (threshold {report['threshold']:g})", f"{report['micro_f1']:.4f}"],
            ["Macro F1", f"{report['macro_f1']:.4f}"],
            ["Subset accuracy (every label right)", f"{report['subset_accuracy']:.4f}"],
            ["Labels per row, gold / predicted", f"{per_row['gold']:.2f} / {per_row['predicted']:.2f}"]]),
        "## Per label", _per_label_table(report["per_label"], "Label"),
        f"![Per-label F1]({figures['per_label']})"]


def _regression_md(report: dict, figures: dict) -> list:
    worst = report["largest_errors"]
    return [
        _table(["Metric", "Value"], [[m.capitalize() if m in ("pearson", "spearman") else m.upper(),
                                      f"{report[m]:.4f}"] for m in ("pearson", "spearman", "mse", "mae")]),
        f"Gold values range from {report['gold_range'][0]:g} to {report['gold_range'][1]:g}.",
        f"![Predicted against gold]({figures['scatter']})",
        f"## The {len(worst)} largest errors",
        _table(["#", "Text", "Gold", "Predicted", "Error"],
               [[i + 1, _cell(m["text"]), f"{m['gold']:.4g}", f"{m['predicted']:.4g}", f"{m['error']:.4g}"]
                for i, m in enumerate(worst)], left=2)]


def _per_label_table(per: dict, what: str) -> str:
    return _table([what, "Precision", "Recall", "F1", "Support"],
                  [[n, f"{c['precision']:.4f}", f"{c['recall']:.4f}", f"{c['f1']:.4f}", c["support"]]
                   for n, c in per.items()])


def summary(report: dict) -> dict:
    """The headline figures of one report, flat, for side-by-side tables."""
    kind = _kind(report)
    row = {"rows evaluated": report["n"]}
    if kind == "regression":
        return {**row, **{m: report[m] for m in ("pearson", "spearman", "mse", "mae")}}
    if kind == "multi-label":
        row.update({m: report[m] for m in ("micro_f1", "macro_f1", "subset_accuracy")})
        return {**row, **{f"f1 {n}": c["f1"] for n, c in report["per_label"].items()}}
    row.update({"accuracy": report["accuracy"], "accuracy 95% CI": report["accuracy_ci95"],
                "macro F1": report["macro_f1"]})
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
    link = lambda name: posixpath.join(eval_dir, name)  # noqa: E731
    kind = _kind(report)
    if kind == "single":
        cal = report["calibration"]
        line = (f"accuracy **{report['accuracy']:.2%}** (95% CI {report['accuracy_ci95'][0]:.2%} to "
                f"{report['accuracy_ci95'][1]:.2%}), macro F1 {report['macro_f1']:.4f},\nexpected calibration "
                f"error {cal['ece']:.4f} ({cal['n_bins']} bins), Brier score {cal['brier']:.4f}.\nPer-class scores, "
                "the confusion matrix, calibration, accuracy by length and the most confident mistakes are in")
    elif kind == "multi-label":
        line = (f"micro F1 **{report['micro_f1']:.4f}**, macro F1 {report['macro_f1']:.4f} at threshold "
                f"{report['threshold']:g}, subset accuracy {report['subset_accuracy']:.4f}.\nPer-label scores are in")
    else:
        line = (f"Pearson **{report['pearson']:.4f}**, Spearman {report['spearman']:.4f}, MSE {report['mse']:.4g}, "
                f"MAE {report['mae']:.4g}.\nThe scatter plot and the largest errors are in")
    pictures = "\n".join(f"![{ALT[k]}]({link(name)})" for k, name in figures_for(report).items())
    return f"""## Evaluation report

On the validation set ({report['n']} rows): {line}
[{link('report.md')}]({link('report.md')}); the figures as JSON in [{link('report.json')}]({link('report.json')}).

![Training curves]({link(CURVES)})
{pictures}
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
