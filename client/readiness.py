"""Site readiness report: what a prepared site cache holds, as aggregates only.

Hospital IT and an ethics board read it to see what was kept, what was rejected and
why, and what the kept images look like (modality, vendor, photometric, bit depth,
size, pixel spacing, transfer syntax, label prevalence) -- without any per-image row,
file name, hashed id, UID or patient attribute.  :func:`shareable_summary` takes the
subset a site may send to the coordinator before round 1, and
:func:`compare_summaries` turns several sites' summaries into compatibility warnings.

Small cells
-----------
Every count below ``min_cell`` (default 5) is suppressed:

* categories drawn from a fixed vocabulary (reason codes, class names) keep their name
  and show ``"<5"`` instead of the count; when exactly one such cell would be hidden,
  the next smallest cell is hidden too (``"suppressed"``), so the total does not give
  the hidden count away;
* categories drawn from the data (manufacturer, model, modality, ...) with a small count
  are merged into one ``"other (suppressed)"`` cell, whose own count is shown only when
  it reaches ``min_cell``.

Zero counts of a class are shown (a class absent at a site is what the coordinator
must know).  Totals (inputs, accepted, rejected) are exact.

Typical use (what ``fedrad site prepare`` / ``check`` run after preparing)::

    report = build_readiness(cache_dir)              # or (records, quarantine, meta)
    json_path, html_path, md_path = write_readiness(report, cache_dir)
    summary_path = write_shareable_summary(report, cache_dir)
    logger.info("%s", readiness_text(report))
"""

from __future__ import annotations

import html
import json
import logging
import math
import operator
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fedrad.common.cache import MANIFEST_FILE, read_quarantine

__all__ = [
    "READINESS_JSON",
    "READINESS_HTML",
    "READINESS_MD",
    "SUMMARY_JSON",
    "REASON_EXPLANATIONS",
    "DISTRIBUTIONS",
    "OTHER",
    "UNKNOWN",
    "build_readiness",
    "write_readiness",
    "shareable_summary",
    "write_shareable_summary",
    "compare_summaries",
    "readiness_text",
    "render_html",
    "render_markdown",
    "bar_chart_svg",
]

logger = logging.getLogger(__name__)

READINESS_JSON = "readiness.json"
READINESS_HTML = "readiness.html"
READINESS_MD = "readiness.md"
SUMMARY_JSON = "site-summary.json"
REPORT_FORMAT_VERSION = 1

OTHER = "other (suppressed)"
UNKNOWN = "unknown"
_SECONDARY = "suppressed"

#: Plain-language explanation of every reason code a rejected input may carry.
REASON_EXPLANATIONS: dict[str, str] = {
    "missing-file": "The labels file names a file (or SOP Instance UID) that is not in the "
                    "DICOM folder, or the file vanished while it was being read.",
    "unreadable": "The operating system refused to read the file (permissions or a disk "
                  "error).",
    "empty-file": "The file is empty (0 bytes); the export from PACS probably failed.",
    "not-dicom": "The file is not a DICOM file (for example a text note, a spreadsheet or a "
                 "JPEG picture).",
    "truncated": "The DICOM file ends early: it was cut off during copy or export.",
    "corrupt": "The DICOM header is damaged or an attribute needed to read the image is "
               "missing or invalid.",
    "no-pixel-data": "The DICOM object holds no image (a structured report, a dose report, "
                     "a treatment plan, a DICOMDIR index...).",
    "undecodable": "The image is stored in an encoding this installation cannot decode.",
    "unsupported-layout": "The image layout (colour model, samples per pixel or shape) is "
                          "not one fedrad can turn into a greyscale picture.",
    "too-large": "The image claims more pixels than the configured safety limit.",
    "too-small": "The image is smaller than the configured minimum size.",
    "modality-not-allowed": "The image comes from a modality that is not on the site's "
                            "allow-list (for example a CT slice in a chest X-ray study).",
    "burned-in-annotation": "The file declares burned-in annotation (text such as a name "
                            "may be printed into the pixels); such images are kept out by "
                            "default.",
    "timeout": "Decoding took longer than the per-file time limit.",
    "outside-folder": "The file is a link pointing outside the DICOM folder; it was not "
                      "followed.",
    "broken-link": "The file is a link whose target does not exist.",
    "worker-crashed": "Decoding the file crashed its worker process twice; it was set aside.",
    "not-a-file": "The path is not a regular file (for example a folder named like a "
                  "DICOM file).",
    "bad-row": "A row of the labels file names neither a file nor a SOP Instance UID.",
    "bad-label": "The label is not one of the study's classes, or two labels rows give the "
                 "same image different labels.",
    "unlabelled": "The image has no row in the labels file, so it cannot be used for "
                  "training.",
    "duplicate": "Another file with the same SOP Instance UID (the same image) is already "
                 "in the cache; the copy is left out.",
    "preprocess-failed": "The image decoded but preprocessing failed; this is a fedrad bug "
                         "to report with the local log.",
    "disk-full": "The disk filled up while writing the cache.",
}
_GENERIC_EXPLANATION = ("Rejected with this reason code; the local quarantine log "
                        "(quarantine.jsonl) gives the details for each file.")

