"""`attrpatch circuit`: edge scores, exact checks, faithfulness curves, figures and a report.

Files written (into a staging directory the command line moves into place):

- ``edges.csv``: source, destination, one score column per method, ``exact`` where verified;
- ``faithfulness.csv``: method, n_edges, faithfulness, metric;
- ``circuit.png``: the first method's circuit at the first size, as a layered graph (edge width
  by |score|, colour by sign);
- ``faithfulness.png``: faithfulness against circuit size, one line per method;
- ``summary.json`` and ``report.html`` (verdicts and flags first, settings last).
"""

from __future__ import annotations

import csv
import html
import json
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from attrpatch.circuits.discovery import (  # noqa: E402
    DEFAULT_THRESHOLDS,
    FaithfulnessPoint,
    destination_readers,
    faithfulness_curve,
    find_circuit,
    validate_edges,
    verify_edges,
)
from attrpatch.circuits.edges import EdgeResults, attribute_edges, patch_edges_each  # noqa: E402
from attrpatch.circuits.graph import EdgeGraph  # noqa: E402
from attrpatch.report import CSS, _fmt, _img  # noqa: E402
from attrpatch.validation import Thresholds, estimator_label, recall_keys  # noqa: E402

EDGE_LABELS = {"eap": "EAP", "relp": "RelP", "eap_ig_inputs": "EAP-IG (inputs)",
               "eap_ig_activations": "EAP-IG (activations)", "exact": "exact"}


def _node_positions(graph: EdgeGraph) -> dict[str, tuple[float, float]]:
    """Where each node sits: a column per layer's attention and MLP, rows by head."""
    c = graph.config
    pos = {"input": (0.0, (c.n_heads - 1) / 2)}
    for layer in range(c.n_layers):
        x = 1 + 2 * layer
        if graph.head_sources:
            pos |= {f"a{layer}.h{h}": (x, float(h)) for h in range(c.n_heads)}
        else:
            pos[f"a{layer}"] = (x, (c.n_heads - 1) / 2)
        if not c.attn_only:
            pos[f"m{layer}"] = (x + 1, (c.n_heads - 1) / 2)
    pos["logits"] = (2 * c.n_layers + 1, (c.n_heads - 1) / 2)
    return pos


