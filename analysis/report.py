"""report.html: one self-contained page (plots and example images embedded as data URIs)."""

from __future__ import annotations

import base64
import html
import os
from typing import Any

from beam_pipelines.contracts import gallery

#: Plots shown across the page's whole width (the others two to a row).
WIDE_PLOTS = ("Training history",)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _ci(pair: list | None) -> str:
    return f"{pair[0]:.3f}–{pair[1]:.3f}" if pair else "–"


def _data_uri(path: str) -> str:
    with open(path, "rb") as handle:
        return "data:image/png;base64," + base64.b64encode(handle.read()).decode("ascii")


def _image(path: str, alt: str) -> str:
    wide = ' class="wide"' if alt in WIDE_PLOTS else ""
    return f'<figure{wide}><img alt="{html.escape(alt)}" src="{_data_uri(path)}"></figure>'


def _case(folder: str, image: dict[str, Any], patient: str) -> str:
    """One example image with its caption: rank, score, truth, call, view, patient, path."""
    names = ("normal", "abnormal")
    caption = (
        f"#{image['rank']} · score <b>{image['score']:.3f}</b> · label "
        f"{names[image['label']]} · called {names[image['predicted']]} · view "
        f"{_fmt(image['view_position'] or '–')} · {patient} <code>{_fmt(image['patient_id'])}"
        f'</code><br><code class="path">{_fmt(image["dicom_path"])}</code>'
    )
    alt = f"{image['group']} {image['rank']}: {image['file']}"
    return (
        f'<figure class="case"><img alt="{html.escape(alt)}" '
        f'src="{_data_uri(os.path.join(folder, image["file"]))}">'
        f"<figcaption>{caption}</figcaption></figure>"
    )


def _gallery(folder: str, index: dict[str, Any]) -> str:
    """The example-cases section: each group of the gallery index, its images embedded."""
    if index["pseudonymized"]:
        patient = "patient (pseudonym)"
        ids = f"Patient ids and paths are pseudonyms (key {_fmt(index['pseudonymized'])})."
    else:
        patient = "patient"
        ids = "Patient ids and paths are the archive's own (the data was not pseudonymized)."
    parts = [
        f"<h2>Example cases</h2><p>Split <b>{_fmt(index['split'])}</b>, called abnormal at "
        f"score &ge; {index['threshold']:.3f} ({_fmt(index['threshold_source'])}). Left: the "
        "model's input; right: its Grad-CAM heat map (layers "
        f"<code>{_fmt(', '.join(index['layers']))}</code>): warm colours mark where the "
        f"features that raised the score lie. {ids}</p>"
    ]
    for group in gallery.GROUPS:
        counts = index["groups"][group]
        images = [image for image in index["images"] if image["group"] == group]
        parts.append(
            f"<h3>{gallery.TITLES[group]} <small>({counts['shown']} of "
            f"{counts['available']} in the split)</small></h3>"
        )
        cases = "".join(_case(folder, image, patient) for image in images)
        parts.append(f'<div class="cases">{cases}</div>' if cases else "<p>None.</p>")
    return "".join(parts)