#: Report distributions: key -> (title, record field(s) read).
DISTRIBUTIONS: dict[str, str] = {
    "modality": "Modality",
    "manufacturer": "Manufacturer",
    "model": "Device model",
    "photometric": "Photometric interpretation",
    "bits_stored": "Bits stored per pixel",
    "image_size": "Source image size (rows x columns, bucketed)",
    "pixel_spacing": "Pixel spacing (bucketed)",
    "frames": "Frames per object",
    "transfer_syntax": "Transfer syntax (encoding)",
}
#: Distributions whose buckets have a natural order (kept in that order, not by count).
_ORDERED = ("bits_stored", "image_size", "pixel_spacing", "frames")

_SIZE_EDGES = (256, 512, 1024, 2048, 3072, 4096)
_SPACING_EDGES = (0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
_CODE_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
_MAX_TEXT = 64


# ----------------------------------------------------------------------- bucketing


def _text(value: Any) -> str:
    """A record's free-text value as a short, clean category name (``unknown`` if empty)."""
    if value is None:
        return UNKNOWN
    if isinstance(value, (list, tuple)):
        value = "\\".join(str(v) for v in value)
    text = " ".join(str(value).split())
    text = "".join(ch for ch in text if ch.isprintable())
    return text[:_MAX_TEXT] if text else UNKNOWN


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    if isinstance(value, str):
        value = value.split("\\")[0].strip()
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _range_label(value: float, edges: Sequence[float], unit: str = "",
                 fmt: str = "{:g}") -> tuple[int, str]:
    """(order, label) of the bucket ``value`` falls into."""
    for i, edge in enumerate(edges):
        if value < edge:
            low = fmt.format(edges[i - 1]) if i else None
            high = fmt.format(edge)
            label = f"< {high}{unit}" if low is None else f"{low}-{high}{unit}"
            return i, label
    return len(edges), f">= {fmt.format(edges[-1])}{unit}"


def _size_bucket(value: Any) -> tuple[int, str] | None:
    number = _number(value)
    if number is None or number <= 0:
        return None
    edges = _SIZE_EDGES
    for i, edge in enumerate(edges):
        if number < edge:
            return i, (f"< {edge}" if i == 0 else f"{edges[i - 1]}-{edge - 1}")
    return len(edges), f">= {edges[-1]}"


def _bucket(key: str, record: Mapping[str, Any]) -> tuple[tuple[int, str], str]:
    """(sort key, category name) of one record for distribution ``key``."""
    if key == "image_size":
        rows, cols = _size_bucket(record.get("rows")), _size_bucket(record.get("cols"))
        if rows is None or cols is None:
            return (99, ""), UNKNOWN
        return (rows[0] * 10 + cols[0], ""), f"{rows[1]} x {cols[1]}"
    if key == "pixel_spacing":
        spacing = _number(record.get("pixel_spacing"))
        if spacing is None or spacing <= 0:
            return (99, ""), UNKNOWN
        order, label = _range_label(spacing, _SPACING_EDGES, " mm")
        return (order, ""), label
    if key == "bits_stored":
        bits = _number(record.get("bits_stored"))
        if bits is None or not bits.is_integer() or not 1 <= bits <= 64:
            return (99, ""), UNKNOWN
        return (int(bits), ""), f"{int(bits)} bits"
    if key == "frames":
        frames = _number(record.get("frames"))
        if frames is None or frames < 1:
            return (99, ""), UNKNOWN
        if frames == 1:
            return (0, ""), "1 (single frame)"
        return ((1, "") if frames <= 10 else (2, "")), ("2-10" if frames <= 10 else "> 10")
    if key == "transfer_syntax":
        return (0, ""), _syntax_name(record.get("transfer_syntax"))
    if key == "modality":
        name = _text(record.get("modality"))
        return (0, ""), (name.upper() if name != UNKNOWN else name)
    return (0, ""), _text(record.get(key))


def _syntax_name(value: Any) -> str:
    """Name of a transfer syntax UID; never the UID itself."""
    if value is None or not str(value).strip():
        return UNKNOWN
    text = str(value).strip()
    if not re.fullmatch(r"[0-9.]+", text):
        return _text(text)  # already a name
    from pydicom.uid import UID

    uid = UID(text)
    if uid.is_transfer_syntax and uid.name != text:
        return str(uid.name)
    return "non-standard transfer syntax"


# ----------------------------------------------------------------------- suppression


def _cell(name: str, count: int | None, display: str | None = None) -> dict[str, Any]:
    return {"name": name, "count": count,
            "display": display if display is not None else str(count)}


def _small(min_cell: int) -> str:
    return f"<{min_cell}"


def _suppress_fixed(counts: Sequence[tuple[str, int]], min_cell: int) -> list[dict[str, Any]]:
    """Cells of a fixed vocabulary: names kept, small non-zero counts hidden."""
    cells = [_cell(name, n) for name, n in counts]
    hidden = [c for c in cells if 0 < c["count"] < min_cell]
    for c in hidden:
        c["count"], c["display"] = None, _small(min_cell)
    if len(hidden) == 1:  # secondary suppression: the total would give it away
        shown = [c for c in cells if c["count"]]
        if shown:
            smallest = min(shown, key=lambda c: c["count"])
            smallest["count"], smallest["display"] = None, _SECONDARY
    return cells


def _suppress_open(counter: Counter[str], order: Mapping[str, tuple[int, str]] | None,
                   min_cell: int) -> list[dict[str, Any]]:
    """Cells of a data-driven vocabulary: small categories merged into :data:`OTHER`."""
    kept = {name: n for name, n in counter.items() if n >= min_cell}
    merged = sum(n for name, n in counter.items() if n < min_cell)
    if order is not None:
        names = sorted(kept, key=lambda k: (k == UNKNOWN, order[k], k))
    else:
        names = sorted(kept, key=lambda k: (k == UNKNOWN, -kept[k], k))
    cells = [_cell(name, kept[name]) for name in names]
    if merged:
        cells.append(_cell(OTHER, merged) if merged >= min_cell
                     else _cell(OTHER, None, _small(min_cell)))
    return cells


# ----------------------------------------------------------------------- building


def _load(source: str | os.PathLike[str] | tuple[Any, Any, Any]
          ) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]], Mapping[str, Any]]:
    if isinstance(source, tuple):
        if len(source) != 3:
            raise ValueError("source must be a cache folder or (records, quarantine, meta)")
        records, quarantine, meta = source
        return list(records or []), list(quarantine or []), dict(meta or {})
    path = Path(source)
    if not path.is_dir():
        raise FileNotFoundError(f"cache folder {path} does not exist; run 'fedrad site "
                                "prepare' first")
    meta: dict[str, Any] = {}
    manifest = path / MANIFEST_FILE
    if manifest.is_file():
        with open(manifest, encoding="utf-8") as f:
            meta = json.load(f)
    records = list(meta.pop("records", []) or [])
    return records, read_quarantine(path), meta


