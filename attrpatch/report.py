"""Figures (matplotlib, Agg) and a self-contained HTML report of an estimator (AtP, AtP*, IG)
vs exact patching.

- :func:`heatmap_figure`: one granularity, AtP and exact side by side on one diverging colour
  scale centred on zero, labelled axes (token strings where given).
- :func:`scatter_figure`: one site family, AtP against exact with the y = x line, flagged
  components marked and the worst labelled.
- :func:`write_report`: ``report.html``: a verdict per family (with what drives it, and the
  command that verifies an unreliable family exactly), the flags table sorted by severity, the
  estimators side by side, heatmaps whose cells show their values on hover, the scatters
  (base64-embedded), and the run settings and thresholds last.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from attrpatch.results import FAMILIES, GRANULARITIES, PatchResults  # noqa: E402
from attrpatch.validation import Validation, estimator_label, recall_keys  # noqa: E402

POINT_COLOURS = ("#1f77b4", "#2ca02c", "#17becf", "#7f7f7f", "#bcbd22", "#e377c2")
FLAG_COLOURS = {"false negative": "#d62728", "false positive": "#ff7f0e",
                "sign flip": "#9467bd", "magnitude error": "#8c564b"}


def _grid_2d(values: np.ndarray, axes: tuple[str, ...], tokens):
    """A 2-D view ``[rows, cols]`` of a granularity grid: (grid, ylabel, xlabel, yticks, xticks,
    note). Head axes are folded into rows ``L{layer}H{head}``; 3-D+ neuron / key grids are summed."""
    v = np.asarray(values, float)
    num = lambda n: [str(i) for i in range(n)]
    tok = lambda n: [f"{i} {tokens[i]!r}" if tokens is not None and i < len(tokens) else str(i)
                     for i in range(n)]
    heads = lambda n_layers, n_heads: [f"L{a}H{b}" for a in range(n_layers) for b in range(n_heads)]
    if axes == ("layer", "pos"):
        return v, "layer", "position", num(v.shape[0]), tok(v.shape[1]), ""
    if axes == ("layer", "head"):
        return v, "layer", "head", num(v.shape[0]), num(v.shape[1]), ""
    if axes == ("layer", "neuron"):
        return v, "layer", "neuron", num(v.shape[0]), None, ""
    if axes == ("layer", "pos", "head"):
        n_layers, n_pos, n_heads = v.shape
        rows = np.transpose(v, (0, 2, 1)).reshape(n_layers * n_heads, n_pos)
        return rows, "layer.head", "position", heads(n_layers, n_heads), tok(n_pos), ""
    if axes == ("layer", "pos", "neuron"):
        return (np.nansum(v, axis=2), "layer", "position", num(v.shape[0]), tok(v.shape[1]),
                " (summed over neurons)")
    note = ""
    if axes == ("layer", "head", "query_pos", "key_pos"):
        v, note = np.nansum(v, axis=3), " (summed over keys)"
    n_layers, n_heads, n_q = v.shape
    return (v.reshape(n_layers * n_heads, n_q), "layer.head", "query position",
            heads(n_layers, n_heads), tok(n_q), note)


def heatmap_figure(granularity: str, atp: np.ndarray | None, exact: np.ndarray | None,
                   path: str | Path, tokens: Sequence[str] | None = None,
                   metric: str = "", flags: np.ndarray | None = None, label: str = "AtP") -> Path:
    """Estimate (`atp`, named `label`) and exact heatmaps of one granularity side by side; one
    colour scale centred on 0.

    `flags`: optional ``[*axes]`` strings (non-empty where flagged); flagged cells get a box.
    """
    axes = GRANULARITIES[granularity][1]
    panels = [(n, v) for n, v in ((label, atp), ("exact", exact)) if v is not None]
    views = [(name,) + _grid_2d(v, axes, tokens) for name, v in panels]
    finite = np.concatenate([np.ravel(v[1])[np.isfinite(np.ravel(v[1]))] for v in views] + [np.zeros(1)])
    vmax = float(np.abs(finite).max()) or 1.0
    rows, cols = views[0][1].shape
    width = min(8.0, 1.8 + 0.36 * cols) if views[0][5] is not None else 6.0
    height = min(12.0, max(2.8, 1.6 + 0.3 * rows))
    fig, axs = plt.subplots(1, len(views), figsize=(width * len(views) + 1.0, height),
                            squeeze=False, constrained_layout=True)
    flag_view = None
    if flags is not None:
        flag_view = _grid_2d((np.asarray(flags) != "").astype(float), axes, tokens)[0]
    im = None
    for ax, (name, grid, ylab, xlab, yticks, xticks, note) in zip(axs[0], views, strict=True):
        shown = np.ma.masked_invalid(grid)
        cmap = plt.get_cmap("RdBu_r").with_extremes(bad="#dddddd")
        im = ax.imshow(shown, cmap=cmap, vmin=-vmax, vmax=vmax, aspect="auto",
                       interpolation="nearest")
        ax.set_title(f"{name}: {granularity}{note}", fontsize=10)
        ax.set_ylabel(ylab)
        ax.set_xlabel(xlab)
        if len(yticks) <= 48:
            ax.set_yticks(range(len(yticks)), yticks, fontsize=7 if len(yticks) > 16 else 8)
        if xticks is not None and len(xticks) <= 48:
            long = max(len(x) for x in xticks) > 3
            ax.set_xticks(range(len(xticks)), xticks, rotation=60 if long else 0,
                          ha="right" if long else "center", fontsize=7 if long else 8)
        if flag_view is not None:
            for r, c in zip(*np.nonzero(flag_view > 0), strict=True):
                ax.add_patch(plt.Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, lw=1.5,
                                           ec="black"))
    cbar = fig.colorbar(im, ax=list(axs[0]), shrink=0.9)
    cbar.set_label(f"effect on {metric}" if metric else "effect (metric units)")
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def scatter_figure(family: str, atp: PatchResults, exact: PatchResults, validation: Validation,
                   path: str | Path, max_labels: int = 8) -> Path | None:
    """AtP (y) against exact (x) for every component of one family, y = x line, flags marked."""
    gs = [g for g in FAMILIES[family] if g in validation.by_granularity]
    if not gs:
        return None
    fig, ax = plt.subplots(figsize=(5.6, 5.0), constrained_layout=True)
    markers = "os^Dv<>p"
    lo, hi = 0.0, 0.0
    for i, g in enumerate(gs):
        a, e = np.ravel(atp[g]), np.ravel(exact[g])
        ok = np.isfinite(a) & np.isfinite(e)
        ax.scatter(e[ok], a[ok], s=14, alpha=0.6, marker=markers[i % len(markers)],
                   color=POINT_COLOURS[i % len(POINT_COLOURS)], label=f"{g} ({ok.sum()})")
        if ok.any():
            lo, hi = min(lo, e[ok].min(), a[ok].min()), max(hi, e[ok].max(), a[ok].max())
    pad = 0.05 * (hi - lo or 1.0)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="gray", lw=1, ls="--", label="y = x")
    ax.axhline(0, color="#bbbbbb", lw=0.6)
    ax.axvline(0, color="#bbbbbb", lw=0.6)
    flags = [f for f in validation.flags if f.granularity in gs]
    for kind, colour in FLAG_COLOURS.items():
        pts = [f for f in flags if f.kind == kind]
        if pts:
            ax.scatter([f.exact for f in pts], [f.atp for f in pts], s=60, facecolors="none",
                       edgecolors=colour, linewidths=1.6, label=f"{kind} ({len(pts)})")
    for f in flags[:max_labels]:
        label = f.label if len(gs) > 1 else f.label.split(":", 1)[1]
        ax.annotate(label, (f.exact, f.atp), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel(f"exact patching effect ({exact.metric})")
    ax.set_ylabel(f"{estimator_label(atp.method)} estimate ({atp.metric})")
    stats = validation.by_family[family]
    rk = f"recall@{max(validation.thresholds.top_k)}" if validation.thresholds.top_k else (
        recall_keys(validation.thresholds)[-1])
    ax.set_title(f"{family}: Pearson {_fmt(stats['pearson'])}, {rk} {_fmt(stats.get(rk))}",
                 fontsize=10)
    ax.legend(fontsize=7, loc="best")
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_figures(out_dir: str | Path, atp: PatchResults | None, exact: PatchResults | None,
                 validation: Validation | None, tokens=None) -> list[Path]:
    """Write every heatmap and scatter PNG into `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    paths = []
    grans = [g for g in GRANULARITIES
             if (atp is not None and g in atp.scores) or (exact is not None and g in exact.scores)]
    metric = (atp or exact).metric
    for g in grans:
        a = atp[g] if atp is not None and g in atp.scores else None
        e = exact[g] if exact is not None and g in exact.scores else None
        flags = validation.flag_grids.get(g) if validation is not None else None
        paths.append(heatmap_figure(g, a, e, out_dir / f"heatmap_{g}.png", tokens, metric, flags,
                                    estimator_label(atp.method) if atp is not None else "AtP"))
    if validation is not None:
        for fam in validation.by_family:
            slug = fam.replace(" ", "_").replace("/", "")
            p = scatter_figure(fam, atp, exact, validation, out_dir / f"scatter_{slug}.png")
            if p is not None:
                paths.append(p)
    return paths


def _img(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(path.name)}" src="data:image/png;base64,{data}">'


def _fmt(x) -> str:
    if isinstance(x, dict):
        return "<br>".join(f"{html.escape(str(k))} = {_fmt(v)}" for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return html.escape(", ".join(str(v) for v in x))
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return "n/a" if not np.isfinite(x) else f"{x:.3g}"
    return html.escape(str(x))


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;
font-size:13px;text-align:left}th{background:#f3f3f3}img{max-width:100%;margin:0.5em 0}
.reliable{color:#1a7f37;font-weight:600}.caution{color:#b35900;font-weight:600}
.unreliable{color:#c62828;font-weight:600}.high{background:#fde0e0}.medium{background:#fff3d6}
code{background:#f5f5f5;padding:1px 3px}
.heatmap{display:flex;gap:2em;flex-wrap:wrap}
table.heat td{width:14px;height:14px;padding:0;border:1px solid #fff}
table.heat th{font-size:10px;padding:1px 3px;font-weight:normal}table.heat caption{font-weight:600}"""


def _comparison_table(comparison: dict, estimators: dict) -> str:
    """HTML table: per site family, each estimator's verdict, Pearson, Spearman, recalls and
    flags against exact; a last row with each estimator's cost and time."""
    methods = list(estimators)
    stats = [k for k in next(iter(next(iter(comparison.values())).values())) if k != "verdict"]
    h = ["<h2>Estimators side by side</h2><p>Each estimator validated against exact patching "
         "with the same thresholds (cells: verdict, then " + html.escape(", ".join(stats))
         + "). AtP* = AtP with the QK fix on queries and keys (its GradDrop magnitudes rank "
         "components for verification); RelP = AtP with the backward's local gradients "
         "replaced by relevance-propagation rules (norm scales, attention patterns, activations "
         "and gated products held; no gradient to queries and keys); IG = integrated gradients "
         "on the activations "
         "(<code>ig</code>) or on the input embeddings (<code>ig_inputs</code>).</p><table><tr>"
         "<th>family</th>" + "".join(f"<th>{html.escape(m)}</th>" for m in methods) + "</tr>"]
    for fam, by_method in comparison.items():
        cells = []
        for m in methods:
            c = by_method.get(m)
            if c is None:
                cells.append("<td>-</td>")
                continue
            nums = " / ".join(str(c[k]) if k == "n_flags" else _fmt(c[k]) for k in stats)
            cells.append(f"<td><span class='{c['verdict']}'>{c['verdict']}</span><br>{nums}</td>")
        h.append(f"<tr><td>{html.escape(fam)}</td>{''.join(cells)}</tr>")
    h.append("<tr><th>cost (forwards) / seconds</th>" + "".join(
        f"<td>{_fmt(e.get('cost_forwards'))} / {_fmt(e.get('seconds'))}</td>"
        for e in estimators.values()) + "</tr></table>")
    return "".join(h)


def verify_command(run: dict, family: str, granularities: Sequence[str], estimator: str) -> str:
    """The command that exact-patches every component of one site family of this run."""
    out = str(run.get("out") or "attrpatch-out").rstrip("/")
    slug = family.replace(" ", "-").replace("/", "")
    parts = ["attrpatch scan", f"--model {run.get('model')}", f"--data {run.get('data')}",
             f"--sites {','.join(granularities)}", f"--methods {estimator},exact",
             f"--direction {run.get('direction')}", f"--metric {run.get('metric') or 'logit_diff'}",
             f"--out {out}-verify-{slug}"]
    return " ".join(parts)


HOVER_MAX_CELLS = 4096  # larger grids: the PNG only (every value is in results.csv)


def _colour(value: float, vmax: float) -> str:
    """Diverging blue-white-red for `value` in [-vmax, vmax]; grey for NaN."""
    if not np.isfinite(value):
        return "#dddddd"
    x = max(-1.0, min(1.0, value / vmax))
    fade = lambda c: int(255 - (255 - c) * abs(x))  # noqa: E731
    r, g, b = (178, 24, 43) if x > 0 else (33, 102, 172)
    return f"#{fade(r):02x}{fade(g):02x}{fade(b):02x}"


def hover_heatmap(granularity: str, panels: dict[str, np.ndarray], tokens=None,
                  flags: np.ndarray | None = None) -> str:
    """HTML heatmaps of one granularity, one table per panel (estimate, exact) on one colour
    scale centred on 0; hovering a cell shows its component and every panel's value there."""
    axes = GRANULARITIES[granularity][1]
    views = {name: _grid_2d(v, axes, tokens) for name, v in panels.items()}
    first = next(iter(views.values()))
    grid, ylab, xlab, yticks, xticks, note = first
    finite = np.concatenate([np.ravel(v[0])[np.isfinite(np.ravel(v[0]))] for v in views.values()]
                            + [np.zeros(1)])
    vmax = float(np.abs(finite).max()) or 1.0
    flag_view = None if flags is None else _grid_2d((np.asarray(flags) != "").astype(float),
                                                    axes, tokens)[0]
    xticks = xticks or [str(i) for i in range(grid.shape[1])]
    html_ = ["<div class='heatmap'>"]
    for name, (values, *_rest) in views.items():
        rows = [f"<table class='heat'><caption>{html.escape(name)}: {granularity}{note}</caption>"
                f"<tr><th>{html.escape(ylab)} \\ {html.escape(xlab)}</th>"
                + "".join(f"<th>{html.escape(str(x))}</th>" for x in xticks) + "</tr>"]
        for r, label in enumerate(yticks):
            cells = []
            for c in range(values.shape[1]):
                tip = f"{granularity} {label}, {xlab} {xticks[c]}: " + ", ".join(
                    f"{n} {v[0][r, c]:+.4g}" for n, v in views.items())
                box = " style='outline:2px solid #000'" if (
                    flag_view is not None and flag_view[r, c] > 0) else ""
                cells.append(f"<td title='{html.escape(tip, quote=True)}' "
                             f"bgcolor='{_colour(values[r, c], vmax)}'{box}></td>")
            rows.append(f"<tr><th>{html.escape(str(label))}</th>{''.join(cells)}</tr>")
        html_.append("".join(rows) + "</table>")
    return "".join(html_) + "</div>"


def _saved_arrays(out_dir: Path) -> dict[str, np.ndarray]:
    """``results.npz`` of an output directory (empty if absent)."""
    path = out_dir / "results.npz"
    if not path.is_file():
        return {}
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def write_report(out_dir: str | Path, summary: dict, figures: Sequence[Path],
                 validation: Validation | None) -> Path:
    """Write ``report.html`` (self-contained: figures embedded) into `out_dir`: verdicts, what
    drives each (with the command that verifies an unreliable family exactly) and flags first;
    the estimators compared; verification; hoverable heatmaps and the scatter plots; the run
    settings and thresholds last. Heatmap values come from ``results.npz`` in `out_dir`."""
    out_dir = Path(out_dir)
    h = ["<!doctype html><html><head><meta charset='utf-8'><title>attrpatch report</title>",
         f"<style>{CSS}</style></head><body><h1>attrpatch report</h1>"]
    run = summary.get("run", {})
    if validation is not None:
        t = validation.thresholds
        recalls = recall_keys(t)
        name = html.escape(estimator_label(validation.estimator))
        h.append(f"<h2>Verdict per site family ({name} against exact)</h2>"
                 "<table><tr><th>family</th><th>verdict</th>"
                 "<th>n</th><th>Pearson</th><th>Spearman</th><th>slope</th><th>sign agreement</th>"
                 + "".join(f"<th>{html.escape(k)}</th>" for k in recalls)
                 + "<th>median |err| / |gap|</th><th>max |err| / |gap|</th><th>flags (high)</th></tr>")
        for fam, s in validation.by_family.items():
            v = validation.verdicts[fam]
            h.append(f"<tr><td>{html.escape(fam)}</td><td class='{v}'>{v}</td><td>{s['n']}</td>"
                     + "".join(f"<td>{_fmt(s.get(k, float('nan')))}</td>" for k in (
                         "pearson", "spearman", "slope", "sign_agreement", *recalls,
                         "median_abs_error_share", "max_abs_error_share"))
                     + f"<td>{s['n_flags']} ({s['n_high']})</td></tr>")
        h.append("</table>")
        if validation.note:
            h.append(f"<p class='unreliable'>{html.escape(validation.note)}</p>")
        if validation.drivers:
            h.append("<h3>What drives each caution / unreliable verdict</h3><ul>")
            for fam, items in validation.drivers.items():
                h.append(f"<li><b>{html.escape(fam)}</b>: " + "; ".join(
                    f"<code>{html.escape(d['label'])}</code> ({name} {d['estimate']:+.3g}, exact "
                    f"{d['exact']:+.3g}: {html.escape(d['why'])})" for d in items))
                if validation.verdicts[fam] == "unreliable":
                    grans = [g for g in FAMILIES[fam] if g in validation.by_granularity]
                    h.append("<br>Verify every component of this family exactly: <code>"
                             + html.escape(verify_command(run, fam, grans, validation.estimator))
                             + "</code>")
                h.append("</li>")
            h.append("</ul>")
        h.append(f"<h2>Flags ({len(validation.flags)}), by severity</h2>")
        if validation.flags:
            h.append(f"<table><tr><th>component</th><th>kind</th><th>severity</th><th>{name}</th>"
                     "<th>exact</th><th>cause</th><th>reason</th></tr>")
            for f in validation.flags[:200]:
                h.append(f"<tr class='{f.level}'><td><code>{html.escape(f.label)}</code></td>"
                         f"<td>{f.kind}</td><td>{f.level} ({f.severity:.2f})</td>"
                         f"<td>{f.atp:+.3g}</td><td>{f.exact:+.3g}</td>"
                         f"<td>{html.escape(', '.join(f.causes) or '-')}</td>"
                         f"<td>{html.escape(f.reason)}</td></tr>")
            h.append("</table>")
            if len(validation.flags) > 200:
                h.append(f"<p>... and {len(validation.flags) - 200} more in results.csv.</p>")
        else:
            h.append("<p>No component flagged.</p>")
        h.append(f"<p>gap (source - base metric) = {validation.gap:.4g}; effects compared in units "
                 f"of {validation.unit:.4g}. Reliable: Pearson &ge; {t.reliable_pearson} and no "
                 f"high-severity flag, or every |{name} - exact| below {t.small:g} of the unit and "
                 f"no flag; caution: Pearson &ge; {t.caution_pearson}; else unreliable; n/a: no "
                 f"component of the family verified. Diagnosed causes use the thresholds listed "
                 f"at the end (re-validation recomputes them from the saved raw diagnostics).</p>")
    comparison, estimators = summary.get("comparison") or {}, summary.get("estimators") or {}
    if comparison and len(estimators) > 1:
        h.append(_comparison_table(comparison, estimators))
    until = summary.get("verify_until")
    if until:
        h.append("<h2>Sequential verification</h2><p>Components were exact-patched in the "
                 "estimator's order, then certified by uniform random samples of the rest "
                 "(attrpatch.validation.verify_until):</p><ul>"
                 + "".join(f"<li>{html.escape(r['sentence'])}</li>" for r in until.values())
                 + "</ul>")
    budget = summary.get("budget")
    if budget:
        h.append("<h2>Budgeted verification</h2><table><tr><th>granularity</th><th>components</th>"
                 "<th>top K verified</th><th>random verified</th><th>threshold</th>"
                 "<th>random above</th><th>est. missed</th><th>95% upper</th>"
                 "<th>max |exact| in random</th></tr>")
        for g, b in budget.items():
            h.append(f"<tr><td>{g}</td><td>{b['n_components']}</td><td>{len(b['top'])}</td>"
                     f"<td>{len(b['random'])}</td><td>{_fmt(b['threshold'])}</td>"
                     f"<td>{b['random_above']}</td><td>{_fmt(b['missed_estimate'])}</td>"
                     f"<td>{_fmt(b['missed_upper'])}</td><td>{_fmt(b['max_random_abs'])}</td></tr>")
        h.append("</table><p>Exact patching ran only on the top K components by |AtP| and R "
                 "random others. Among the random ones, 'random above' had |exact| &ge; the "
                 "threshold (a large effect); 'est. missed' scales that share to all components "
                 "outside the top K, and '95% upper' is its Wilson upper bound: how many large "
                 "effects AtP may have ranked too low.</p>")
    h.append("<h2>Figures</h2><p>Heatmaps: the primary estimator and exact side by side on one "
             "colour scale centred on zero (red positive, blue negative, grey not computed, "
             "outlined: flagged); hover a cell for its values. Scatter plots: the estimate against "
             "exact per site family; points on the dashed line agree; circled points are "
             "flagged.</p>")
    arrays = _saved_arrays(out_dir)
    primary = summary.get("primary")
    for p in figures:
        stem = Path(p).stem
        granularity = stem.removeprefix("heatmap_")
        panels = {label: arrays[key] for label, key in (
            (estimator_label(primary or ""), f"{primary}/{granularity}"),
            ("exact", f"exact/{granularity}")) if key in arrays}
        h.append(f"<h3>{html.escape(stem.replace('_', ' '))}</h3>")
        if stem.startswith("heatmap_") and panels and next(iter(panels.values())).size <= HOVER_MAX_CELLS:
            flags = validation.flag_grids.get(granularity) if validation is not None else None
            h.append(hover_heatmap(granularity, panels, summary.get("tokens"), flags))
        else:
            h.append(_img(p))
    h.append("<h2>Run settings and thresholds</h2><table>")
    for k, v in run.items():
        h.append(f"<tr><th>{html.escape(str(k))}</th><td>{_fmt(v)}</td></tr>")
    h.append("</table>")
    h.append("<h2>Summary JSON</h2><details><summary>show</summary><pre>"
             + html.escape(json.dumps({k: v for k, v in summary.items() if k != "flags"},
                                      indent=1, default=str)[:20000])
             + "</pre></details></body></html>")
    path = out_dir / "report.html"
    path.write_text("\n".join(h))
    return path

