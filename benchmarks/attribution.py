"""Attribution patching (atp, atp*) against the exhaustive activation-patching sweep, on the default model.

    python -m benchmarks.attribution [--quick] [--runs N] [--positions all|changed] [--rows-out FILE]

The indirect-object pair of docs/attribution.md on SmolLM2-135M-Instruct (float32, CPU): clean "When John
and Mary went to the store, John gave a drink to", corrupted the same with the second "John" replaced by
"Mary" (14 tokens each); metric logit(" Mary") - logit(" John") at the last position. Sites: every layer's
attention, MLP and residual output (the endpoint's default), at every position: 30 x 3 x 14 = 1260 rows.

- atp: `Model.attribute(method="atp")`, the median wall time of --runs runs; atp*: the same with
  method "atp*" (the QK fix has no query or key site here; GradDrop adds one backward pass per layer).
- the sweep: one real patch per row through the interventions API, as a user would run it: a clean
  generation capturing every site once, then for each site and position a one-token generation of the
  corrupted prompt with that site and position `patch`ed from the clean capture, reading the two tokens'
  log-probabilities (their difference is the logit difference); patched = that - the corrupted metric.
  With --positions changed, only positions from the first token that differs (before it the two runs
  are identical, so every patch there is exactly 0 and so is every estimate; those rows are then
  counted as 0 without running them).

Reported: wall times and the sweep / attribution ratio; Pearson correlation of estimate with patched
over every row and over the rows at or after the first differing position; top-20 overlap (by |estimate|,
and for atp* also by its GradDrop score, against the 20 largest |patched|); the 10 largest patches with
both estimates. Writes benchmarks/results/attribution.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from benchmarks.report import machine_info, median, print_table, progress, write_result

CLEAN = "When John and Mary went to the store, John gave a drink to"
CORRUPT = "When John and Mary went to the store, Mary gave a drink to"
ANSWER, FOIL = " Mary", " John"
TOP = 20


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1]) if len(a) > 1 and a.std() > 0 and b.std() > 0 else float("nan")


def overlap(score: np.ndarray, truth: np.ndarray, k: int = TOP) -> int:
    top = lambda x: set(np.argsort(-x, kind="stable")[:k].tolist())  # noqa: E731
    return len(top(score) & top(np.abs(truth)))


def sweep(model, clean_ids, corrupted_ids, rows, ids, first_changed: int,
          changed_only: bool) -> tuple[np.ndarray, float]:
    """Real patching of every row (site, position) through the interventions API; (patched, seconds)."""
    from engine.interventions import sources_from

    t0 = time.perf_counter()
    sites = list(dict.fromkeys(r["layer_name"] for r in rows))
    clean = model.generate(prompt=clean_ids, max_tokens=1, temperature=0,
                           hooks=[{"layer_name": s} for s in sites]).capture
    sources = sources_from(clean)

    def metric(interventions=None) -> float:
        out = model.generate(prompt=corrupted_ids, max_tokens=1, temperature=0, hooks=None, logprob_token_ids=ids,
                             interventions=interventions, sources=sources if interventions else None)
        lp = dict(out.logprobs[0].targets)
        return lp[ids[0]] - lp[ids[1]]

    base = metric()
    patched = np.zeros(len(rows))
    for i, r in enumerate(rows):
        if changed_only and r["position"] < first_changed:
            continue
        patch = {"layer_name": r["layer_name"], "op": "patch", "positions": [r["position"]],
                 "source": {"capture_id": clean.capture_id, "hook_id": r["layer_name"]}}
        patched[i] = metric([patch]) - base
        if i % 100 == 0:
            progress(f"attribution: sweep {i}/{len(rows)}")
    return patched, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one run each, and the sweep on changed positions only")
    ap.add_argument("--runs", type=int, default=3, help="timed runs of each method (median)")
    ap.add_argument("--positions", choices=("all", "changed"), default="all",
                    help="the sweep's positions (changed: from the first differing token; the rest are 0)")
    ap.add_argument("--rows-out", help="also write every row's estimates and patch to this JSON file")
    args = ap.parse_args(argv)
    runs = 1 if args.quick else args.runs
    changed_only = args.quick or args.positions == "changed"

    import engine

    progress("attribution: loading the default model")
    model = engine.load("default")
    lm = model.lm
    clean_ids, corrupted_ids = lm.text_prompt(CLEAN), lm.text_prompt(CORRUPT)
    assert len(clean_ids) == len(corrupted_ids)
    first_changed = next(i for i, (a, b) in enumerate(zip(clean_ids, corrupted_ids)) if a != b)
    ids = [lm.text_prompt(ANSWER)[0], lm.text_prompt(FOIL)[0]]
    metric = {"type": "logit_diff", "token_ids": ids}
    request = dict(clean={"prompt": clean_ids}, corrupted={"prompt": corrupted_ids}, metric=metric)

    model.attribute(**request)  # warm-up
    methods = {}
    for method in ("atp", "atp*"):
        times, out = [], None
        for _ in range(runs):
            t0 = time.perf_counter()
            out = model.attribute(**request, method=method)
            times.append(time.perf_counter() - t0)
        methods[method] = {"out": out, "seconds": median(times), "times": times}
        progress(f"attribution: {method} {median(times):.2f} s ({len(out['attributions'])} rows)")
    rows = methods["atp"]["out"]["attributions"]

    patched, sweep_s = sweep(model, clean_ids, corrupted_ids, rows, ids, first_changed, changed_only)
    ran = sum(1 for r in rows if not (changed_only and r["position"] < first_changed))
    progress(f"attribution: sweep of {ran} patches {sweep_s:.1f} s")

    changed = np.array([r["position"] >= first_changed for r in rows])
    result_rows = []
    for method, m in methods.items():
        est = np.array([r["estimate"] for r in m["out"]["attributions"]])
        row = {"method": method, "seconds": round(m["seconds"], 3),
               "sweep_over_method": round(sweep_s / m["seconds"], 1),
               "correlation_all": round(correlation(est, patched), 4),
               "correlation_changed": round(correlation(est[changed], patched[changed]), 4),
               "top20_overlap": overlap(np.abs(est), patched)}
        for component in ("attention", "mlp", "residual"):  # per kind of site, at the changed positions
            keep = changed & np.array([r["component"] == component for r in rows])
            row[f"correlation_{component}"] = round(correlation(est[keep], patched[keep]), 4)
        keep = changed & np.array([r["component"] != "residual" for r in rows])
        row["correlation_attention_mlp"] = round(correlation(est[keep], patched[keep]), 4)
        row["top20_overlap_attention_mlp"] = overlap(np.where(keep, np.abs(est), -1), np.where(keep, patched, 0))
        if method == "atp*":
            gd = np.array([r["graddrop"] for r in m["out"]["attributions"]])
            row["top20_overlap_graddrop"] = overlap(gd, patched)
            row["graddrop_correlation_abs_patched"] = round(correlation(gd[changed], np.abs(patched[changed])), 4)
        result_rows.append(row)

    star = methods["atp*"]["out"]["attributions"]
    biggest = []
    for i in np.argsort(-np.abs(patched), kind="stable")[:10]:
        biggest.append({"site": rows[i]["layer_name"], "position": rows[i]["position"],
                        "patched": round(float(patched[i]), 4), "atp": round(rows[i]["estimate"], 4),
                        "atp_star": round(star[i]["estimate"], 4), "graddrop": round(star[i]["graddrop"], 4)})

    print_table(["method", "s", "sweep / method", "corr (all)", "corr (changed pos.)", "corr attn+mlp",
                 "corr resid", "top-20 overlap", "top-20 attn+mlp", "top-20 (GradDrop)"],
                [[r["method"], r["seconds"], r["sweep_over_method"], r["correlation_all"], r["correlation_changed"],
                  r["correlation_attention_mlp"], r["correlation_residual"], r["top20_overlap"],
                  r["top20_overlap_attention_mlp"], r.get("top20_overlap_graddrop", "-")] for r in result_rows])
    print_table(["site", "pos", "patched", "atp", "atp*", "graddrop"],
                [[b["site"], b["position"], b["patched"], b["atp"], b["atp_star"], b["graddrop"]] for b in biggest])
    result = {
        "description": (f"Indirect-object pair on {lm.info.model_id} ({len(clean_ids)} tokens, first differing "
                        f"token at {first_changed}); metric logit({ANSWER!r}) - logit({FOIL!r}); every layer's "
                        f"attention, MLP and residual output at every position ({len(rows)} rows). The sweep: "
                        f"{ran} real patches through the interventions API"
                        + (" (positions before the first differing token counted as 0)" if changed_only else "")
                        + "."),
        "model": lm.info.model_id, "prompt_tokens": len(clean_ids), "first_changed": first_changed,
        "rows_total": len(rows), "sweep_patches": ran, "sweep_s": round(sweep_s, 2),
        "clean_metric": methods["atp"]["out"]["clean_metric"],
        "corrupted_metric": methods["atp"]["out"]["corrupted_metric"],
        "rows": result_rows, "largest_patches": biggest, "runs": runs, "machine": machine_info(),
    }
    write_result("attribution", result)
    if args.rows_out:  # every row's numbers, for a closer look (not part of the summary)
        per_row = {"site": [r["layer_name"] for r in rows], "position": [r["position"] for r in rows],
                   "patched": patched.tolist(), "atp": [r["estimate"] for r in rows],
                   "atp_star": [r["estimate"] for r in star], "graddrop": [r["graddrop"] for r in star]}
        with open(args.rows_out, "w") as f:
            json.dump(per_row, f)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