def _reason_code(record: Mapping[str, Any]) -> str:
    code = str(record.get("code") or "")
    return code if _CODE_RE.fullmatch(code) else "other"


def _label_index(value: Any) -> int | None:
    """A record's label as a Python int (numpy integers included), else None."""
    try:
        return operator.index(value)
    except TypeError:
        return None


def _class_names(meta: Mapping[str, Any], records: Iterable[Mapping[str, Any]]) -> list[str]:
    names = [str(n) for n in (meta.get("class_names") or [])]
    if names:
        return names
    num = meta.get("num_classes")
    labels = [lab for r in records if (lab := _label_index(r.get("label"))) is not None]
    n = int(num) if isinstance(num, int) else (max(labels) + 1 if labels else 0)
    return [f"class {i}" for i in range(n)]


def build_readiness(source: str | os.PathLike[str] | tuple[Any, Any, Any], *,
                    min_cell: int = 5) -> dict[str, Any]:
    """Aggregate a prepared site into a readiness report.

    Parameters
    ----------
    source:
        A cache folder (its ``manifest.json`` and ``quarantine.jsonl`` are read; a folder
        with only a quarantine log, as left when no image was usable, works too), or a
        ``(records, quarantine, meta)`` tuple as :func:`fedrad.client.prepare.prepare_site`
        builds them (for a dry run that writes no cache).  Missing record fields count as
        ``"unknown"``.
    min_cell:
        Counts below this are suppressed (see the module docstring).

    Returns
    -------
    dict
        JSON-ready report: ``totals``, ``rejected_by_reason``, ``labels``,
        ``distributions`` (cells ``{"name", "count", "display"}``; ``count`` is ``None``
        when suppressed), ``cache`` (image size, classes, settings fingerprint), ``site``
        (hashed) and ``min_cell``.  No per-image row, id, path or UID.

    Raises
    ------
    ValueError
        If ``min_cell`` is below 1 or the tuple has the wrong length.
    FileNotFoundError
        If the cache folder does not exist.
    """
    if min_cell < 1:
        raise ValueError(f"min_cell={min_cell!r} must be >= 1")
    records, quarantine, meta = _load(source)
    classes = _class_names(meta, records)

    reasons = Counter(_reason_code(q) for q in quarantine)
    rejected_cells = _suppress_fixed(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])),
                                     min_cell)
    for cell in rejected_cells:
        cell["explanation"] = REASON_EXPLANATIONS.get(cell["name"], _GENERIC_EXPLANATION)

    accepted = len(records)
    label_counts = Counter(_label_index(r.get("label")) for r in records)
    unknown_labels = sum(n for lab, n in label_counts.items()
                         if lab is None or not 0 <= lab < len(classes))
    if unknown_labels:
        logger.warning("%d cached records carry a label outside the %d classes", unknown_labels,
                       len(classes))
    label_cells = _suppress_fixed([(name, label_counts.get(i, 0))
                                   for i, name in enumerate(classes)], min_cell)
    for i, cell in enumerate(label_cells):
        cell["index"] = i
        cell["fraction"] = (round(cell["count"] / accepted, 4)
                            if cell["count"] is not None and accepted else None)

    distributions: dict[str, list[dict[str, Any]]] = {}
    for key in DISTRIBUTIONS:
        counter: Counter[str] = Counter()
        order: dict[str, tuple[int, str]] = {}
        for record in records:
            sort_key, name = _bucket(key, record)
            counter[name] += 1
            order[name] = sort_key
        distributions[key] = _suppress_open(counter, order if key in _ORDERED else None,
                                            min_cell)

    image_size = meta.get("image_size")
    return {
        "report": "fedrad site readiness",
        "format_version": REPORT_FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "site": str(meta["site"]) if meta.get("site") else None,
        "min_cell": int(min_cell),
        "cache": {
            "prepared": bool(meta.get("count") or records),
            "image_size": image_size,
            "class_names": classes,
            "settings_fingerprint": meta.get("settings_fingerprint"),
            "pipeline_version": meta.get("pipeline_version"),
            "preprocessing": {k: v for k, v in (meta.get("preprocessing") or {}).items()
                              if isinstance(v, (int, float, str, bool)) or v is None},
        },
        "totals": {"inputs": accepted + len(quarantine), "accepted": accepted,
                   "rejected": len(quarantine)},
        "rejected_by_reason": rejected_cells,
        "labels": label_cells,
        "distributions": distributions,
    }


