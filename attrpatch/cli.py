"""Command line: ``attrpatch demo | scan | validate`` (also ``python -m attrpatch``).

- ``attrpatch demo [--model DIR] [--out DIR]``: AtP, AtP*, IG (inputs), exact patching and
  validation of each on the shipped IOI model (or any checkpoint naming its task in
  ``attrpatch_task.json``), then the report.
- ``attrpatch scan --model DIR --data FILE --out DIR [--sites ...]
  [--methods atp,atp_star,relp,ig,ig_inputs,exact] [--steps N] [--direction denoise|noise]
  [--metric NAME] [--verify-top K --verify-random R | --verify-until SHARE] [--by-pos]``.
- ``attrpatch validate OUT_DIR [--threshold NAME=VALUE ...]``: re-validate saved results (the
  saved diagnostics hold raw estimates, so every threshold is applied afresh).

Outputs (in ``--out``, written into a temporary directory beside it and renamed into place, so a
failure or a stop signal leaves nothing half-written; an existing ``--out`` is replaced only if
attrpatch wrote every file in it; Ctrl-C, SIGTERM and SIGHUP exit with 130, 143 and 129 and
leave the previous ``--out`` untouched): ``results.npz``
(``<method>/<granularity>`` for each estimator and ``exact``, ``graddrop/<granularity>`` for
AtP*), ``diagnostics.npz``, ``results.csv``,
``summary.json`` (strict JSON: NaN and infinities are ``null``), PNG figures and a
self-contained ``report.html``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import difflib
import json
import os
import platform
import shlex
import signal
import sys
import tempfile
import time
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from attrpatch.atomic import (
    UnsafeOutputError,
    check_target,
    listed_in_summary,
    remove_staging,
    replace_dir,
    staging_dir,
)
from attrpatch.interrupts import (
    EXIT_INTERRUPTED,
    EXIT_STATUSES,
    deferred_interrupts,
    exit_status,
    ignore_stop_signals,
    raise_if_interrupted,
)
from attrpatch.results import (
    DEFAULT_GRANULARITIES,
    ESTIMATORS,
    GRANULARITIES,
    PatchResults,
    Scores,
    available_granularities,
    check_granularities,
)

# TransformerLens short site names -> granularities (default, extra with --by-pos).
SITES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "resid_pre": (("resid_pre",), ()),
    "resid_mid": (("resid_mid",), ()),
    "resid_post": (("resid_post",), ()),
    "attn_out": (("attn_out",), ()),
    "mlp_out": (("mlp_out",), ()),
    "z": (("z",), ("z_by_pos",)),
    "q": (("q",), ("q_by_pos",)),
    "k": (("k",), ("k_by_pos",)),
    "v": (("v",), ("v_by_pos",)),
    "pattern": (("pattern",), ("pattern_by_query",)),
    "post": (("post",), ("post_by_pos",)),
}
DEFAULT_SITES = DEFAULT_GRANULARITIES  # less the MLP ones on attention-only models
DEMO_RANDOM_NEURONS = 32  # exact-verify this many random neurons outside AtP's top 64 (primary)
DEMO_SITES = ("resid_pre", "attn_out", "mlp_out", "z", "z_by_pos", "q", "k", "post")
DEFAULT_MODEL = "ioi-gpt2-4l"
METHODS = (*ESTIMATORS, "exact")
DEMO_METHODS = ("atp", "atp_star", "relp", "ig_inputs", "exact")


class CLIError(Exception):
    """Bad input found before any compute: printed as ``attrpatch: error: ...``, exit code 2."""


# What `attrpatch.patching.patch` warns when Ctrl-C stops it (it then returns partial results).
_PATCH_INTERRUPTED = "patch: interrupted"


def shipped_models_dir() -> Path:
    """The shipped checkpoints: ``attrpatch/models`` of an installed wheel, else ``models/`` of
    the checkout the package runs from, else of the current directory."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "models", package.parent / "models", Path.cwd() / "models"):
        if (candidate / DEFAULT_MODEL / "config.json").is_file():
            return candidate
    return package.parent / "models"


def default_model_dir() -> Path:
    """The shipped demo model, ``models/ioi-gpt2-4l``."""
    return shipped_models_dir() / DEFAULT_MODEL


def split_list(items) -> list[str]:
    """Command-line list values as given, with commas or spaces: ``["z,attn_out", "mlp_out"]``
    -> ``["z", "attn_out", "mlp_out"]``."""
    if isinstance(items, str):
        items = [items]
    return [s for item in items for s in item.replace(",", " ").split()]