def circuit_figure(graph: EdgeGraph, scores: EdgeResults, edges: Sequence[tuple], path: Path,
                   title: str) -> Path:
    """Draw `edges` on the layered graph: width by |score|, blue positive, red negative; a q, k
    or v input is drawn to the head(s) that read it, with its letter at the arrow."""
    pos = _node_positions(graph)
    owners = destination_readers(scores)
    values = [scores.score(*e) for e in edges]
    top = max((abs(v) for v in values), default=1.0) or 1.0
    fig, ax = plt.subplots(figsize=(2 + 1.3 * len({x for x, _ in pos.values()}),
                                    2 + 0.6 * graph.config.n_heads))
    for e, v in zip(edges, values, strict=True):
        s, d = e[0], e[1]
        for node in owners[d] or ("logits",):
            (x0, y0), (x1, y1) = pos[s], pos[node]
            ax.annotate("", (x1, y1), (x0, y0), arrowprops=dict(
                arrowstyle="-|>", lw=0.5 + 4 * abs(v) / top, alpha=0.75,
                color="#1f77b4" if v >= 0 else "#d62728", connectionstyle="arc3,rad=0.08"))
            if "<" in d:
                ax.text(x0 + 0.8 * (x1 - x0), y0 + 0.8 * (y1 - y0), d[-2], fontsize=7)
    used = {e[0] for e in edges} | {n for e in edges for n in (owners[e[1]] or ("logits",))}
    for name, (x, y) in pos.items():
        ax.scatter([x], [y], s=260, color="#ffd27f" if name in used else "#eeeeee", zorder=3,
                   edgecolor="#555555")
        ax.text(x, y, name, ha="center", va="center", fontsize=6.5, zorder=4)
    ax.set_title(title, fontsize=10)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def faithfulness_figure(points: Sequence[FaithfulnessPoint], n_edges: int, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for method in dict.fromkeys(p.method for p in points):
        ps = [p for p in points if p.method == method]
        ax.plot([p.n_edges for p in ps], [p.faithfulness for p in ps], "o-",
                label=EDGE_LABELS.get(method, method))
    ax.axhline(1.0, color="#999999", lw=0.8, ls="--")
    ax.axhline(0.0, color="#999999", lw=0.8)
    ax.set_xlabel(f"edges in the circuit (of {n_edges})")
    ax.set_ylabel("faithfulness (exact edge patching)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_circuit(model, task, methods: Sequence[str], sizes: Sequence[int] | None, out_dir: Path,
                run: dict, thresholds: Thresholds = DEFAULT_THRESHOLDS, how: str = "top",
                direction: str = "denoise", metric=None, steps: int = 5, max_exact: int = 2000,
                verify_top: int = 100, verify_random: int = 100, seed: int = 0,
                progress: bool = True) -> dict:
    """Score every edge with each method, check against exact single-edge patching (all edges
    when there are at most `max_exact`, else the first method's `verify_top` edges and
    `verify_random` more), draw faithfulness curves, and write every file into `out_dir` (an
    existing, empty directory); `progress`: progress bars. Returns the summary (also
    ``summary.json``)."""
    graph = EdgeGraph(model.config)
    scores = {m: attribute_edges(model, task, m, steps=steps, direction=direction, metric=metric,
                                 progress=progress) for m in methods}
    first = scores[methods[0]]
    full = graph.n_edges <= max_exact
    exact = (patch_edges_each(model, task, direction=direction, metric=metric, chunk_size=32,
                              progress=progress)
             if full else verify_edges(model, task, first, verify_top, verify_random, seed, metric,
                                       progress=progress))
    validations = {m: validate_edges(r, exact, {o: s for o, s in scores.items() if o != m}, thresholds)
                   for m, r in scores.items()}
    if sizes is None:
        sizes = sorted({max(1, round(graph.n_edges * f)) for f in (0.05, 0.1, 0.2, 0.5)})
    sizes = [min(int(n), graph.n_edges) for n in sizes]
    curves = faithfulness_curve(model, task, scores | ({"exact": exact} if full else {}), sizes,
                                how, direction, metric, progress=progress)
    circuit = find_circuit(first, n_edges=sizes[0], how=how)

    _write_edges_csv(out_dir / "edges.csv", scores, exact)
    with open(out_dir / "faithfulness.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "n_edges", "faithfulness", "metric"])
        w.writerows([p.method, p.n_edges, f"{p.faithfulness:.6g}", f"{p.metric:.6g}"] for p in curves)
    label = EDGE_LABELS.get(methods[0], methods[0])
    figures = [circuit_figure(graph, first, circuit, out_dir / "circuit.png",
                              f"{label} circuit, {len(circuit)} edges ({how})"),
               faithfulness_figure(curves, graph.n_edges, out_dir / "faithfulness.png")]
    summary = {
        "run": run | {"n_edges_graph": graph.n_edges, "sizes": sizes, "how": how,
                      "exact": "all edges" if full else f"top {verify_top} + {verify_random} random"},
        "base_metric": first.base_metric, "source_metric": first.source_metric,
        "methods": {m: {"seconds": r.seconds, "cost_forwards": r.cost_forwards}
                    for m, r in scores.items()},
        "exact": {"seconds": exact.seconds, "n_edges": int(np.isfinite(exact.scores).sum())},
        "validation": {m: {"verdict": v.verdict, "agreement": v.agreement,
                           "flags": [f.__dict__ for f in v.flags]} for m, v in validations.items()},
        "faithfulness": [p.__dict__ for p in curves],
        "circuit": [list(e) for e in circuit],
        "files": sorted(["edges.csv", "faithfulness.csv", "summary.json", "report.html",
                         *(p.name for p in figures)]),
    }
    summary = json.loads(json.dumps(summary, default=float))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    _write_report(out_dir / "report.html", summary, validations, figures, thresholds)
    return summary


def _write_edges_csv(path: Path, scores: dict[str, EdgeResults], exact: EdgeResults) -> None:
    first = next(iter(scores.values()))
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["source", "destination", *scores, "exact"])
        for s, d, _ in first.edges():
            row = [s, d] + [f"{r.score(s, d):.6g}" for r in scores.values()]
            e = exact.score(s, d)
            w.writerow(row + [f"{e:.6g}" if np.isfinite(e) else ""])


def _write_report(path: Path, summary: dict, validations: dict, figures: Sequence[Path],
                  t: Thresholds) -> None:
    recalls = recall_keys(t)
    h = ["<!doctype html><html><head><meta charset='utf-8'><title>attrpatch circuit report</title>",
         f"<style>{CSS}</style></head><body><h1>attrpatch circuit report</h1>",
         "<h2>Edge scores against exact single-edge patching</h2><table><tr><th>method</th>"
         "<th>verdict</th><th>n</th><th>Pearson</th><th>Spearman</th>"
         + "".join(f"<th>{html.escape(k)}</th>" for k in recalls)
         + "<th>flags (high)</th><th>seconds</th><th>cost (forwards)</th></tr>"]
    for m, v in validations.items():
        a, meta = v.agreement, summary["methods"][m]
        h.append(f"<tr><td>{html.escape(EDGE_LABELS.get(m, m))}</td><td class='{v.verdict}'>"
                 f"{v.verdict}</td><td>{a['n']}</td>"
                 + "".join(f"<td>{_fmt(a[k])}</td>" for k in ("pearson", "spearman", *recalls))
                 + f"<td>{a['n_flags']} ({a['n_high']})</td><td>{_fmt(meta['seconds'])}</td>"
                 f"<td>{_fmt(meta['cost_forwards'])}</td></tr>")
    h.append(f"</table><p>Exact: {html.escape(summary['run']['exact'])} of "
             f"{summary['run']['n_edges_graph']} edges ({summary['exact']['n_edges']} patched, "
             f"{_fmt(summary['exact']['seconds'])} s).</p>")
    flags = sorted((f for v in validations.values() for f in v.flags), key=lambda f: -f.severity)
    if flags:
        h.append("<h3>Flagged edges</h3><table><tr><th>estimator</th><th>edge</th><th>level</th>"
                 "<th>reason</th></tr>")
        for f in flags[:30]:
            h.append(f"<tr><td>{html.escape(EDGE_LABELS.get(f.estimator, f.estimator))}</td>"
                     f"<td><code>{html.escape(f.source)} &rarr; {html.escape(f.destination)}"
                     f"</code></td><td class='{f.level}'>{f.level}</td>"
                     f"<td>{html.escape(f.reason)}</td></tr>")
        h.append("</table>")
    h.append("<h2>Faithfulness</h2><p>(m_circuit - m_base) / (m_source - m_base), the circuit's "
             "edges patched exactly.</p><table><tr><th>method</th><th>edges</th>"
             "<th>faithfulness</th></tr>")
    for p in summary["faithfulness"]:
        h.append(f"<tr><td>{html.escape(EDGE_LABELS.get(p['method'], p['method']))}</td>"
                 f"<td>{p['n_edges']}</td><td>{_fmt(p['faithfulness'])}</td></tr>")
    h.append("</table>")
    for fig in figures:
        h.append(f"<p>{_img(fig)}</p>")
    h.append("<h2>Circuit edges</h2><ol>" + "".join(
        f"<li><code>{html.escape(' -> '.join(map(str, e[:2])))}</code></li>"
        for e in summary["circuit"]) + "</ol>")
    h.append("<h2>Run settings</h2><table>")
    for k, v in summary["run"].items():
        h.append(f"<tr><th>{html.escape(str(k))}</th><td>{_fmt(v)}</td></tr>")
    h.append(f"</table><p>Estimators: {', '.join(estimator_label(m) for m in validations)}.</p>"
             "</body></html>")
    path.write_text("\n".join(h))