# ----------------------------------------------------------------------- sharing


def shareable_summary(report: Mapping[str, Any]) -> dict[str, Any]:
    """The aggregate-only subset of a report a site may send to the coordinator.

    Holds the counts (inputs, accepted, rejected), the cache's image size, class names
    and settings fingerprint, class prevalence, the modality mix and the bucketed source
    image sizes, all with the report's small-cell suppression.  No vendor or model names.

    Parameters
    ----------
    report:
        A report from :func:`build_readiness`.

    Returns
    -------
    dict
        JSON-ready summary for :func:`compare_summaries`.
    """
    cache = report.get("cache", {})
    dists = report.get("distributions", {})
    return {
        "summary": "fedrad site summary",
        "format_version": REPORT_FORMAT_VERSION,
        "site": report.get("site"),
        "min_cell": report.get("min_cell"),
        "cache_image_size": cache.get("image_size"),
        "class_names": list(cache.get("class_names") or []),
        "settings_fingerprint": cache.get("settings_fingerprint"),
        "totals": dict(report.get("totals", {})),
        "labels": [{k: c.get(k) for k in ("name", "index", "count", "display", "fraction")}
                   for c in report.get("labels", [])],
        "modality": [dict(c) for c in dists.get("modality", [])],
        "image_size": [dict(c) for c in dists.get("image_size", [])],
        "photometric": [dict(c) for c in dists.get("photometric", [])],
    }