def _unknown(kind: str, name: str, choices) -> CLIError:
    """An error for an unknown `name`, suggesting the closest valid choice."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return CLIError(f"unknown {kind} {name!r}{hint} Choose from {', '.join(choices)}")


def sites_to_granularities(sites, by_pos: bool = False, cfg=None) -> list[str]:
    """TransformerLens short names (or granularity names; comma- or space-separated) ->
    granularity names, in order; with a model config `cfg`, refuse those whose site the model
    lacks."""
    out: list[str] = []
    for s in split_list(sites):
        if s in SITES:
            base, extra = SITES[s]
            out += list(base) + (list(extra) if by_pos else [])
        elif s in GRANULARITIES:
            out.append(s)
        else:
            raise _unknown("site", s, [*SITES, *(g for g in GRANULARITIES if g not in SITES)])
    out = list(dict.fromkeys(out))
    if cfg is not None:
        try:
            check_granularities(out, cfg)
        except ValueError as e:
            raise CLIError(str(e)) from e
    return out


def parse_methods(items) -> tuple[str, ...]:
    """``--methods`` values (comma- or space-separated) -> method names, checked."""
    methods = tuple(dict.fromkeys(split_list(items)))
    if not methods:
        raise CLIError(f"--methods needs one or more of {', '.join(METHODS)}")
    for m in methods:
        if m not in METHODS:
            raise _unknown("--methods value", m, METHODS)
    return methods


def parse_thresholds(items):
    """``["large=0.2", "top_k=5,20"]`` -> :class:`attrpatch.validation.Thresholds`."""
    from attrpatch.validation import Thresholds

    t = Thresholds()
    fields = {f.name: f for f in dataclasses.fields(t)}
    changes = {}
    for item in items or ():
        name, sep, value = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in fields:
            raise CLIError(f"bad --threshold {item!r}: expected NAME=VALUE with NAME one of "
                           f"{', '.join(fields)}")
        try:
            if name == "top_k":
                changes[name] = tuple(int(v) for v in value.split(","))
            else:
                changes[name] = float(value)
        except ValueError as e:
            raise CLIError(f"bad --threshold {item!r}: {e}") from e
    try:
        return t.replace(**changes)
    except ValueError as e:
        raise CLIError(f"bad --threshold: {e}") from e


# ----------------------------------------------------------------------------------------------
# Output directory handling


def check_out(out: Path) -> None:
    """Refuse, before any compute, an `--out` that must not or cannot be replaced
    (:func:`attrpatch.atomic.check_target`): a file, a directory holding anything attrpatch did
    not write there, the current directory or one above it, home, or a place we cannot write to."""
    try:
        check_target(out, listed_in_summary, "--out")
    except UnsafeOutputError as e:
        raise CLIError(str(e)) from e


@contextmanager
def _output_dir(out: Path) -> Iterator[Path]:
    """A staging directory beside `out`, moved into place when the block ends (if `out` may
    still be replaced then) and removed if it fails; a stop signal meanwhile stops at the next
    safe point (:mod:`attrpatch.interrupts`), so an interrupted run leaves the previous `out`
    as it was, and one that lands during or after the move is ignored."""
    check_out(out)
    out = Path(out).resolve()
    made = []  # the staging directory, once there is one (a second signal removes it)
    try:
        with deferred_interrupts(cleanup=lambda: [remove_staging(s) for s in made]):
            made.append(staging_dir(out))
            yield made[0]
            raise_if_interrupted()
            replace_dir(made[0], out, listed_in_summary, "--out")
    except UnsafeOutputError as e:  # --out gained foreign files during the run; results kept
        raise CLIError(str(e)) from e
    finally:
        for s in made:
            remove_staging(s)  # nothing if it was moved into place or kept


# ----------------------------------------------------------------------------------------------
# Writing results


def token_strings(model_dir, task) -> list[str] | None:
    """Token strings of the first clean prompt (None without a tokenizer.json or GGUF file)."""
    if model_dir is None or not (Path(model_dir).is_file() or (Path(model_dir) / "tokenizer.json").is_file()):
        return None
    try:
        from attrpatch.tokenizer import display_token, load_tokenizer

        tok = load_tokenizer(model_dir)
    except (ImportError, OSError, ValueError):
        return None
    ids = np.asarray(task.clean_tokens[0]).tolist()
    return [display_token(tok.id_to_token(i) or str(i)) for i in ids]


def _versions() -> dict:
    import jax

    import attrpatch

    return {"attrpatch": attrpatch.__version__, "jax": jax.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "backend": jax.default_backend()}


def results_meta(r: PatchResults | None) -> dict | None:
    if r is None:
        return None
    return {"method": r.method, "direction": r.direction, "metric": r.metric,
            "source": getattr(r, "source", "default"),
            "base_metric": r.base_metric, "source_metric": r.source_metric, "gap": r.gap,
            "seconds": r.seconds, "cost_forwards": r.cost_forwards, "granularities": list(r.scores)}


def comparison(validations: dict) -> dict:
    """Estimators side by side per site family: ``{family: {method: {verdict, pearson,
    spearman, recall@K..., n_flags}}}`` from each estimator's :class:`Validation`."""
    from attrpatch.validation import recall_keys

    out: dict = {}
    for method, v in validations.items():
        for fam, s in v.by_family.items():
            out.setdefault(fam, {})[method] = {
                "verdict": v.verdicts[fam], "n_flags": s["n_flags"],
                **{k: s[k] for k in ("pearson", "spearman") + tuple(recall_keys(v.thresholds))}}
    return out


def _write_csv(path: Path, results: list[PatchResults], validations: dict, tokens) -> None:
    """One row per method, granularity and component; an estimator's rows carry its own flags,
    exact's rows the primary estimator's."""
    from attrpatch.validation import component_label

    flags = {(m, f.granularity, f.index): f for m, v in validations.items() for f in v.flags}
    primary = next(iter(validations), None)  # exact rows carry the primary estimator's flags
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "granularity", "component", "index", "effect", "normalized",
                    "flag", "severity", "level", "causes"])
        for r in results:
            gap = r.gap
            for g, s in r.scores.items():
                v = np.asarray(s.values, float)
                for idx in np.ndindex(v.shape):
                    x = v[idx]
                    f = flags.get((r.method if r.method in validations else primary, g,
                                   tuple(int(i) for i in idx)))
                    norm = x / gap if gap != 0 else float("nan")
                    w.writerow([
                        r.method, g, component_label(g, idx, tokens), ",".join(map(str, idx)),
                        "" if not np.isfinite(x) else f"{x:.6g}",
                        "" if not np.isfinite(norm) else f"{norm:.6g}",
                        f.kind if f else "", f"{f.severity:.4g}" if f else "",
                        f.level if f else "", ";".join(f.causes) if f else "",
                    ])


