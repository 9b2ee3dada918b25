"""The report's content as a list of blocks (headings, notes, tables, images, ...), which render.py turns into HTML
and Markdown through the templates. What the report says, and in which order, is decided here; how a block looks
in each format is the templates' business."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from pipelines.report.formatting import MISSING, ci, finite, fixed, jsonable, pct, plain, seconds, signed
from pipelines.report.spec import COMPARISONS, LIFT_METRICS, METRIC_LABELS, MODEL_LABELS, TARGETS, VARIANT_LABELS


@dataclass
class Cell:
    text: str
    sub: str = ""  # a second, smaller line: the 95% interval
    cls: str = ""  # num | gain | loss | none | met | missed | warn (space separated)
    mark: str = ""  # a word that must stand out in both formats (HTML: a badge; Markdown: bold), e.g. a flag

    @property
    def numeric(self) -> bool:
        return "num" in self.cls.split()


@dataclass
class Table:
    headers: list[str]
    rows: list[list[Cell]]
    groups: list[tuple[str, int]] | None = None  # an upper header row: (title, columns spanned)


@dataclass
class Block:
    kind: str  # h1 | h2 | h3 | p | note | bullets | table | image | pre
    text: str = ""
    items: list[tuple[str, str]] = field(default_factory=list)  # bullets: (text, css class)
    table: Table | None = None
    image: str = ""  # file name beside the report
    data: bytes = b""  # the PNG, embedded in the HTML


def _label(model: str) -> str:
    return MODEL_LABELS.get(model, model)


def _variant(variant: str) -> str:
    return VARIANT_LABELS.get(variant, variant)


def _num(value: Any, stats: dict[str, Any] | None = None, fmt=fixed) -> Cell:
    return Cell(fmt(value), ci(stats, fmt), "num")


def _lift_cell(lift: dict[str, Any] | None, fmt=signed, key: str = "delta") -> Cell:
    if not lift:
        return Cell(MISSING, "", "num")
    return Cell(fmt(lift[key]), ci(lift, fmt), f"num {lift.get('outcome', '')}".strip())


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys (source.config.position_decay), so every setting is a row of its own."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _kv_table(values: dict[str, Any], key: str = "key", value: str = "value") -> Table:
    return Table([key, value], [[Cell(str(k)), Cell(plain(v))] for k, v in values.items()])


def _protocol_title(p: dict[str, Any]) -> str:
    parts = [f"split {p['split']}" if p.get("split") else "", f"LUM features {p['feature_mode']}" if p.get("feature_mode") else ""]
    detail = ", ".join(x for x in parts if x)
    return f"{p['name']} ({detail})" if detail else str(p["name"])


def _with_outcome(d: dict[str, Any] | None, higher_is_better: bool) -> dict[str, Any] | None:
    """A delta with its outcome (for the cell's colour): gain when clearly better, loss when clearly worse."""
    if d is None:
        return None
    low, high = d.get("low"), d.get("high")
    outcome = ""
    if finite(low) and finite(high):
        better_low, better_high = (low, high) if higher_is_better else (-high, -low)
        outcome = "gain" if better_low > 0 else "loss" if better_high < 0 else "none"
    return d | {"outcome": outcome}


# ---------------------------------------------------------------------------------------------------- calibration


def _band(report: dict[str, Any]) -> tuple[float, float]:
    low, high = report["report_config"]["calibration_band"]
    return float(low), float(high)


def _calibration_cell(v: dict[str, Any]) -> Cell:
    cell = _num(v["calibration"]["value"], v["calibration"])
    if v["calibration"].get("flag"):
        cell.cls += " warn"
        cell.mark = "⚠ off"  # short: it sits in a numeric column; the sentence below the table explains it
    return cell


def calibration_warnings(p: dict[str, Any], band: tuple[float, float], prefix: str = "") -> list[tuple[str, str]]:
    """One sentence per variant whose predicted / observed clicks is outside the band."""
    out = []
    for v in p["variants"]:
        flag, value = v["calibration"].get("flag"), v["calibration"]["value"]
        if not flag:
            continue
        direction = "more" if flag == "over" else "fewer"
        out.append(
            (
                f"{prefix}Calibration flag: {_label(v['model'])} {_variant(v['variant'])} predicts {abs(value - 1) * 100:.1f}% {direction} clicks "
                f"than observed (predicted / observed {fixed(value)}, outside [{band[0]:g}, {band[1]:g}]): rank-based metrics are unaffected, "
                "but its probabilities need recalibrating before they are used as CTRs.",
                "warn",
            )
        )
    return out


# ---------------------------------------------------------------------------------------------------- sections


def glance_comparisons(lifts: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(model, comparison) pairs "at a glance" shows: per model, LUM over the strongest baseline the run trained (the
    first LUM comparison in spec.COMPARISONS' order), then that baseline against the mean-pooled history."""
    out = []
    for model in dict.fromkeys(x["model"] for x in lifts):
        present = {x["comparison"] for x in lifts if x["model"] == model}
        lum = next((c for c in COMPARISONS if c.kind == "lum" and c.title in present), None)
        if lum is None:
            continue
        out.append((model, lum.title))
        out += [(model, c.title) for c in COMPARISONS if c.kind == "baseline" and c.title in present
                and (c.variant, c.baseline) == (lum.baseline, "pooled-history")]
    return out


def _glance(report: dict[str, Any]) -> list[Block]:
    """Per protocol and model, LUM over the strongest baseline (and that baseline against the pooled history): the
    AUC, GAUC and simulated CTR lifts; then targets and flags. Every other comparison is in the sections below."""
    protocols = report["protocols"]
    multi = len(protocols) > 1
    ab_k = {p["name"]: max(p["ab"]["ks"]) for p in protocols if p["ab"]}
    ks = sorted(set(ab_k.values()))
    rows = []
    for p in protocols:
        keys = glance_comparisons(p["lifts"])
        for model, comparison in keys:
            row = [Cell(p["name"])] if multi else []
            row += [Cell(_label(model)), Cell(comparison)]
            for metric in LIFT_METRICS:
                row.append(_lift_cell(next((x for x in p["lifts"] if (x["model"], x["comparison"], x["metric"]) == (model, comparison, metric)), None)))
            for k in ks:
                found = [x for x in (p["ab"] or {}).get("lifts", []) if (x["model"], x["comparison"], x["k"]) == (model, comparison, k)]
                row.append(_lift_cell(found[0] if found else None, fmt=pct, key="lift"))
            rows.append(row)
    blocks: list[Block] = []
    if rows:
        headers = (["protocol"] if multi else []) + ["model", "comparison", "ΔAUC", "ΔGAUC", *[f"simulated CTR@{k} lift" for k in ks]]
        blocks += [
            Block(
                "note",
                "Lift of the variant with LUM features over the strongest baseline of each model the run trained (target "
                "attention, DIN, where present), with its 95% interval; and that baseline against the mean-pooled history. "
                "Green (gain): a clear gain, the interval is above 0; red (loss): a clear loss; otherwise no clear difference. "
                "Every other comparison is in the sections below.",
            ),
            Block("table", table=Table(headers, rows)),
        ]
    items = []
    for p in protocols:
        prefix = f"[{p['name']}] " if multi else ""
        for t in p["targets"]:
            status = {True: "met", False: "missed", None: "not evaluated"}[t["met"]]
            model = f"{_label(t['model'])}: " if t["model"] else ""
            items.append((f"{prefix}Target {model}{t['description']}: {status}.", {True: "met", False: "missed"}.get(t["met"], "")))
    for p in protocols:
        items += calibration_warnings(p, _band(report), f"[{p['name']}] " if multi else "")
    if items:
        blocks.append(Block("bullets", items=items))
    return blocks


def _data_blocks(report: dict[str, Any]) -> list[Block]:
    """The data step's facts and settings, and the position decay the simulated A/B used next to the simulator's."""
    meta = report["meta"]
    # settings as written in dataset.json (repr keeps 8.0 a float; plain's 6 digits are for measured values)
    rows = [[Cell(str(k)), Cell(repr(v) if isinstance(v, float) else plain(v))] for k, v in _flatten(meta.get("data") or {}).items()]
    notes: list[tuple[str, str]] = []
    for p in report["protocols"]:
        ab = p["ab"]
        if not ab:
            continue
        name = f" ({p['name']})" if len(report["protocols"]) > 1 else ""
        rows.append([Cell(f"simulated A/B position_decay{name}"), Cell(f"{ab['position_decay']:g} (from {ab['position_decay_from']})")])
        simulated = ab.get("simulator_position_decay")
        if finite(simulated) and abs(float(simulated) - float(ab["position_decay"])) > 1e-12:
            notes.append((f"The simulated A/B{name} uses position_decay {ab['position_decay']:g}, but the simulator generated the data with "
                          f"{float(simulated):g}: its CTRs are not those of the simulator's users.", "warn"))
    if not rows:
        return []
    blocks = [Block("h3", "Data"), Block("table", table=Table(["key", "value"], rows))]
    if notes:
        blocks.append(Block("bullets", items=notes))
    return blocks


def _environment_blocks(environment: dict[str, Any] | None) -> list[Block]:
    if not environment:
        return []
    git = environment.get("git") or {}
    commit = git.get("commit")
    if commit is None:
        code = "not a git checkout"
    else:
        dirty = git.get("dirty")
        state = "unknown changes" if dirty is None else f"uncommitted changes in {git.get('changed_files')} tracked files" if dirty else "clean"
        code = f"{commit} ({state})"
    rows = [[Cell("code (git commit)"), Cell(code)]]
    hw = environment.get("hardware") or {}
    cpus = f"{hw.get('cpu_count')}" + (f" ({hw['usable_cpus']} usable)" if hw.get("usable_cpus") not in (None, hw.get("cpu_count")) else "")
    rows += [
        [Cell("CPUs"), Cell(cpus)],
        [Cell("memory"), Cell(f"{hw['memory_gib']:g} GiB" if finite(hw.get("memory_gib")) else "unknown")],
        [Cell("GPUs"), Cell(", ".join(hw.get("gpus") or []) or "none found")],
        [Cell("platform"), Cell(f"{hw.get('platform')}, Python {hw.get('python')}")],
    ]
    rows += [[Cell(name), Cell(version or "not installed")] for name, version in (environment.get("libraries") or {}).items()]
    return [Block("h3", "Environment"),
            Block("note", "Where this report was made: the code's commit, the hardware, and the libraries that produce its numbers."),
            Block("table", table=Table(["component", "version / value"], rows))]


def _durations_blocks(durations: dict[str, Any] | None) -> list[Block]:
    if not durations:
        return []
    rows = [[Cell(str(k)), Cell(seconds(v), cls="num")] for k, v in durations.items()]
    total = sum(float(v) for v in durations.values() if finite(v))
    rows.append([Cell("total"), Cell(seconds(total), cls="num")])
    return [Block("h3", "Step durations"),
            Block("note", "The steps before this report; the report step's own duration is recorded in run_state.json once it has finished."),
            Block("table", table=Table(["step", "duration"], rows))]


def _protocol_blocks(p: dict[str, Any], band: tuple[float, float]) -> list[Block]:
    blocks = [Block("h2", f"Protocol {_protocol_title(p)}")]
    d = p["data"]
    cold = f"{100 * d['cold_share']:.1f}%" if finite(d.get("cold_share")) else "unknown"
    blocks.append(
        Block(
            "p",
            f"{d['rows']:,} test impressions from {d['users']:,} users"
            + (f" on {d['items']:,} items" if d.get("items") is not None else "")
            + (f" in {d['requests']:,} requests" if d.get("requests") is not None else "")
            + f"; CTR {fixed(d['ctr'])}; rows whose user has no earlier history: {cold}.",
        )
    )
    # variants side by side
    headers = ["model", "variant", "AUC", "GAUC", "GAUC skipped users", "logloss", "NE", "calibration"]
    rows = []
    for v in p["variants"]:
        rows.append(
            [
                Cell(_label(v["model"])),
                Cell(_variant(v["variant"])),
                _num(v["auc"]["value"], v["auc"]),
                _num(v["gauc"]["value"], v["gauc"]),
                Cell(f"{v['gauc']['skipped_users']:,}", f"of {v['gauc']['users'] + v['gauc']['skipped_users']:,}", "num"),
                _num(v["logloss"]["value"], v["logloss"]),
                _num(v["ne"]["value"], v["ne"]),
                _calibration_cell(v),
            ]
        )
    blocks += [
        Block("h3", "Ranker variants"),
        Block("note", f"Value, and below it the 95% interval from a bootstrap over users. GAUC skips users whose test impressions are all of one class. "
                      f"Calibration (predicted / observed clicks) outside [{band[0]:g}, {band[1]:g}] is flagged."),
        Block("table", table=Table(headers, rows)),
    ]
    warnings = calibration_warnings(p, band)
    if warnings:
        blocks.append(Block("bullets", items=warnings))
    # deltas vs base
    rows = []
    for v in p["variants"]:
        if v["vs_base"] is None:
            continue
        vs = v["vs_base"]
        rows.append(
            [
                Cell(_label(v["model"])),
                Cell(_variant(v["variant"])),
                _lift_cell(_with_outcome(vs["auc"], higher_is_better=True)),
                _lift_cell(_with_outcome(vs["gauc"], higher_is_better=True)),
                _lift_cell(_with_outcome(v["rela_impr"] | {"delta": v["rela_impr"]["value"]}, higher_is_better=True), fmt=pct),
                _lift_cell(_with_outcome(vs["logloss"], higher_is_better=False)),
                _lift_cell(_with_outcome(vs["ne"], higher_is_better=False)),
                _lift_cell(vs["calibration"]),
            ]
        )
    if rows:
        blocks += [
            Block("h3", "Change vs the same model's base"),
            Block(
                "note",
                "Paired bootstrap over users: both variants scored on the same resamples. "
                "Green: a clear improvement; red: a clear loss (lower logloss and NE are better).",
            ),
            Block("table", table=Table(["model", "variant", "ΔAUC", "ΔGAUC", "RelaImpr", "Δlogloss", "ΔNE", "Δcalibration"], rows)),
        ]
    if p["lifts"]:
        rows = [
            [Cell(_label(x["model"])), Cell(x["comparison"]), Cell(METRIC_LABELS[x["metric"]]), _lift_cell(x), Cell(x["verdict"], cls=x["outcome"])]
            for x in p["lifts"]
        ]
        blocks += [Block("h3", "Lifts: LUM features over each baseline, and the baselines against each other"),
                   Block("table", table=Table(["model", "comparison", "metric", "lift", "verdict"], rows))]
    if p["targets"]:
        rows = []
        for t in p["targets"]:
            status = {True: "met", False: "missed", None: "not evaluated"}[t["met"]]
            relative = TARGETS.get(t["target"]) is not None and TARGETS[t["target"]].kind == "ab"
            fmt = pct if relative else signed
            rows.append(
                [
                    Cell(t["target"]),
                    Cell(_label(t["model"]) if t["model"] else MISSING),
                    Cell(t["description"]),
                    Cell(fmt(t.get("value")), ci(t, fmt), "num"),
                    Cell(status, cls={True: "met", False: "missed"}.get(t["met"], "")),
                ]
            )
        blocks += [Block("h3", "Targets"), Block("table", table=Table(["target", "model", "goal", "estimate", "status"], rows))]
    if p.get("freshness"):
        blocks += _freshness_blocks(p["freshness"], p.get("feature_mode"))
    if p["ab"]:
        blocks += _ab_blocks(p)
    if p["slices"]:
        blocks += _slice_blocks(p)
    blocks.append(Block("h3", "Plots"))
    for key, alt in (("roc", "ROC curves per variant"), ("calibration", "Calibration (reliability diagram)")):
        if p["plots"].get(key):
            blocks.append(Block("image", text=alt, image=p["plots"][key]))
    return blocks


def _hours(value: float) -> str:
    return f"{value:.1f} h" if value < 48 else f"{value / 24:.1f} d"


def _freshness_blocks(f: dict[str, Any], mode: str | None) -> list[Block]:
    """The freshness lag of the LUM user vectors the test rows joined (compute.freshness)."""
    what = {"snapshot": "the newest batch snapshot at or before the request, as a deployed service would have it",
            "rolling": "one vector per request, computed from the history just before it (no batch job can serve this)"}.get(mode or "", "")
    blocks = [Block("h3", "Freshness of the LUM features"),
              Block("note", "Hours between a test request and the as-of time of the user vector it was scored with"
                            + (f": {what}." if what else ".") + f" Rows without a vector: {pct_plain(f['without_vector_share'])}.")]
    if f.get("hours"):
        h = f["hours"]
        blocks.append(Block("table", table=Table(["mean", "p10", "median", "p90", "p99", "max"],
                                                 [[Cell(_hours(h[k]), cls="num") for k in ("mean", "p10", "p50", "p90", "p99", "max")]])))
        rows = [[Cell(f"{_hours(b['from_h'])} to {_hours(b['to_h'])}" if b["to_h"] is not None else f"{_hours(b['from_h'])} or more"),
                 Cell(pct_plain(b["share"]), cls="num")] for b in f["buckets"]]
        blocks.append(Block("table", table=Table(["lag", "share of rows with a vector"], rows)))
    return blocks


PER_USER_CAVEAT = (
    "per-user split: the LUM and HSTU papers' public-data protocol, not a deployment's. Each user's last events are held "
    "out, so the LM pretrains on other users' events made after some test rows: the vectors are leak-free (each from "
    "the user's events strictly before the row), but the future reaches them through the LM's weights. A deployment "
    "sees the global split's (time-consistent) figures.")


def pct_plain(share: float) -> str:
    return f"{100 * share:.1f}%" if finite(share) else MISSING


def _ab_blocks(p: dict[str, Any]) -> list[Block]:
    ab = p["ab"]
    blocks = [
        Block("h3", "Simulated online A/B"),
        Block(
            "note",
            f"Each ranker re-orders the candidates of {ab['requests']:,} held-out requests ({ab['users']:,} users); expected clicks "
            f"= true relevance x examination(position), examination = (1 + position)^-{ab['position_decay']:g} (position_decay from "
            f"{ab.get('position_decay_from', 'the report config')}). CTR@k = expected clicks in the top k / k. Lifts are relative, with a "
            "95% interval from a paired bootstrap over users.",
        ),
        Block("table", table=Table(["ranker", *[f"CTR@{k}" for k in ab["ks"]]],
                                   [[Cell(r["label"]), *[_num(r[f"ctr@{k}"]) for k in ab["ks"]]] for r in ab["ctr"]])),
    ]
    if ab["lifts"]:
        top_k = max(ab["ks"])
        rows = []
        for model, comparison in dict.fromkeys((x["model"], x["comparison"]) for x in ab["lifts"]):
            mine = {x["k"]: x for x in ab["lifts"] if (x["model"], x["comparison"]) == (model, comparison)}
            row = [Cell(_label(model)), Cell(comparison)]
            row += [_lift_cell(mine.get(k), fmt=pct, key="lift") for k in ab["ks"]]
            row.append(Cell(mine[top_k]["verdict"], cls=mine[top_k]["outcome"]) if top_k in mine else Cell(MISSING))
            rows.append(row)
        headers = ["model", "comparison", *[f"CTR@{k} lift" for k in ab["ks"]], f"verdict (CTR@{top_k})"]
        blocks.append(Block("table", table=Table(headers, rows)))
    if p["plots"].get("ab"):
        blocks.append(Block("image", text="Simulated CTR@k per ranker", image=p["plots"]["ab"]))
    return blocks


def _retrieval_blocks(split: str, retrieval: dict[str, Any]) -> list[Block]:
    """The retrieval A/B of one split (pipelines/steps/retrieval_ab.py)."""
    settings = retrieval["settings"]
    blocks = [
        Block("h2", f"Retrieval (simulated): {split} split"),
        Block("note", f"{settings['added']} candidates per retriever merged into the logged slates of {retrieval['rows'][0]['requests']:,} "
                      f"sampled test requests: the LM's (beam search, beam {settings['beam']}, {settings['engine']} engine, under each "
                      f"request's own context, from the behaviours before it) and popularity's. Recall: the share of the request's "
                      f"{settings['would_click']} most relevant released items (the simulator's true relevance of every item) in the set. "
                      f"Oracle CTR@{settings['ctr_k']}: what the best possible ranker makes of the set. Intervals: 95%, paired bootstrap over users."),
    ]
    k = settings["ctr_k"]
    rows = []
    for r in retrieval["rows"]:
        def interval(metric: str) -> str:
            return f"{fixed(r[metric])} ({fixed(r[metric + '_low'])} to {fixed(r[metric + '_high'])})"

        def lift(metric: str) -> str:
            if f"{metric}_lift" not in r:
                return MISSING
            return f"{pct(r[metric + '_lift'])} ({pct(r[metric + '_lift_low'])} to {pct(r[metric + '_lift_high'])})"

        rows.append([Cell(r["candidates"]), Cell(f"{r['mean_size']:.1f}", cls="num"), Cell(interval("recall"), cls="num"),
                     Cell(lift("recall"), cls="num"), Cell(interval(f"oracle_ctr@{k}"), cls="num"), Cell(lift(f"oracle_ctr@{k}"), cls="num")])
    blocks.append(Block("table", table=Table(["candidates", "mean size", "recall", "recall lift", f"oracle CTR@{k}", f"oracle CTR@{k} lift"], rows)))
    if retrieval.get("ranked"):
        blocks.append(Block("note", f"After the ranker: each trained ranker orders every candidate set (its rows get their point-in-time "
                                    f"features from the feature store, as the test rows do); CTR@{k} of its top {k}, and the lift over "
                                    "the logged slates under the same ranker."))
        ranked_rows = []
        for r in retrieval["ranked"]:
            metric = f"ctr@{k}"
            lift = (f"{pct(r[metric + '_lift'])} ({pct(r[metric + '_lift_low'])} to {pct(r[metric + '_lift_high'])})"
                    if f"{metric}_lift" in r else MISSING)
            ranked_rows.append([Cell(r["ranker"]), Cell(r["candidates"]),
                                Cell(f"{fixed(r[metric])} ({fixed(r[metric + '_low'])} to {fixed(r[metric + '_high'])})", cls="num"),
                                Cell(lift, cls="num")])
        blocks.append(Block("table", table=Table(["ranker", "candidates", f"CTR@{k}", f"CTR@{k} lift"], ranked_rows)))
    return blocks


def _slice_blocks(p: dict[str, Any]) -> list[Block]:
    blocks = [
        Block("h3", "Slices"),
        Block(
            "note",
            "Per slice: each variant's AUC / GAUC, and the GAUC lift of LUM features with its 95% interval (green: a clear gain, red: a clear loss). "
            "User history: the user's events before the row. Item interactions: the item's impressions before the row's day (0: a cold item). "
            "For these cold-start slices and new items the AUC lift is shown too (GAUC skips users with one class, which is most of a rare item's users). "
            "Item popularity: the same counts ranked; head = the most popular items "
            "making up the first share of test impressions, tail = the least popular making up the last share (see the report config). "
            "A slice with the same rows as another is shown once, with the other's name in brackets.",
        ),
    ]
    for model in dict.fromkeys(c["model"] for c in p["columns"]):
        columns = [c for c in p["columns"] if c["model"] == model]
        lifts = list(dict.fromkeys((x["comparison"], x.get("metric", "gauc")) for s in p["slices"] for x in s["lifts"] if x["model"] == model))
        lifts.sort(key=lambda key: key[1] != "gauc")  # the GAUC lifts first, then the cold slices' AUC lifts
        headers = ["slice", "value", "rows", "users", "CTR", *[f"{_variant(c['variant'])} AUC / GAUC" for c in columns],
                   *[f"Δ{METRIC_LABELS[m]} {t}" for t, m in lifts]]
        rows = []
        for s in p["slices"]:
            value = str(s["value"]) + (f" (= {', '.join(s['same_as'])})" if s.get("same_as") else "")
            row = [Cell(s["family"]), Cell(value), Cell(f"{s['rows']:,}", cls="num"), Cell(f"{s['users']:,}", cls="num"), Cell(fixed(s["ctr"]), cls="num")]
            row += [Cell(f"{fixed(s['variants'][c['column']]['auc'])} / {fixed(s['variants'][c['column']]['gauc'])}", cls="num") for c in columns]
            row += [_lift_cell(next((x for x in s["lifts"] if x["model"] == model and (x["comparison"], x.get("metric", "gauc")) == key), None))
                    for key in lifts]
            rows.append(row)
        blocks += [Block("p", f"{_label(model)}:"), Block("table", table=Table(headers, rows))]
    if p["empty_slices"]:
        blocks.append(Block("note", f"No test rows in: {', '.join(p['empty_slices'])}."))
    if p["plots"].get("slice_lift"):
        blocks.append(Block("image", text="GAUC lift by slice", image=p["plots"]["slice_lift"]))
    return blocks


def _side_by_side_blocks(protocols: list[dict[str, Any]]) -> list[Block]:
    blocks = [Block("h2", "Protocols side by side")]
    names = [p["name"] for p in protocols]
    modes = {p.get("feature_mode") for p in protocols}
    if {"snapshot", "rolling"} <= modes:
        blocks.append(Block("note", "Snapshot LUM features are what a deployment serves: a batch job refreshes each user's vectors every period and "
                                    "a request reads the newest one from before it (the deployable number). Rolling features are computed "
                                    "for each request from the history just before it: an upper bound no batch job can serve. "
                                    "The freshness tables in each protocol's section give the lag."))
    keys = list(dict.fromkeys((v["model"], v["variant"]) for p in protocols for v in p["variants"]))
    rows = []
    for model, variant in keys:
        row = [Cell(_label(model)), Cell(_variant(variant))]
        for p in protocols:
            v = next((v for v in p["variants"] if (v["model"], v["variant"]) == (model, variant)), None)
            row += [_num(v["auc"]["value"], v["auc"]), _num(v["gauc"]["value"], v["gauc"])] if v else [Cell(MISSING, cls="num"), Cell(MISSING, cls="num")]
        rows.append(row)
    headers = ["model", "variant", *[h for _ in names for h in ("AUC", "GAUC")]]
    blocks.append(Block("table", table=Table(headers, rows, groups=[("", 2), *[(n, 2) for n in names]])))
    keys = list(dict.fromkeys((x["model"], x["comparison"], x["metric"]) for p in protocols for x in p["lifts"]))
    if keys:
        rows = []
        for model, comparison, metric in keys:
            row = [Cell(_label(model)), Cell(comparison), Cell(METRIC_LABELS[metric])]
            for p in protocols:
                row.append(_lift_cell(next((x for x in p["lifts"] if (x["model"], x["comparison"], x["metric"]) == (model, comparison, metric)), None)))
            rows.append(row)
        blocks.append(Block("table", table=Table(["model", "comparison", "metric", *[f"lift: {n}" for n in names]], rows)))
    return blocks


def _seed_blocks(sections: list[dict[str, Any]]) -> list[Block]:
    """The lifts and targets across seeds (pipelines.report.seeds)."""
    blocks = [
        Block("h2", "Across seeds"),
        Block("note", "The run repeated with every training seed moved (LM pretraining, semantic codebooks, DLRM, LightGBM) on the same data and split. "
                      "Per seed: the lift and its bootstrap interval over users; then the mean with a 95% t-interval across seeds, which covers the "
                      "variance of training the bootstrap leaves out (with few seeds it is wide: t = 4.30 for 3)."),
    ]
    for section in sections:
        seeds = section["seeds"]
        if len(sections) > 1:
            blocks.append(Block("h3", section["protocol"]))
        rows = []
        for x in section["lifts"]:
            row = [Cell(_label(x["model"])), Cell(x["comparison"]), Cell(METRIC_LABELS[x["metric"]])]
            for value, boot in zip(x["values"], x["bootstrap"]):
                row.append(Cell(MISSING, cls="num") if value is None else Cell(signed(value), ci(boot, signed) if boot else "", "num"))
            row.append(_lift_cell({"delta": x["mean"], "low": x["low"], "high": x["high"], "outcome": x["outcome"]}))
            row.append(Cell("yes" if x["positive_on_every_seed"] else "no", cls="met" if x["positive_on_every_seed"] else "missed"))
            rows.append(row)
        headers = ["model", "comparison", "metric", *[f"seed +{k}" for k in seeds], "mean over seeds", "above 0 on every seed"]
        blocks.append(Block("table", table=Table(headers, rows)))
        if section["targets"]:
            rows = []
            for t in section["targets"]:
                marks = [MISSING if m is None else ("met" if m else "missed") for m in t["met"]]
                rows.append([Cell(t["target"]), Cell(_label(t["model"])), Cell(t["description"]), *[Cell(m) for m in marks],
                             Cell("yes" if t["held_on_every_seed"] else "no", cls="met" if t["held_on_every_seed"] else "missed")])
            blocks.append(Block("table", table=Table(["target", "model", "what", *[f"seed +{k}" for k in seeds], "held on every seed"], rows)))
    return blocks


HOW_TO_READ = [
    (
        "AUC: probability that a random click is scored above a random non-click. "
        "GAUC: AUC within each user, averaged with the user's impressions as weights (users with a single class are skipped): "
        "it measures ranking for the same user, which is what a feed does."
    ),
    (
        "logloss and NE (logloss / entropy of the base CTR; below 1 beats predicting the average) measure the probabilities; "
        "calibration = mean predicted / observed CTR (1 is calibrated; outside the report config's calibration_band it is flagged). "
        "RelaImpr = (AUC - 0.5) / (AUC_base - 0.5) - 1."
    ),
    (
        "Intervals: 95%, from resampling users with replacement; deltas are paired (both variants on the same resamples). "
        "A lift is a clear gain when its whole interval is above 0."
    ),
]


def report_blocks(report: dict[str, Any], plots: dict[str, bytes]) -> list[Block]:
    """The report as a list of blocks, rendered to both HTML and Markdown."""
    meta = report["meta"]
    blocks = [Block("h1", f"{report['title']}: {report['run']}"), Block("note", f"Generated {report['generated_at']}.")]
    glance = _glance(report)
    if glance:
        blocks += [Block("h2", "At a glance"), *glance]
    rows = []
    for p in report["protocols"]:
        d = p["data"]
        rows.append(
            [
                Cell(p["name"]),
                Cell(str(p.get("split") or MISSING)),
                Cell(str(p.get("feature_mode") or MISSING)),
                Cell(f"{d['rows']:,}", cls="num"),
                Cell(f"{d['users']:,}", cls="num"),
                Cell(f"{100 * d['cold_share']:.1f}%" if finite(d.get("cold_share")) else MISSING, cls="num"),
                Cell(f"{d.get('start', MISSING)} to {d.get('end', MISSING)}"),
            ]
        )
    blocks += [
        Block("h2", "Run"),
        Block("table", table=Table(["protocol", "split", "LUM features", "test rows", "users", "rows without earlier user history", "test window"], rows)),
    ]
    if any(p.get("split") == "per-user" for p in report["protocols"]):
        blocks.append(Block("bullets", items=[(PER_USER_CAVEAT, "warn")]))
    blocks += _data_blocks(report)
    if meta.get("model_versions"):
        blocks += [Block("h3", "Model versions"), Block("table", table=_kv_table(meta["model_versions"], "component", "version"))]
    blocks += _durations_blocks(meta.get("durations"))
    blocks += _environment_blocks(report.get("environment"))
    if len(report["protocols"]) > 1:
        blocks += _side_by_side_blocks(report["protocols"])
    if report.get("seeds"):
        blocks += _seed_blocks(report["seeds"])
    band = _band(report)
    for p in report["protocols"]:
        blocks += _protocol_blocks(p, band)
    for split, retrieval in (meta.get("retrieval") or {}).items():
        blocks += _retrieval_blocks(split, retrieval)
    scaling = report.get("lm_scaling") or []
    if scaling:
        rows = [[Cell(str(s.get("preset"))), Cell(f"{float(s['params']):,.0f}" if finite(s.get("params")) else MISSING, cls="num"),
                 _lift_cell(_with_outcome({"delta": s.get("gauc_lift"), "low": s.get("low"), "high": s.get("high")}, True))] for s in scaling]
        blocks += [Block("h2", "LM size vs lift"), Block("table", table=Table(["preset", "LM parameters", "GAUC lift (+LUM vs base)"], rows))]
        if report.get("plots", {}).get("lm_scaling"):
            blocks.append(Block("image", text="LM size vs GAUC lift", image=report["plots"]["lm_scaling"]))
    config_text = yaml.safe_dump(
        jsonable({"run config": meta.get("config") or {}, "report config": report["report_config"]}), sort_keys=False, default_flow_style=None, width=110
    )
    blocks += [Block("h2", "Configuration"), Block("pre", text=config_text)]
    blocks += [Block("h2", "How to read this report"), Block("bullets", items=[(text, "") for text in HOW_TO_READ])]
    for block in blocks:
        if block.kind == "image":
            block.data = plots[block.image]
    return blocks