def write_shareable_summary(report: Mapping[str, Any], out_dir: str | os.PathLike[str]) -> Path:
    """Write :func:`shareable_summary` as ``site-summary.json`` in ``out_dir``; return it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return _write_text(out / SUMMARY_JSON,
                       json.dumps(shareable_summary(report), indent=1) + "\n")


def _site_name(summary: Mapping[str, Any], i: int) -> str:
    return f"site {summary['site']}" if summary.get("site") else f"site #{i + 1}"


def _dominant(cells: Sequence[Mapping[str, Any]]) -> str | None:
    shown = [c for c in cells if c.get("count") and c.get("name") not in (OTHER, UNKNOWN)]
    return max(shown, key=lambda c: c["count"])["name"] if shown else None


def compare_summaries(summaries: Sequence[Mapping[str, Any]], *,
                      prevalence_gap: float = 0.25, min_images: int = 20) -> list[str]:
    """Compatibility warnings for several sites' :func:`shareable_summary` outputs.

    Parameters
    ----------
    summaries:
        One summary per site.
    prevalence_gap:
        Warn when a class's share differs by more than this between two sites.
    min_images:
        Warn about a site with fewer accepted images.

    Returns
    -------
    list of str
        Plain-language warnings, empty when nothing stands out.
    """
    warnings: list[str] = []
    names = [_site_name(s, i) for i, s in enumerate(summaries)]

    def differs(key: str, what: str, fix: str) -> None:
        values = {json.dumps(s.get(key)) for s in summaries}
        if len(values) > 1:
            listed = "; ".join(f"{n}: {s.get(key)}" for n, s in zip(names, summaries, strict=True))
            warnings.append(f"{what} differ between sites ({listed}); {fix}")

    if len(summaries) >= 2:
        differs("cache_image_size", "Prepared image sizes",
                "every site must prepare with the same image-size setting.")
        differs("class_names", "Class names",
                "every site must use the same class-names setting, in the same order.")
        if len({s.get("settings_fingerprint") for s in summaries}) > 1:
            warnings.append("Preprocessing settings differ between sites (settings "
                            "fingerprints do not match); prepare every site with the same "
                            "settings.")
        for key, what in (("image_size", "source image size"), ("modality", "modality"),
                          ("photometric", "photometric interpretation")):
            dominant = {n: _dominant(s.get(key, [])) for n, s in zip(names, summaries,
                                                                    strict=True)}
            if len({d for d in dominant.values() if d is not None}) > 1:
                listed = "; ".join(f"{n}: {d}" for n, d in dominant.items() if d is not None)
                warnings.append(f"The most common {what} differs between sites ({listed}); "
                                "check the sites export comparable images.")
    for name, summary in zip(names, summaries, strict=True):
        accepted = int((summary.get("totals") or {}).get("accepted") or 0)
        if accepted < min_images:
            warnings.append(f"{name} has only {accepted} usable images (fewer than "
                            f"{min_images}); its updates will be noisy.")
        for cell in summary.get("labels", []):
            if cell.get("count") == 0:
                warnings.append(f"{name} has no image of class '{cell.get('name')}'; it "
                                "cannot learn or be evaluated on that class.")
    if len(summaries) >= 2:
        by_class: dict[str, list[tuple[str, float]]] = {}
        for name, summary in zip(names, summaries, strict=True):
            for cell in summary.get("labels", []):
                if cell.get("fraction") is not None:
                    by_class.setdefault(str(cell.get("name")), []).append(
                        (name, float(cell["fraction"])))
        for cls, shares in by_class.items():
            low, high = min(shares, key=lambda x: x[1]), max(shares, key=lambda x: x[1])
            if high[1] - low[1] > prevalence_gap:
                warnings.append(f"Prevalence of class '{cls}' differs widely: {high[1]:.0%} "
                                f"at {high[0]} but {low[1]:.0%} at {low[0]}; expect non-IID "
                                "training and check the labelling is consistent.")
    return warnings


# ----------------------------------------------------------------------- rendering


def bar_chart_svg(cells: Sequence[Mapping[str, Any]], *, title: str, min_cell: int = 5,
                  width: int = 640, standalone: bool = True) -> str:
    """A horizontal bar chart of ``cells`` as an SVG string.

    Suppressed cells are drawn as a dashed outline up to ``min_cell`` and labelled with
    their display text.  ``standalone=False`` leaves out the XML namespace, which SVG
    inlined in HTML does not need.
    """
    row, top, label_w, value_w = 24, 30, 220, 70
    bar_w = width - label_w - value_w - 10
    counts = [c["count"] for c in cells if c.get("count") is not None]
    scale = max(counts + [min_cell, 1])
    height = top + row * max(len(cells), 1) + 8
    esc = html.escape
    xmlns = ' xmlns="http://www.w3.org/2000/svg"' if standalone else ""
    parts = [f'<svg{xmlns} width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{esc(title)}" '
             'font-family="Helvetica, Arial, sans-serif" font-size="13">',
             f'<title>{esc(title)}</title>',
             f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
             f'<text x="4" y="18" font-size="14" font-weight="bold" fill="#1a1a1a">'
             f'{esc(title)}</text>']
    if not cells:
        parts.append(f'<text x="4" y="{top + 16}" fill="#555555">no data</text>')
    for i, cell in enumerate(cells):
        y = top + i * row
        name = str(cell.get("name"))
        short = name if len(name) <= 30 else name[:29] + "\u2026"
        parts.append(f'<text x="{label_w - 8}" y="{y + 16}" text-anchor="end" '
                     f'fill="#1a1a1a">{esc(short)}<title>{esc(name)}</title></text>')
        count = cell.get("count")
        if count is None:  # hidden: "<5" drawn up to its bound, a secondary one as a stub
            w = (max(2.0, bar_w * (min_cell - 1) / scale)
                 if cell.get("display") == _small(min_cell) else 24.0)
            parts.append(f'<rect x="{label_w}" y="{y + 4}" width="{w:.1f}" height="{row - 8}" '
                         'fill="#eeeeee" stroke="#888888" stroke-dasharray="3,2"/>')
            value_x = label_w + w + 6
        else:
            w = bar_w * count / scale
            fill = "#8a8a8a" if name in (OTHER, UNKNOWN) else "#2f6fb0"
            parts.append(f'<rect x="{label_w}" y="{y + 4}" width="{w:.1f}" height="{row - 8}" '
                         f'fill="{fill}"/>')
            value_x = label_w + w + 6
        parts.append(f'<text x="{value_x:.1f}" y="{y + 16}" fill="#1a1a1a">'
                     f'{esc(str(cell.get("display")))}</text>')
    parts.append("</svg>")
    return "".join(parts)


_CSS = """
body{font-family:Helvetica,Arial,sans-serif;max-width:900px;margin:2em auto;padding:0 1em;
color:#1a1a1a;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;
margin-top:1.8em}table{border-collapse:collapse;margin:.6em 0}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f2f2f2}td.n{text-align:right;white-space:nowrap}
.note{background:#f6f8fa;border-left:4px solid #2f6fb0;padding:.6em 1em}
.kpi{display:inline-block;margin:0 1.5em .5em 0;font-size:1.1em}
.kpi b{font-size:1.6em;display:block}pre{background:#f6f8fa;padding:.8em;overflow:auto;
font-size:.85em}svg{max-width:100%;height:auto}
"""


def _table(cells: Sequence[Mapping[str, Any]], headers: Sequence[str],
           extra: Sequence[str] = ()) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    rows = []
    for c in cells:
        cols = [f"<td>{esc(str(c.get('name')))}</td>",
                f"<td class=\"n\">{esc(str(c.get('display')))}</td>"]
        for key in extra:
            value = c.get(key)
            if key == "fraction":
                value = "" if value is None else f"{value:.1%}"
            cols.append(f"<td>{esc('' if value is None else str(value))}</td>")
        rows.append("<tr>" + "".join(cols) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def render_html(report: Mapping[str, Any]) -> str:
    """The report as one self-contained HTML page (inline CSS and SVG; no script, no link)."""
    esc = html.escape
    min_cell = int(report.get("min_cell", 5))
    totals = report.get("totals", {})
    cache = report.get("cache", {})
    site = report.get("site")
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>fedrad site readiness report{esc(' - ' + site) if site else ''}</title>",
           f"<style>{_CSS}</style></head><body>",
           "<h1>Site readiness report</h1>",
           f"<p>Site (hashed name): <b>{esc(str(site or 'not recorded'))}</b>. "
           f"Created {esc(str(report.get('created', '')))}. "
           f"Images are prepared at {esc(str(cache.get('image_size')))} pixels; classes: "
           f"{esc(', '.join(cache.get('class_names') or []) or 'none')}.</p>",
           '<p class="note">This page shows <b>only counts</b> of the images this site '
           "prepared for federated training: no file names, patient details, identifiers or "
           f"images. Any count below {min_cell} is hidden (shown as &lt;{min_cell}, or merged "
           f"into &ldquo;{esc(OTHER)}&rdquo;), and when hiding one count would let it be "
           "worked out from the total, a second one is hidden too. The file-by-file log of "
           "rejected inputs stays on this site in <code>quarantine.jsonl</code>.</p>",
           "<h2>What was kept</h2>",
           f'<div class="kpi"><b>{esc(str(totals.get("inputs", 0)))}</b>inputs examined</div>',
           f'<div class="kpi"><b>{esc(str(totals.get("accepted", 0)))}</b>images kept</div>',
           f'<div class="kpi"><b>{esc(str(totals.get("rejected", 0)))}</b>inputs rejected</div>',
           "<p>An input is a file in the DICOM folder, or a row of the labels file that "
           "names no file there. Every input is either kept or rejected with a reason.</p>",
           "<h2>What was rejected, and why</h2>"]
    rejected = report.get("rejected_by_reason", [])
    if rejected:
        out.append(bar_chart_svg(rejected, title="Rejected inputs by reason",
                                 min_cell=min_cell, standalone=False))
        out.append(_table(rejected, ["reason code", "inputs", "what it means"],
                          ["explanation"]))
    else:
        out.append("<p>No input was rejected.</p>")
    out.append("<h2>Labels</h2>")
    labels = report.get("labels", [])
    out.append(bar_chart_svg(labels, title="Kept images per class", min_cell=min_cell,
                             standalone=False))
    out.append(_table(labels, ["class", "images", "share of kept images"], ["fraction"]))
    out.append("<h2>What the kept images look like</h2>")
    for key, title in DISTRIBUTIONS.items():
        cells = report.get("distributions", {}).get(key, [])
        out.append(f"<h3>{esc(title)}</h3>")
        out.append(bar_chart_svg(cells, title=title, min_cell=min_cell, standalone=False))
    summary = json.dumps(shareable_summary(report), indent=1)
    out.append("<h2>What this site may share with the coordinator</h2>"
               "<p>Before the first training round, the coordinator can compare the sites "
               "with this aggregate summary (it is written next to this page as "
               f"<code>{SUMMARY_JSON}</code>; nothing is sent automatically):</p>"
               f"<pre>{esc(summary)}</pre>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def render_markdown(report: Mapping[str, Any]) -> str:
    """The report as a short Markdown page (tables, no charts)."""
    min_cell = int(report.get("min_cell", 5))
    totals = report.get("totals", {})
    cache = report.get("cache", {})

    def table(cells: Sequence[Mapping[str, Any]], header: str) -> list[str]:
        rows = [f"| {header} | count |", "| --- | ---: |"]
        rows += [f"| {str(c.get('name')).replace('|', '/')} | {c.get('display')} |"
                 for c in cells]
        return rows + [""]

    lines = ["# Site readiness report", "",
             f"Site (hashed): {report.get('site') or 'not recorded'}; image size "
             f"{cache.get('image_size')}; classes: {', '.join(cache.get('class_names') or [])}.",
             "",
             f"Counts only; counts below {min_cell} are hidden (`<{min_cell}`, "
             f"`suppressed` or merged into `{OTHER}`).", "",
             f"- inputs examined: {totals.get('inputs', 0)}",
             f"- images kept: {totals.get('accepted', 0)}",
             f"- inputs rejected: {totals.get('rejected', 0)}", "",
             "## Rejected, by reason", ""]
    lines += table(report.get("rejected_by_reason", []), "reason")
    for c in report.get("rejected_by_reason", []):
        lines.append(f"- `{c['name']}`: {c.get('explanation', '')}")
    lines += ["", "## Labels", ""] + table(report.get("labels", []), "class")
    for key, title in DISTRIBUTIONS.items():
        lines += [f"## {title}", ""] + table(report.get("distributions", {}).get(key, []),
                                             key.replace("_", " "))
    return "\n".join(lines)


def readiness_text(report: Mapping[str, Any]) -> str:
    """A few lines for the terminal: totals, reasons and label counts."""
    totals = report.get("totals", {})
    reasons = ", ".join(f"{c['name']} {c['display']}"
                        for c in report.get("rejected_by_reason", [])) or "none"
    labels = ", ".join(f"{c['name']} {c['display']}" for c in report.get("labels", []))
    return (f"readiness: {totals.get('accepted', 0)} images kept, "
            f"{totals.get('rejected', 0)} inputs rejected (reasons: {reasons}); "
            f"classes: {labels or 'none'}")


def _write_text(path: Path, text: str) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def write_readiness(report: Mapping[str, Any], out_dir: str | os.PathLike[str]
                    ) -> tuple[Path, Path, Path]:
    """Write ``readiness.json``, ``readiness.html`` and ``readiness.md`` to ``out_dir``.

    Each file is written to a temporary name and moved into place.

    Parameters
    ----------
    report:
        A report from :func:`build_readiness`.
    out_dir:
        Folder to write to (created if needed), usually the cache folder.

    Returns
    -------
    tuple of Path
        ``(json_path, html_path, md_path)``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = _write_text(out / READINESS_JSON, json.dumps(report, indent=1) + "\n")
    html_path = _write_text(out / READINESS_HTML, render_html(report))
    md_path = _write_text(out / READINESS_MD, render_markdown(report))
    logger.debug("wrote readiness report (%d kept, %d rejected)",
                 report.get("totals", {}).get("accepted", 0),
                 report.get("totals", {}).get("rejected", 0))
    return json_path, html_path, md_path