def write_outputs(out_dir: Path, estimates: dict, exact, validations: dict, diagnostics, budget,
                  run: dict, tokens, until: dict | None = None) -> dict:
    """Write every output file into `out_dir` (an existing, empty directory); returns summary.

    `estimates`: method -> :class:`PatchResults` of each estimator run, the first one primary
    (its validation is ``summary["validation"]`` and its heatmaps are drawn); `validations`:
    method -> :class:`Validation` against `exact` (empty without exact results); `budget`:
    granularity -> :class:`BudgetReport`; `until`: granularity -> :class:`UntilReport` (or its
    saved JSON) of sequential verification.
    """
    from attrpatch.report import make_figures, write_report

    primary = next(iter(estimates.values()), None)
    validation = validations.get(primary.method) if primary is not None else None
    results = [*estimates.values(), *([exact] if exact is not None else [])]
    arrays = {f"{r.method}/{g}": np.asarray(sc.values) for r in results for g, sc in r.scores.items()}
    for r in estimates.values():
        arrays |= {f"graddrop/{g}": np.asarray(v) for g, v in (r.graddrop or {}).items()}
    np.savez(out_dir / "results.npz", **arrays)
    if diagnostics is not None:
        np.savez(out_dir / "diagnostics.npz", **diagnostics.to_arrays())
    _write_csv(out_dir / "results.csv", results, validations, tokens)
    t0 = time.perf_counter()
    figures = make_figures(out_dir, primary, exact, validation, tokens)
    run = dict(run)
    run.setdefault("timings", {})["figures_s"] = round(time.perf_counter() - t0, 3)
    summary = {
        "run": run,
        "mesh": run.get("mesh"),
        "tokens": tokens,
        "primary": primary.method if primary is not None else None,
        "estimators": {m: results_meta(r) for m, r in estimates.items()},
        "exact": results_meta(exact),
        "validation": validation.to_json() if validation is not None else None,
        "comparison": comparison(validations) if validations else None,
        "validations": {m: v.to_json() for m, v in validations.items() if v is not validation},
        "diagnostics": diagnostics.meta() if diagnostics is not None else None,
        "budget": {g: b.to_json() for g, b in budget.items()} if budget else None,
        "verify_until": {g: r if isinstance(r, dict) else r.to_json()
                         for g, r in until.items()} if until else None,
        "figures": [p.name for p in figures],
        "files": sorted(["results.npz", "results.csv", "summary.json", "report.html"]
                        + (["diagnostics.npz"] if diagnostics is not None else [])
                        + [p.name for p in figures]),
    }
    summary = json_safe(summary)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, allow_nan=False))
    write_report(out_dir, summary, figures, validation)
    return summary