def render(
    metrics: dict[str, Any],
    plot_files: dict[str, str],
    examples: tuple[str, dict[str, Any]] | None = None,
) -> str:
    """The report page for a metrics.json document, its plot files and an example gallery.

    Args:
        examples: (the gallery folder, its index: :mod:`beam_pipelines.contracts.gallery`).
    """
    headline = metrics["metrics"]
    ci = headline.get("ci95", {})
    rows = [
        ("ROC AUC", _fmt(headline["roc_auc"]), _ci(ci.get("auc"))),
        (
            "Average precision",
            _fmt(headline["average_precision"]),
            _ci(ci.get("average_precision")),
        ),
        ("Sensitivity", _fmt(headline["sensitivity"]), _ci(ci.get("sensitivity"))),
        ("Specificity", _fmt(headline["specificity"]), _ci(ci.get("specificity"))),
        ("PPV", _fmt(headline["ppv"]), ""),
        ("NPV", _fmt(headline["npv"]), ""),
        ("Accuracy", _fmt(headline["accuracy"]), ""),
        ("F1", _fmt(headline["f1"]), ""),
        ("Brier score", _fmt(headline["calibration"]["brier"]), ""),
        ("Expected calibration error", _fmt(headline["calibration"]["ece"]), ""),
    ]
    metric_rows = "".join(f"<tr><td>{a}</td><td>{b}</td><td>{c}</td></tr>" for a, b, c in rows)
    subgroup_rows = "".join(
        f"<tr><td>{_fmt(r['attribute'])}</td><td>{_fmt(r['value'])}</td><td>{r['n']}</td>"
        f"<td>{_fmt(r['prevalence'])}</td><td>{_fmt(r['roc_auc'])}</td>"
        f"<td>{_ci(r.get('roc_auc_ci95'))}</td><td>{_fmt(r['sensitivity'])}</td>"
        f"<td>{_fmt(r['specificity'])}</td></tr>"
        for r in metrics["subgroups"]
    )
    provenance = metrics["provenance"]
    warnings = "".join(f'<p class="warn">⚠ {html.escape(w)}</p>' for w in metrics["warnings"])
    figures = "".join(_image(path, name) for name, path in plot_files.items())
    gallery_section = _gallery(*examples) if examples is not None else ""
    cases = (
        f"{headline['n']} cases from {headline['patients']} patients, "
        f"prevalence {_fmt(headline['prevalence'])}"
    )
    files = _fmt(", ".join(provenance["prediction_files"]))
    rows_read = f"{_fmt(provenance['rows'])} / {_fmt(provenance['rows_per_split'])}"
    digest = _fmt(provenance.get("manifest_sha256"))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>X-ray classifier report: {html.escape(str(provenance.get("model_ids")))}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
th {{ background: #f0f3f7; }} td:first-child {{ text-align: left; }}
figure {{ display: inline-block; margin: 0.5em; }} img {{ max-width: 520px; }}
figure.wide {{ display: block; margin: 0.5em 0; }}
figure.wide img {{ width: 100%; max-width: 100%; }}
.cases {{ display: flex; flex-wrap: wrap; }} figure.case img {{ max-width: none; }}
figure.case {{ width: 452px; font-size: 0.85em; }} code.path {{ font-size: 0.8em; color: #555; }}
.warn {{ color: #a40000; font-weight: bold; }} code {{ font-size: 0.9em; }}
</style></head><body>
<h1>Normal / abnormal classifier: evaluation report</h1>
{warnings}
<p>Evaluated split <b>{_fmt(metrics["split"])}</b> at <b>{_fmt(metrics["level"])}</b> level:
{cases}.
Threshold {_fmt(headline["threshold"])} ({html.escape(metrics["threshold"]["rule"])},
chosen on {html.escape(metrics["threshold"]["chosen_on"])}).
95% intervals: {metrics["bootstrap"]["replicates"]} bootstrap resamples of patients.</p>
<h2>Headline metrics</h2>
<table><tr><th>metric</th><th>value</th><th>95% CI</th></tr>{metric_rows}</table>
<h2>Plots</h2>{figures}
{gallery_section}
<h2>Subgroups</h2>
<table><tr><th>attribute</th><th>value</th><th>n</th><th>prevalence</th><th>AUC</th>
<th>95% CI</th><th>sensitivity</th><th>specificity</th></tr>{subgroup_rows}</table>
<h2>Data and provenance</h2>
<table>
<tr><td>Model id(s)</td><td>{_fmt(", ".join(provenance["model_ids"]))}</td></tr>
<tr><td>Prediction files</td><td><code>{files}</code></td></tr>
<tr><td>Rows read / per split</td><td>{rows_read}</td></tr>
<tr><td>Data manifest SHA-256</td><td><code>{digest}</code></td></tr>
</table>
</body></html>
"""


def write(
    path: str,
    metrics: dict[str, Any],
    plot_files: dict[str, str],
    examples: tuple[str, dict[str, Any]] | None = None,
) -> str:
    """Writes the report; returns its path."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(render(metrics, plot_files, examples))
    return path