def json_safe(x):
    """`x` with numpy values as Python ones, paths as strings, and NaN / infinities as None
    (strict JSON has no NaN)."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, np.ndarray):
        return json_safe(x.tolist())
    if isinstance(x, np.generic):
        return json_safe(x.item())
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, float) and not np.isfinite(x):
        return None
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def load_outputs(out_dir: Path):
    """(estimates {method: PatchResults}, exact, diagnostics, summary) from a previous run's
    output directory; a missing, corrupt or foreign file is a `CLIError` naming it."""
    from attrpatch.validation import Diagnostics

    out_dir = Path(out_dir)
    for name in ("results.npz", "summary.json"):
        if not (out_dir / name).is_file():
            raise CLIError(f"{out_dir} has no {name}; is it an attrpatch output directory?")
    current = "summary.json"
    try:
        summary = json.loads((out_dir / "summary.json").read_text())
        if not isinstance(summary, dict) or not isinstance(summary.get("run"), dict):
            raise ValueError("not an attrpatch summary (no 'run' object)")
        current = "results.npz"
        with np.load(out_dir / "results.npz", allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        def results_of(meta):
            method = meta["method"]
            grids = lambda prefix: {k.split("/", 1)[1]: v for k, v in arrays.items()
                                    if k.startswith(prefix + "/")}
            return PatchResults(method, meta["direction"], meta["metric"], meta["base_metric"],
                                meta["source_metric"],
                                {g: Scores(g, v) for g, v in grids(method).items()},
                                seconds=meta.get("seconds"), cost_forwards=meta.get("cost_forwards"),
                                graddrop=grids("graddrop") if method == "atp_star" else None)

        # outputs written before there were several estimators hold one, under "atp"
        metas = summary.get("estimators") or ({"atp": summary["atp"]} if summary.get("atp") else {})
        estimates = {m: results_of(meta) for m, meta in metas.items()}
        exact = results_of(summary["exact"]) if summary.get("exact") else None
        diagnostics = None
        if (out_dir / "diagnostics.npz").is_file() and summary.get("diagnostics"):
            current = "diagnostics.npz"
            with np.load(out_dir / "diagnostics.npz", allow_pickle=False) as f:
                diagnostics = Diagnostics.from_arrays({k: f[k] for k in f.files},
                                                      summary["diagnostics"])
    except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError,
            zipfile.BadZipFile) as e:
        raise CLIError(f"{out_dir / current} is corrupt or not attrpatch's ({type(e).__name__}: "
                       f"{e}); rerun the scan to rewrite it") from e
    return estimates, exact, diagnostics, summary


# ----------------------------------------------------------------------------------------------
# Commands


def _model_dir(name: str, allow_download: bool) -> Path:
    """A checkpoint directory, or a Hugging Face repo id found in the local hub cache (fetched
    only with `allow_download`), or a llama.cpp ``.gguf`` file as it is."""
    from attrpatch.loading import resolve_checkpoint

    if name.lower().endswith(".gguf"):  # load_model reads it, and says so when it is missing
        return Path(name)
    try:
        return resolve_checkpoint(name, allow_download)
    except (FileNotFoundError, ValueError) as e:
        message = str(e).replace("(`allow_download=True`)", "(--allow-download)")
        raise CLIError(message) from e


def _load_model(model_dir):
    from attrpatch.loading import load_model

    try:
        return load_model(model_dir)
    except (FileNotFoundError, ValueError, ImportError) as e:  # ImportError: a .gguf without gguf
        raise CLIError(str(e)) from e


def run_pipeline(model, model_dir, task, granularities, methods, direction, metric, out: Path,
                 run: dict, thresholds, verify_top=None, verify_random=None, seed=0,
                 quiet=False, steps=5, verify_until=None, verify_budget=None, mesh=None) -> dict:
    """Estimators / exact / budgeted or sequential verification, diagnostics, validation of
    every estimator, outputs (atomic). The first estimator in `methods` is the primary one:
    verification follows its ranking and the figures show it. `verify_until` (share of the
    gap) runs :func:`attrpatch.validation.verify_until` (at most `verify_budget` exact patches
    per granularity) instead of exact patching of everything. `mesh`: where every engine runs
    (None: one device); in a multi-process run only process 0 writes `out`."""
    from attrpatch.sharding import is_writer, mesh_record, shard_model
    from attrpatch.validation import (
        budget_report,
        budget_sample,
        diagnose,
        relp_rule_effects,
        validate,
        verify_budgeted,
        verify_random_rest,
    )
    from attrpatch.validation import verify_until as verify_sequentially

    model = shard_model(model, mesh)  # once, not per engine
    with _output_dir(out) if is_writer() else tempfile.TemporaryDirectory() as staging:
        staging = Path(staging)
        try:
            raise_if_interrupted()  # a Ctrl-C while loading
            timings = {}
            estimates, exact, diagnostics, validations, budget, until = {}, None, None, {}, {}, {}
            from attrpatch.attribution import attribute

            for method in (m for m in methods if m in ESTIMATORS):
                t0 = time.perf_counter()
                estimates[method] = attribute(model, task, granularities=granularities,
                                              direction=direction, metric=metric, method=method,
                                              steps=steps, mesh=mesh, progress=not quiet)
                timings[f"{method}_s"] = round(time.perf_counter() - t0, 3)
                raise_if_interrupted()
            primary = next(iter(estimates.values()), None)
            if "exact" in methods:
                from attrpatch.patching import patch

                t0 = time.perf_counter()
                kwargs = {}
                if any(g.startswith("post") for g in granularities):
                    # the primary estimator's top neurons where one ran (the rest stay NaN), else
                    # every neuron.
                    cfg = model.config
                    kwargs["neurons"] = primary if primary is not None else [
                        (layer, n) for layer in range(cfg.n_layers) for n in range(cfg.d_mlp)]
                exact = _patch_or_interrupt(patch, model, task, granularities=granularities,
                                            direction=direction, metric=metric, progress=not quiet,
                                            mesh=mesh, **kwargs)
                timings["exact_s"] = round(time.perf_counter() - t0, 3)
            if primary is not None and verify_until is not None:
                t0 = time.perf_counter()
                exact, until = verify_sequentially(model, task, primary, verify_until,
                                                    granularities=granularities, metric=metric,
                                                    max_verified=verify_budget, seed=seed,
                                                    mesh=mesh, progress=not quiet)
                timings["verify_s"] = round(time.perf_counter() - t0, 3)
            elif primary is not None and (verify_top or verify_random):
                t0 = time.perf_counter()
                if exact is not None and verify_top is None:
                    # exact covers some components only (neurons): sample the uncovered ones
                    budget = verify_random_rest(model, task, primary, exact, verify_random, seed,
                                                thresholds, mesh=mesh)
                elif exact is None:
                    exact, budget = verify_budgeted(model, task, primary, verify_top or 0,
                                                    verify_random or 0, seed, thresholds, mesh=mesh)
                else:
                    for g in granularities:
                        top, rand = budget_sample(primary.ranking(g), verify_top or 0,
                                                  verify_random or 0, seed)
                        thr = thresholds.large * max(abs(exact.gap), thresholds.min_gap)
                        budget[g] = budget_report(g, primary[g], exact[g], top, rand, thr)
                timings["verify_s"] = round(time.perf_counter() - t0, 3)
            tokens = token_strings(model_dir, task)
            if estimates and exact is not None:
                t0 = time.perf_counter()
                diagnostics = diagnose(model, task, granularities, direction, metric, thresholds,
                                       mesh=mesh, progress=not quiet)
                timings["diagnose_s"] = round(time.perf_counter() - t0, 3)
                raise_if_interrupted()
                validations = {m: validate(r, exact, diagnostics, thresholds, tokens,
                                           estimators=estimates) for m, r in estimates.items()}
                # where RelP got a flagged component right: RelP without each rule there, so the
                # flag names the rule that fixes it
                credited = [g for g in granularities if any(
                    f.granularity == g and "relp" in f.better for v in validations.values()
                    for f in v.flags)]
                if credited:
                    t0 = time.perf_counter()
                    without = relp_rule_effects(model, task, credited, direction, metric,
                                                mesh=mesh, progress=not quiet)
                    timings["relp_rules_s"] = round(time.perf_counter() - t0, 3)
                    validations = {m: validate(r, exact, diagnostics, thresholds, tokens,
                                               estimators=estimates | without)
                                   for m, r in estimates.items()}
            run = dict(run, timings=timings, versions=_versions(),
                       thresholds=dataclasses.asdict(thresholds), mesh=mesh_record(mesh))
        except (ValueError, MemoryError) as e:  # bad input the library found, a run too big
            raise CLIError(str(e)) from e
        summary = write_outputs(staging, estimates, exact, validations, diagnostics, budget, run,
                                tokens, until)
    return summary


def _patch_or_interrupt(patch, *args, **kwargs) -> PatchResults:
    """`patch(*args, **kwargs)`, raising `KeyboardInterrupt` where Ctrl-C stopped it: the engine
    then warns and returns partial results (NaN where not computed), which must not be written
    as if complete. Its other warnings are passed on."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = patch(*args, **kwargs)
    interrupted = not getattr(res, "complete", True)
    for w in caught:
        if str(w.message).startswith(_PATCH_INTERRUPTED):
            interrupted = True
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if interrupted:
        raise KeyboardInterrupt
    return res


def _num(x, fmt: str) -> str:
    """`x` formatted, "n/a" for None / NaN (summary.json holds null for NaN)."""
    return "n/a" if x is None or not np.isfinite(x) else format(x, fmt)


def print_summary(summary: dict, out: Path, file=None) -> None:
    """A short table: verdict and agreement per family, the worst flags, the report path."""
    file = file or sys.stdout
    v = summary.get("validation")
    timings = summary["run"].get("timings", {})
    first = next(iter((summary.get("estimators") or {}).values()), None) or summary.get("exact")
    if first:
        print(f"metric {first['metric']} ({first['direction']}): base {first['base_metric']:.4g}, "
              f"source {first['source_metric']:.4g}, gap {first['gap']:.4g}", file=file)
    if v:
        print(f"validation of {summary['primary']} against exact:", file=file)
        # the recall columns the thresholds asked for (recall@K per top_k, then the share one)
        recalls = [k for k in next(iter(v["by_family"].values()), {}) if k.startswith("recall@")]
        print(f"{'family':<20}{'verdict':<12}{'n':>6}{'pearson':>9}{'spearman':>9}"
              + "".join(f"{k:>11}" for k in recalls) + f"{'flags':>7}", file=file)
        for fam, s in v["by_family"].items():
            print(f"{fam:<20}{v['verdicts'][fam]:<12}{s['n']:>6}{_num(s['pearson'], '.3f'):>9}"
                  f"{_num(s['spearman'], '.3f'):>9}"
                  + "".join(f"{_num(s.get(k), '.2f'):>11}" for k in recalls)
                  + f"{s['n_flags']:>7}", file=file)
        if v.get("note"):
            print(v["note"], file=file)
        for fam, items in (v.get("drivers") or {}).items():
            print(f"  {fam} ({v['verdicts'][fam]}) driven by: " + ", ".join(
                d["label"] for d in items[:3]), file=file)
        for f in v["flags"][:5]:
            print(f"  [{f['level']}] {f['label']}: {f['reason']}", file=file)
        if len(v["flags"]) > 5:
            print(f"  ... {len(v['flags']) - 5} more flags in results.csv", file=file)
    comp = summary.get("comparison") or {}
    methods = list(summary.get("estimators") or {})
    if len(methods) > 1 and comp:
        first_cell = next(iter(next(iter(comp.values())).values()))
        recall = next((k for k in first_cell if k.startswith("recall@")), None)
        print(f"estimators against exact (pearson / {recall} / flags; cost in forwards):", file=file)
        print(f"{'family':<20}" + "".join(f"{m:>22}" for m in methods), file=file)
        for fam, by_method in comp.items():
            cells = [by_method.get(m) for m in methods]
            text = ["-" if c is None else f"{_num(c['pearson'], '.2f')} / "
                    f"{_num(c.get(recall), '.2f')} / {c['n_flags']}" for c in cells]
            print(f"{fam:<20}" + "".join(f"{t:>22}" for t in text), file=file)
        print(f"{'cost':<20}" + "".join(
            f"{_num(summary['estimators'][m].get('cost_forwards'), '.0f'):>22}" for m in methods), file=file)
    for r in (summary.get("verify_until") or {}).values():
        print(f"verified until: {r['sentence']}", file=file)
    for g, b in (summary.get("budget") or {}).items():
        print(f"budget {g}: verified top {len(b['top'])} + {len(b['random'])} random of "
              f"{b['n_components']}; est. missed large effects {_num(b['missed_estimate'], '.3g')} "
              f"(95% upper {_num(b['missed_upper'], '.3g')})", file=file)
    if timings:
        print("timings: " + ", ".join(f"{k} {v:.2f}" for k, v in timings.items()), file=file)
    print(f"report: {Path(out).resolve() / 'report.html'}", file=file)


def _compile_cache(args) -> None:
    """JAX's persistent compilation cache on (:func:`attrpatch.enable_compilation_cache`), unless
    ``--no-compile-cache`` or ``ATTRPATCH_COMPILE_CACHE=0``; a cache directory that cannot be
    created only warns."""
    if args.no_compile_cache or os.environ.get("ATTRPATCH_COMPILE_CACHE") == "0":
        return
    from attrpatch.model import compilation_cache_dir, enable_compilation_cache

    try:
        enable_compilation_cache()
    except OSError as e:
        print(f"attrpatch: warning: no compilation cache ({compilation_cache_dir()}: {e.strerror})",
              file=sys.stderr)


def cmd_demo(args) -> int:
    from attrpatch.tasks import task_for_model

    t_start = time.perf_counter()
    _compile_cache(args)
    model_dir = _model_dir(args.model, args.allow_download) if args.model else default_model_dir()
    if not (model_dir / "config.json").is_file():
        raise CLIError(f"demo model {model_dir} not found (pass --model DIR)")
    check_out(args.out)
    model = _load_model(model_dir)
    try:
        task = task_for_model(model_dir, n_prompts=args.n_prompts)
        task.check_for(model)
    except (FileNotFoundError, ValueError) as e:
        raise CLIError(str(e)) from e
    grans = list(available_granularities(model.config, sites_to_granularities(DEMO_SITES)))
    thresholds = parse_thresholds(args.threshold)
    run = {"command": _command(), "subcommand": "demo", "model": str(model_dir),
           "data": str(model_dir / "attrpatch_task.json"), "out": str(args.out),
           "direction": args.direction, "metric": task.metric,
           "methods": ",".join(DEMO_METHODS), "granularities": ",".join(grans),
           "n_prompts": task.batch, "n_pos": task.n_pos}
    out = Path(args.out)
    summary = run_pipeline(model, model_dir, task, grans, DEMO_METHODS, args.direction, None, out,
                           run, thresholds, verify_random=DEMO_RANDOM_NEURONS, quiet=args.quiet)
    print_summary(summary, out)
    print(f"demo wall time {time.perf_counter() - t_start:.1f}s")
    return 0


def _mesh_from_args(args):
    """Join the multi-process run the flags describe (or the JAX environment variables do), then
    build the ``--mesh`` (None: one device)."""
    from attrpatch.sharding import initialize_distributed, make_mesh, parse_mesh

    try:
        data, model = parse_mesh(args.mesh) if args.mesh else (1, 1)
        if args.coordinator == "auto":  # a TPU pod or SLURM: JAX finds the rest itself
            initialize_distributed()
        elif (args.coordinator or args.num_processes is not None
              or os.environ.get("JAX_COORDINATOR_ADDRESS")):
            initialize_distributed(args.coordinator, args.num_processes, args.process_id)
        if not args.mesh:
            return None
        return make_mesh(data, model)
    except (ValueError, RuntimeError) as e:
        raise CLIError(str(e)) from e


def cmd_scan(args) -> int:
    import jax

    from attrpatch.data import DataError, load_task
    from attrpatch.sharding import is_writer

    mesh = _mesh_from_args(args)  # first: a multi-process run starts before any other JAX call
    _compile_cache(args)
    methods = parse_methods(args.methods)
    if (args.verify_top or args.verify_random) and not set(methods) & set(ESTIMATORS):
        raise CLIError(f"--verify-top/--verify-random need an estimator in --methods "
                       f"({', '.join(ESTIMATORS)})")
    if args.steps < 1:
        raise CLIError("--steps must be >= 1")
    if args.verify_until is not None:
        if not 0 < args.verify_until < 1:
            raise CLIError("--verify-until takes a share of the gap between 0 and 1, e.g. 0.05")
        if "exact" in methods or args.verify_top or args.verify_random:
            raise CLIError("--verify-until replaces exact patching of everything and "
                           "--verify-top/--verify-random: drop exact from --methods")
        if not set(methods) & set(ESTIMATORS):
            raise CLIError("--verify-until needs an estimator in --methods to order the components")
    if args.verify_budget is not None and (args.verify_budget < 1 or args.verify_until is None):
        raise CLIError("--verify-budget takes a positive number of exact patches, with --verify-until")
    for name in ("verify_top", "verify_random"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 0")
    thresholds = parse_thresholds(args.threshold)
    if is_writer():  # only process 0 writes --out
        check_out(args.out)
    model_dir = _model_dir(args.model, args.allow_download)
    model = _load_model(model_dir)
    if args.sites is None:  # the defaults, less MLP sites on an attention-only model
        grans = list(available_granularities(
            model.config, sites_to_granularities(DEFAULT_SITES, args.by_pos)))
    else:
        grans = sites_to_granularities(args.sites, args.by_pos, model.config)
    try:
        task = load_task(args.data, model=model, model_dir=model_dir, metric=args.metric,
                         prepend_bos=args.prepend_bos)
    except DataError as e:
        raise CLIError(str(e)) from e
    run = {"command": _command(), "subcommand": "scan", "model": str(args.model),
           "data": str(args.data), "out": str(args.out), "direction": args.direction,
           "metric": args.metric,
           "methods": ",".join(methods), "granularities": ",".join(grans),
           "n_prompts": task.batch, "n_pos": task.n_pos, "prepend_bos": args.prepend_bos,
           "verify_top": args.verify_top,
           "verify_random": args.verify_random, "seed": args.seed, "steps": args.steps,
           "verify_until": args.verify_until, "verify_budget": args.verify_budget}
    out = Path(args.out)
    summary = run_pipeline(model, model_dir, task, grans, methods, args.direction, args.metric,
                           out, run, thresholds, args.verify_top, args.verify_random, args.seed,
                           quiet=args.quiet, steps=args.steps, verify_until=args.verify_until,
                           verify_budget=args.verify_budget, mesh=mesh)
    if is_writer():
        print_summary(summary, out)
    else:
        print(f"attrpatch: process {jax.process_index()} done; process 0 wrote {out}")
    return 0


def cmd_circuit(args) -> int:
    from attrpatch.circuits import EDGE_METHODS
    from attrpatch.circuits.report import run_circuit
    from attrpatch.data import DataError, load_task
    from attrpatch.tasks import task_for_model

    t_start = time.perf_counter()
    _compile_cache(args)
    methods = tuple(split_list(args.method))
    for m in methods:
        if m not in EDGE_METHODS:
            raise _unknown("edge method", m, EDGE_METHODS)
    try:
        sizes = [int(n) for n in split_list(args.edges)] if args.edges else None
    except ValueError as e:
        raise CLIError(f"--edges takes edge counts, e.g. 50,100,200 ({e})") from e
    if sizes is not None and (not sizes or min(sizes) < 1):
        raise CLIError("--edges takes positive edge counts, e.g. 50,100,200")
    if args.steps < 1:
        raise CLIError("--steps must be >= 1")
    if args.data and args.n_prompts is not None:
        raise CLIError("--n-prompts applies to the model's own task; with --data every prompt "
                       "of the file is used")
    thresholds = parse_thresholds(args.threshold)
    check_out(args.out)
    model_dir = _model_dir(args.model, args.allow_download) if args.model else default_model_dir()
    model = _load_model(model_dir)
    try:
        if args.data:
            task = load_task(args.data, model=model, model_dir=model_dir,
                             metric=args.metric or "logit_diff")
        else:
            task = task_for_model(model_dir, n_prompts=args.n_prompts)
        task.check_for(model)
    except (DataError, FileNotFoundError, ValueError) as e:
        raise CLIError(str(e)) from e
    run = {"command": _command(), "subcommand": "circuit", "model": str(model_dir),
           "data": str(args.data or model_dir / "attrpatch_task.json"), "direction": args.direction,
           "metric": args.metric or task.metric, "methods": ",".join(methods), "steps": args.steps,
           "n_prompts": task.batch, "n_pos": task.n_pos}
    out = Path(args.out)
    with _output_dir(out) as staging:
        try:
            summary = run_circuit(model, task, methods, sizes, staging, run, thresholds, args.how,
                                  args.direction, args.metric, args.steps, progress=not args.quiet)
        except (ValueError, MemoryError) as e:  # bad input the library found, a run too big
            raise CLIError(str(e)) from e
    print(f"{summary['run']['n_edges_graph']} edges; exact: {summary['run']['exact']}")
    for m, v in summary["validation"].items():
        a = v["agreement"]
        print(f"  {m:20s} {v['verdict']:10s} Pearson {_num(a['pearson'], '.3f')}  "
              f"Spearman {_num(a['spearman'], '.3f')}  flags {a['n_flags']}")
    for p in summary["faithfulness"]:
        print(f"  faithfulness {p['method']:20s} {p['n_edges']:6d} edges  {p['faithfulness']:+.3f}")
    print(f"wrote {out}/report.html; wall time {time.perf_counter() - t_start:.1f}s")
    return 0


def cmd_models(args) -> int:
    """One line per shipped model: name, family and size, task, path."""
    root = shipped_models_dir()
    dirs = sorted(p for p in root.glob("*") if (p / "config.json").is_file())
    if not dirs:
        raise CLIError(f"no shipped models found in {root}")
    for d in dirs:
        cfg = json.loads((d / "config.json").read_text())
        layers = cfg.get("n_layer", cfg.get("num_hidden_layers"))
        width = cfg.get("n_embd", cfg.get("hidden_size"))
        task_file = d / "attrpatch_task.json"
        task = json.loads(task_file.read_text()).get("task") if task_file.is_file() else None
        default = "  (demo default)" if d.name == DEFAULT_MODEL else ""
        print(f"{d.name:<24} {cfg.get('model_type')}, {layers} layers, d_model {width}; "
              f"task {task}  {d}{default}")
    return 0


def cmd_validate(args) -> int:
    from attrpatch.validation import validate

    out = Path(args.out_dir)
    estimates, exact, diagnostics, old = load_outputs(out)
    if not estimates or exact is None:
        raise CLIError(f"{out} needs an estimator's and exact results to validate")
    thresholds = parse_thresholds(args.threshold)
    tokens = old.get("tokens")
    validations = {m: validate(r, exact, diagnostics, thresholds, tokens, estimators=estimates)
                   for m, r in estimates.items()}
    budget = None
    if old.get("budget"):
        from attrpatch.validation import budget_report

        primary = next(iter(estimates.values()))
        budget = {}
        for g, b in old["budget"].items():
            thr = thresholds.large * max(abs(exact.gap), thresholds.min_gap)
            ndim = primary[g].ndim
            budget[g] = budget_report(g, primary[g], exact[g], np.asarray(b["top"], int).reshape(
                -1, ndim), np.asarray(b["random"], int).reshape(-1, ndim), thr)
    run = dict(old["run"], revalidated_by=_command(), thresholds=dataclasses.asdict(thresholds))
    with _output_dir(out) as staging:
        summary = write_outputs(staging, estimates, exact, validations, diagnostics, budget, run,
                                tokens, old.get("verify_until"))
    print_summary(summary, out)
    return 0


def _command() -> str:
    return " ".join(shlex.quote(a) for a in ["attrpatch", *sys.argv[1:]])


def build_parser() -> argparse.ArgumentParser:
    from attrpatch.task import METRICS

    p = argparse.ArgumentParser(prog="attrpatch", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    thr_help = ("override a validation threshold (attrpatch.validation.Thresholds), e.g. "
                "large=0.2 or attn_saturation=0.9; repeatable")
    cache_help = ("do not keep compiled computations across runs (default: kept in "
                  "$ATTRPATCH_CACHE_DIR, else $XDG_CACHE_HOME/attrpatch, else ~/.cache/attrpatch)")

    d = sub.add_parser("demo", help="AtP, AtP*, IG + exact patching + validation on the shipped IOI model")
    d.add_argument("--model", help=f"checkpoint directory or Hugging Face repo id in the local "
                                   f"cache (default: models/{DEFAULT_MODEL})")
    d.add_argument("--allow-download", action="store_true",
                   help="fetch a repo id missing from the Hugging Face cache")
    d.add_argument("--out", default="attrpatch-demo", help="output directory")
    d.add_argument("--n-prompts", type=int, default=None, help="prompts (default: the model's)")
    d.add_argument("--direction", choices=("denoise", "noise"), default="noise",
                   help="noise (default: corrupted activations into the clean run, where AtP "
                        "fails on the shipped model's residual stream and first MLP) or denoise")
    d.add_argument("--threshold", action="append", metavar="NAME=VALUE", help=thr_help)
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.add_argument("--no-compile-cache", action="store_true", help=cache_help)
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("scan", help="patch a model on a data file")
    s.add_argument("--model", required=True,
                   help="checkpoint directory, Hugging Face repo id (org/name) in the local cache, or "
                        "llama.cpp .gguf file (its tokenizer tokenises text prompts)")
    s.add_argument("--allow-download", action="store_true",
                   help="fetch a repo id missing from the Hugging Face cache (offline otherwise)")
    s.add_argument("--data", required=True,
                   help=".npz/.json token ids, or text prompts (.json/.jsonl/.csv/.tsv, "
                        "auto-circuit); see attrpatch.data")
    s.add_argument("--prepend-bos", action="store_true",
                   help="text prompts: put the tokenizer's BOS token first")
    s.add_argument("--sites", nargs="+", default=None,
                   help=f"TransformerLens short names, commas or spaces: {', '.join(SITES)} (default: "
                        f"{' '.join(DEFAULT_SITES)}; mlp_out dropped on attention-only models)")
    s.add_argument("--by-pos", action="store_true",
                   help="head/pattern/neuron sites also per position (z_by_pos, ...)")
    s.add_argument("--methods", nargs="+", default=["atp,exact"],
                   help=f"estimators and/or exact, commas or spaces: {', '.join(METHODS)} "
                        "(default atp,exact); the first estimator is the primary one (verification "
                        "order, figures); every estimator is validated against exact")
    s.add_argument("--steps", type=int, default=5,
                   help="integration steps of ig and ig_inputs (cost grows linearly; default 5)")
    s.add_argument("--direction", choices=("denoise", "noise"), default="denoise")
    s.add_argument("--metric", choices=tuple(METRICS), default="logit_diff")
    s.add_argument("--verify-top", type=int, default=None, metavar="K",
                   help="exact-verify the primary estimator's top K components")
    s.add_argument("--verify-random", type=int, default=None, metavar="R",
                   help="and R random others, to estimate what the estimator missed")
    s.add_argument("--verify-until", type=float, default=None, metavar="SHARE",
                   help="exact-verify in the primary estimator's order until, with 95%% confidence, "
                        "the unverified components' |effect| is bounded below SHARE of the gap "
                        "(e.g. 0.05); instead of exact patching of everything")
    s.add_argument("--verify-budget", type=int, default=None, metavar="N",
                   help="with --verify-until: at most N exact patches per granularity")
    s.add_argument("--seed", type=int, default=0, help="seed of the random verification sample")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--threshold", action="append", metavar="NAME=VALUE", help=thr_help)
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.add_argument("--no-compile-cache", action="store_true", help=cache_help)
    s.add_argument("--mesh", default=None, metavar="data=D,model=M",
                   help="run on a device mesh: D-way over prompts and patched runs, M-way over "
                        "heads and MLP width (default: one device)")
    s.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="multi-process run: process 0's address, or 'auto' on a TPU pod or under "
                        "SLURM (every process runs the same command; only process 0 writes --out)")
    s.add_argument("--num-processes", type=int, default=None, metavar="N",
                   help="multi-process run: how many processes (with --coordinator)")
    s.add_argument("--process-id", type=int, default=None, metavar="I",
                   help="multi-process run: this process's id, 0..N-1 (with --coordinator)")
    s.set_defaults(func=cmd_scan)

    v = sub.add_parser(
        "validate", help="re-validate saved results with other thresholds",
        description="Re-validate a scan/demo output directory with other thresholds, rewriting "
                    "it. Every threshold is applied afresh: the saved diagnostics hold raw "
                    "estimates, and the threshold-dependent ones (nonlinearity, metric "
                    "saturation) are recomputed.")
    v.add_argument("out_dir", help="a scan/demo output directory")
    v.add_argument("--threshold", action="append", metavar="NAME=VALUE", help=thr_help)
    v.set_defaults(func=cmd_validate)

    c = sub.add_parser("circuit", help="score edges (EAP, EAP-IG), check them exactly, find circuits")
    c.add_argument("--model", help=f"checkpoint directory, Hugging Face repo id in the local "
                                   f"cache, or .gguf file (default: models/{DEFAULT_MODEL})")
    c.add_argument("--allow-download", action="store_true",
                   help="fetch a repo id missing from the Hugging Face cache")
    c.add_argument("--data", default=None,
                   help="prompts as for scan (default: the model's attrpatch_task.json)")
    c.add_argument("--n-prompts", type=int, default=None,
                   help="prompts of the model's own task (default: the model's)")
    c.add_argument("--method", nargs="+", default=["eap,eap_ig_inputs"],
                   help="edge scores, commas or spaces: eap, relp, eap_ig_inputs, eap_ig_activations "
                        "(default eap,eap_ig_inputs; the first draws circuit.png)")
    c.add_argument("--edges", nargs="+", default=None, metavar="N",
                   help="circuit sizes for the faithfulness curve, e.g. 50,100,200 (default: "
                        "5%%, 10%%, 20%% and 50%% of the graph's edges)")
    c.add_argument("--how", choices=("top", "greedy"), default="top",
                   help="circuit by the largest |scores| (top) or grown from the logits (greedy)")
    c.add_argument("--steps", type=int, default=5, help="EAP-IG integration steps (default 5)")
    c.add_argument("--direction", choices=("denoise", "noise"), default="denoise")
    c.add_argument("--metric", choices=tuple(METRICS), default=None,
                   help="default: the task's (logit_diff)")
    c.add_argument("--out", required=True, help="output directory")
    c.add_argument("--threshold", action="append", metavar="NAME=VALUE", help=thr_help)
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.add_argument("--no-compile-cache", action="store_true", help=cache_help)
    c.set_defaults(func=cmd_circuit)

    m = sub.add_parser("models", help="list the shipped models")
    m.set_defaults(func=cmd_models)
    return p


def main(argv=None) -> int:
    """Entry point of the ``attrpatch`` console script; returns the exit code."""
    try:
        # From the start: importing JAX, loading and compiling are not safe points.
        with deferred_interrupts():
            args = build_parser().parse_args(argv)
            return args.func(args)
    except CLIError as e:
        print(f"attrpatch: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the staging directory is already gone; --out is untouched
        status = exit_status()
        by = "" if status == EXIT_INTERRUPTED else f" by {signal.Signals(status - 128).name}"
        print(f"attrpatch: interrupted{by}; nothing written", file=sys.stderr)
        return status


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings as the command line shows them: one line, no source location."""
    return f"attrpatch: warning: {message}\n"


def console_main() -> None:
    """The ``attrpatch`` console script: `main`, then exit. Stop signals are deferred for the
    whole process, and ignored once `main` has decided the outcome, so a late one cannot change
    the exit status. After a stop signal it exits without interpreter teardown (``os._exit``),
    which could otherwise race XLA's threads."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    warnings.formatwarning = _one_line_warning
    with deferred_interrupts():
        code = main()
        ignore_stop_signals()
    if code in EXIT_STATUSES:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    console_main()
