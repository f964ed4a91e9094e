"""`medda audit` and `medda compare`: reconstruct a result's lineage from the tracking store alone.

An audit starts from a run id or a registered model (`models:/<name>/<version>`, `models:/<name>@<alias>`) and
follows the `parent.run_id` tags: evaluation -> adapted model (adapt run) -> source model (train run) -> its
supervised twin (SSL). For every run it reads the data card and datalist digests (dataset inputs and their
contexts), the case lists (`datasets/<context>.json`), the resolved config, the code state (git commit, dirty
tree, medda version, host), the registered versions, and the evidence (per-case tables, overlays, before/after
plots, label-free monitoring curves). It then writes one self-contained HTML file (images embedded as base64)
and a Markdown file (images beside it), with the warnings a reviewer needs first.

No MLflow here: everything is read through `medda.tracking.TrackingStore`.
"""

from __future__ import annotations

import base64
import contextlib
import html
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from medda import evidence
from medda.errors import MeddaError
from medda.lineage import (
    EVALUATION,
    SOURCE_TRAIN,
    TARGET_ADAPT,
    TARGET_LABELED,
    TRAIN_LABELED,
    TRAIN_UNLABELED,
    VALIDATION,
)
from medda.tracking import RunRecord, TrackingStore

SECTIONS = ("Summary", "Warnings", "Lineage", "Data", "Configuration", "Code", "Model registry", "Evidence")
METRICS = ("dice", "hd95", "assd", "nsd")
_MAX_CHAIN = 20


# --------------------------------------------------------------------------------------------- model
@dataclass
class Finding:
    level: str  # "warning" | "note"
    code: str
    message: str
    runs: list[str] = field(default_factory=list)


@dataclass
class Image:
    title: str
    png: bytes
    file: str  # file name for the Markdown report


@dataclass
class Step:
    """One run of the chain (or a run referenced by it that could not be found)."""

    role: str
    run_id: str
    run: RunRecord | None
    manifests: dict[str, dict] = field(default_factory=dict)  # context -> case manifest
    config: str | None = None
    versions: list[dict] = field(default_factory=list)
    artifacts: list[str] = field(default_factory=list)
    sweep: RunRecord | None = None

    @property
    def tags(self) -> dict[str, str]:
        return self.run.tags if self.run else {}

    @property
    def label(self) -> str:
        if not self.run:
            return f"{self.role} {self.run_id[:8]} (not found)"
        return f"{self.role}: {self.run.name or self.run_id[:8]} ({self.run_id[:8]})"


@dataclass
class EvaluationEvidence:
    step: Step
    rows: list[dict]
    images: list[Image]
    cases: list[dict]
    before_after: list[dict]
    before_after_source: str  # "logged" | "computed by the audit" | ""


@dataclass
class Audit:
    subject: str
    uri: str
    model_version: dict | None
    chain: list[Step]  # the subject's run first, then its ancestors
    evaluations: list[EvaluationEvidence]
    adaptations: dict[str, list[Image]]  # adapt run id -> monitoring curves
    findings: list[Finding]
    generated: str

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "warning"]


# --------------------------------------------------------------------------------------------- building
def _role(run: RunRecord) -> str:
    command = run.command
    if command == "evaluate":
        return "evaluation"
    if command == "adapt":
        return "adaptation"
    if command == "adapt-sweep":
        return "adaptation sweep"
    if command == "train":
        role = run.tags.get("ssl.role", "")
        if role == "supervised_twin":
            return "supervised twin"
        if role == "ssl" or run.tags.get("method") in ("bcp", "mean_teacher"):
            return "semi-supervised training"
        return "source training"
    return command or "run"


def _load_step(store: TrackingStore, run_id: str, role: str | None = None, runs: dict | None = None) -> Step:
    run = runs.get(run_id) if runs is not None and run_id in runs else store.get_run(run_id)
    if runs is not None:
        runs[run_id] = run
    if run is None:
        return Step(role or "run", run_id, None)
    step = Step(role or _role(run), run_id, run)
    step.artifacts = store.list_artifacts(run_id)
    for path in step.artifacts:
        if path.startswith("datasets/") and path.endswith(".json"):
            manifest = store.read_json(run_id, path)
            if isinstance(manifest, dict):
                step.manifests[manifest.get("context") or Path(path).stem] = manifest
    if "config/resolved.yaml" in step.artifacts:
        step.config = store.read_text(run_id, "config/resolved.yaml")
    step.versions = store.versions_for_run(run_id)
    if run.sweep_parent_id:
        step.sweep = store.get_run(run.sweep_parent_id)
    return step


def _chain(store: TrackingStore, start: Step, runs: dict) -> list[Step]:
    chain = [start]
    seen = {start.run_id}
    while chain[-1].run and chain[-1].run.parent_run_id and len(chain) < _MAX_CHAIN:
        parent = chain[-1].run.parent_run_id
        if parent in seen:
            break
        seen.add(parent)
        chain.append(_load_step(store, parent, runs=runs))
    return chain


def _png(store: TrackingStore, run_id: str, path: str, work: Path) -> bytes | None:
    local = store.download(run_id, path, work / run_id)
    return local.read_bytes() if local and local.is_file() else None


def _evaluation_evidence(store: TrackingStore, step: Step, chain: list[Step], work: Path) -> EvaluationEvidence:
    run_id = step.run_id
    rows = store.read_csv(run_id, "evaluation/per_case.csv") if "evaluation/per_case.csv" in step.artifacts else []
    cases = store.read_json(run_id, "evidence/cases.json") or []
    images = []
    order = {r: i for i, r in enumerate(evidence.ROLES)}
    overlays = sorted((p for p in step.artifacts if Path(p).name.startswith("overlay_") and p.endswith(".png")),
                      key=lambda p: order.get(Path(p).name.split("_")[1], 9))
    for path in overlays:
        data = _png(store, run_id, path, work)
        if data:
            role = Path(path).name.split("_")[1]
            roles = [c["role"] for c in cases if c.get("file") == Path(path).name] or [role]
            images.append(Image(f"{' / '.join(roles)} case", data, f"{run_id[:8]}_{Path(path).name}"))
    before_after, source = [], ""
    if "evaluation/before_after.csv" in step.artifacts:
        before_after, source = store.read_csv(run_id, "evaluation/before_after.csv"), "logged"
        data = _png(store, run_id, "evidence/before_after.png", work)
        if data:
            images.append(Image("before / after adaptation", data, f"{run_id[:8]}_before_after.png"))
    else:
        model = chain[0] if chain else None
        if model and model.run and model.run.command == "adapt" and rows:
            source_run = model.run.parent_run_id
            digest = step.run.dataset_digest(EVALUATION) if step.run else None
            for other in store.search_runs({"medda.command": "evaluate", "parent.run_id": source_run}) if source_run else []:
                if other.dataset_digest(EVALUATION) == digest:
                    before = store.read_csv(other.run_id, "evaluation/per_case.csv")
                    before_after = evidence.before_after_rows(before, rows)
                    if before_after:
                        png = evidence.before_after_figure(before_after, work / f"{run_id}_before_after.png")
                        images.append(Image("before / after adaptation (computed by the audit)", png.read_bytes(),
                                            f"{run_id[:8]}_before_after.png"))
                        source = f"computed by the audit from evaluation {other.run_id[:8]}"
                    break
    return EvaluationEvidence(step, rows, images, cases, before_after, source)


def build_audit(store: TrackingStore, ref: str, work: Path | None = None) -> Audit:
    """Everything the report shows, for a run id or a models:/ URI."""
    work = Path(work or tempfile.mkdtemp(prefix="medda-audit-"))
    model_version = None
    if ref.startswith("models:/"):
        model_version = store.resolve_model_uri(ref)
        run_id = model_version["run_id"]
        if not run_id:
            raise MeddaError(f"{ref}: this model version records no run, so there is no lineage to audit")
    else:
        run_id = ref.strip()
    runs: dict[str, RunRecord | None] = {}
    start = _load_step(store, run_id, runs=runs)
    if start.run is None:
        raise MeddaError(f"run '{run_id}' not found on {store.uri} (give a run id or models:/<name>/<version>)")
    if start.run.command == "evaluate":
        chain = _chain(store, start, runs)
        eval_steps = [(start, chain[1:])]
    else:
        chain = _chain(store, start, runs)
        found = store.search_runs({"medda.command": "evaluate", "parent.run_id": run_id})
        eval_steps = [(_load_step(store, r.run_id, runs=runs), chain) for r in found]
    evaluations = [_evaluation_evidence(store, s, model_chain, work) for s, model_chain in eval_steps]
    adaptations = {}
    for step in chain:
        if step.run and step.run.command == "adapt" and "evidence/monitoring.png" in step.artifacts:
            data = _png(store, step.run_id, "evidence/monitoring.png", work)
            if data:
                adaptations[step.run_id] = [Image("label-free monitoring", data, f"{step.run_id[:8]}_monitoring.png")]
    audit = Audit(ref, store.uri, model_version, chain, evaluations, adaptations, [],
                  datetime.now(timezone.utc).isoformat(timespec="seconds"))
    audit.findings = find_issues(chain, [(e.step, mc) for e, (_, mc) in zip(evaluations, eval_steps, strict=True)],
                                 model_version)
    return audit


# --------------------------------------------------------------------------------------------- checks
def _case_keys(step: Step, context: str) -> set[tuple[str, str]] | None:
    """Keys identifying the cases a run saw in `context`: ('path', image) and ('id', card name + id)."""
    manifest = step.manifests.get(context)
    if manifest is None:
        return None
    card = step.tags.get("card.name", "")
    keys = set()
    for case in manifest.get("cases", []):
        keys.add(("path", case.get("image", "")))
        keys.add(("id", f"{card}:{case.get('id', '')}"))
    return keys


def _overlap(eval_step: Step, step: Step, context: str) -> list[str] | None:
    """Case ids of the evaluation that `step` also used in `context` (None when it cannot be known)."""
    if not step.run or (not any(i["context"] == context for i in step.run.inputs) and context not in step.manifests):
        return []
    mine, theirs = _case_keys(eval_step, EVALUATION), _case_keys(step, context)
    if mine is None or theirs is None:  # runs from before case lists were logged: compare digests
        a, b = eval_step.run.dataset_digest(EVALUATION), step.run.dataset_digest(context)
        return None if a is None or b is None else (["<whole datalist>"] if a == b else [])
    shared = mine & theirs
    ids = sorted({c["id"] for c in eval_step.manifests[EVALUATION]["cases"]
                  if ("path", c.get("image", "")) in shared
                  or ("id", f"{eval_step.tags.get('card.name', '')}:{c['id']}") in shared})
    return ids


def _ids(ids: list[str], n: int = 6) -> str:
    return ", ".join(ids[:n]) + (f" (+{len(ids) - n} more)" if len(ids) > n else "")


def find_issues(
    chain: list[Step], evaluations: Sequence[tuple[Step, list[Step]]], model_version: dict | None = None,
) -> list[Finding]:
    """Warnings (what can invalidate a number) and notes (what a reviewer should know) for a chain."""
    out: list[Finding] = []
    steps = list(chain) + [e for e, _ in evaluations if all(e.run_id != s.run_id for s in chain)]
    for step in steps:
        if step.run is None:
            out.append(Finding("warning", "lineage-broken",
                               f"run {step.run_id} is referenced as a parent but is not on this tracking server: "
                               "the chain stops here", [step.run_id]))
            continue
        if step.run.status != "FINISHED":
            out.append(Finding("warning", "run-unfinished", f"{step.label} has status {step.run.status}",
                               [step.run_id]))
    dirty = [s for s in steps if s.tags.get("git.dirty") == "true"]
    if dirty:
        out.append(Finding("warning", "dirty-git",
                           "code had uncommitted changes (git tree dirty) in: " + "; ".join(s.label for s in dirty)
                           + ". The commit alone does not reproduce these runs.", [s.run_id for s in dirty]))
    unknown = [s for s in steps if s.tags.get("git.commit") in ("unknown",)]
    if unknown:
        out.append(Finding("note", "git-unknown", "code version unknown (not run from a git checkout) in: "
                           + "; ".join(s.label for s in unknown), [s.run_id for s in unknown]))
    commits = {s.tags.get("git.commit") for s in steps if s.tags.get("git.commit") not in (None, "", "unknown")}
    if len(commits) > 1:
        out.append(Finding("note", "mixed-code", f"the chain ran on {len(commits)} different commits: "
                           + ", ".join(sorted(c[:10] for c in commits))))
    for step in steps:
        t = step.tags
        if t.get("medda.command") == "adapt":
            if t.get("prior.source") == "oracle":
                out.append(Finding("warning", "oracle-prior",
                                   f"{step.label}: the class-ratio prior was measured from target labels "
                                   "(prior.source=oracle): an upper-bound experiment, not source-free adaptation",
                                   [step.run_id]))
            if t.get("collapse") not in (None, "", "none"):
                out.append(Finding("warning", "collapse", f"{step.label}: adaptation collapsed ({t['collapse']}); "
                                   "medda kept the last safe checkpoint", [step.run_id]))
            if t.get("source_free") == "false":
                out.append(Finding("note", "not-source-free", f"{step.label}: the method read target labels "
                                   f"({t.get('method')}), so this is not source-free adaptation", [step.run_id]))
    for ev, model_chain in evaluations:
        t = ev.tags
        if "voxels" in t.get("metrics.units", ""):
            out.append(Finding("warning", "units-voxels",
                               f"{ev.label}: HD95/ASSD/NSD are in voxels (the data card does not know the spacing): "
                               "not comparable with millimetre results or across sites", [ev.run_id]))
        if t.get("evidence.error"):
            out.append(Finding("note", "evidence-missing", f"{ev.label}: evidence not drawn ({t['evidence.error']})",
                               [ev.run_id]))
        if model_chain and model_chain[0].run and model_chain[0].tags.get("recommended") == "false":
            out.append(Finding("note", "not-recommended",
                               f"{ev.label} evaluates an adapted model that the label-free rule did NOT recommend "
                               f"({model_chain[0].tags.get('recommendation.reason', '')})", [model_chain[0].run_id]))
        for step in model_chain:
            if not step.run:
                continue
            for context in (SOURCE_TRAIN, TRAIN_LABELED, TRAIN_UNLABELED, TARGET_LABELED):
                ids = _overlap(ev, step, context)
                if ids:
                    out.append(Finding("warning", "eval-overlaps-training",
                                       f"{ev.label}: {len(ids)} evaluated case(s) were {context} data of "
                                       f"{step.label}: {_ids(ids)}", [ev.run_id, step.run_id]))
            ids = _overlap(ev, step, VALIDATION) if step.tags.get("checkpoint.policy") == "val_dice" else []
            if ids:
                out.append(Finding("warning", "selection-on-test",
                                   f"{ev.label}: {len(ids)} evaluated case(s) were validation cases used to select "
                                   f"the checkpoint of {step.label} (policy {step.tags.get('checkpoint.policy', '?')}): "
                                   f"{_ids(ids)}", [ev.run_id, step.run_id]))
            ids = _overlap(ev, step, TARGET_ADAPT)
            if ids:
                out.append(Finding("note", "transductive",
                                   f"{ev.label}: {len(ids)} evaluated case(s) were seen unlabelled during "
                                   f"{step.label} (transductive adaptation; their labels were not read): {_ids(ids)}",
                                   [ev.run_id, step.run_id]))
    if model_version is not None and not evaluations:
        out.append(Finding("note", "no-evaluation", f"models:/{model_version['name']}/{model_version['version']} "
                           "has no evaluation run on this server"))
    if not evaluations and model_version is None and chain and chain[0].run and chain[0].run.command != "evaluate":
        out.append(Finding("note", "no-evaluation", f"{chain[0].label} has no evaluation run on this server"))
    order = {"warning": 0, "note": 1}
    return sorted(out, key=lambda f: order[f.level])


# --------------------------------------------------------------------------------------------- rendering
def _time(ms: int | None) -> str:
    if not ms:
        return ""
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return "" if value is None else str(value)


def _headline(ev: EvaluationEvidence) -> dict[str, str]:
    m = ev.step.run.metrics if ev.step.run else {}
    units = ev.step.tags.get("metrics.units", "?")
    return {
        "Dice": _fmt(m.get("test/dice/mean")), f"HD95 [{units}]": _fmt(m.get("test/hd95/mean"), 2),
        f"ASSD [{units}]": _fmt(m.get("test/assd/mean"), 2), "NSD": _fmt(m.get("test/nsd/mean")),
        "cases": _fmt(int(m["test/n_cases"])) if "test/n_cases" in m else "",
    }


def _per_case_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    classes = list(dict.fromkeys(str(r["class"]) for r in rows))
    scores = evidence.case_scores(rows)
    header = ["case", "mean Dice"] + [f"Dice {c}" for c in classes] + [f"HD95 {c}" for c in classes]
    table = []
    for case in sorted(scores, key=lambda c: -scores[c] if not math.isnan(scores[c]) else 1):
        by_class = {str(r["class"]): r for r in rows if str(r["case"]) == case}
        table.append([case, _fmt(scores[case])] + [_fmt(by_class.get(c, {}).get("dice")) for c in classes]
                     + [_fmt(by_class.get(c, {}).get("hd95"), 2) for c in classes])
    return header, table


def _lineage_rows(audit: Audit) -> tuple[list[str], list[list[str]]]:
    header = ["step", "run", "method", "data card (digest)", "config digest", "started", "key facts"]
    rows = []
    for step in audit.chain:
        if not step.run:
            rows.append([step.role, step.run_id, "", "", "", "", "NOT FOUND on this server"])
            continue
        t = step.tags
        facts = []
        if t.get("medda.command") == "adapt":
            facts += [f"recommended={t.get('recommended', '?')}", f"prior={t.get('prior.source', '?')}",
                      f"collapse={t.get('collapse', '?')}", f"source-free={t.get('source_free', '?')}"]
        if t.get("checkpoint.policy"):
            facts.append(f"checkpoint policy={t['checkpoint.policy']}")
        if t.get("checkpoint.selected"):
            facts.append(f"selected={t['checkpoint.selected']}")
        if t.get("metrics.units"):
            facts.append(f"units={t['metrics.units']}")
        if t.get("ssl.role"):
            facts.append(f"ssl role={t['ssl.role']}")
        if step.sweep:
            facts.append(f"in sweep {step.sweep.name or step.sweep.run_id[:8]} ({step.sweep.run_id[:8]})")
        rows.append([step.role, f"{step.run.name} ({step.run_id})", t.get("method", ""),
                     f"{t.get('card.name', '')} ({t.get('card.digest', '')})", t.get("config.digest", ""),
                     _time(step.run.start_time), ", ".join(facts)])
    return header, rows


def _data_rows(steps: list[Step]) -> tuple[list[str], list[list[str]]]:
    header = ["run", "context", "dataset", "digest", "cases", "source"]
    rows = []
    for step in steps:
        if not step.run:
            continue
        for item in step.run.inputs:
            n = item["tags"].get("cases", "")
            if not n and item["context"] in step.manifests:
                n = str(len(step.manifests[item["context"]].get("cases", [])))
            rows.append([step.label, item["context"], item["name"], item["digest"], n, _source(item["source"])])
    return header, rows


def _source(source: Any) -> str:
    """A dataset source as a path/URI (MLflow stores it as JSON, e.g. {"uri": "/data/B/imagesTr"})."""
    text = str(source)
    if text.startswith("{"):
        import json

        with contextlib.suppress(ValueError, AttributeError):
            text = str(json.loads(text).get("uri", text))
    return text[:160]


def _code_rows(steps: list[Step]) -> tuple[list[str], list[list[str]]]:
    header = ["run", "git commit", "dirty tree", "medda", "python", "host"]
    return header, [[s.label, s.tags.get("git.commit", ""), s.tags.get("git.dirty", ""), s.tags.get("medda.version", ""),
                     s.tags.get("python", ""), s.tags.get("host", "")] for s in steps if s.run]


def _registry_rows(audit: Audit, steps: list[Step]) -> tuple[list[str], list[list[str]]]:
    header = ["model version", "aliases", "run", "method", "source model version", "data card digest", "promotions"]
    rows, seen = [], set()
    versions = [v for s in steps for v in s.versions]
    if audit.model_version:
        versions.insert(0, audit.model_version)
    for v in versions:
        key = (v["name"], v["version"])
        if key in seen:
            continue
        seen.add(key)
        t = v["tags"]
        promotions = "; ".join(f"{k.split('.')[1]} by {t[k]}: {t.get(k[:-3] + '.reason', '')} ({t.get(k[:-3] + '.at', '')})"
                               for k in sorted(t) if k.startswith("promotion.") and k.endswith(".by"))
        rows.append([f"{v['name']}/{v['version']}", ", ".join(v["aliases"]), v["run_id"][:8], t.get("method", ""),
                     t.get("source.model_version", ""), t.get("card.digest", ""), promotions])
    return header, rows


def _all_steps(audit: Audit) -> list[Step]:
    steps = list(audit.chain)
    for ev in audit.evaluations:
        if all(ev.step.run_id != s.run_id for s in steps):
            steps.insert(0, ev.step)
    return steps


def _summary_lines(audit: Audit) -> list[str]:
    lines = [f"Subject: {audit.subject}"]
    if audit.model_version:
        mv = audit.model_version
        lines.append(f"Registered model {mv['name']} version {mv['version']} (aliases: {', '.join(mv['aliases']) or 'none'})"
                     f", from run {mv['run_id']}")
    chain = " <- ".join(
        (f"{s.role} [{s.tags.get('method', '')} on {s.tags.get('card.name', '')}]" if s.run else f"{s.role} [missing]")
        for s in audit.chain
    )
    lines.append(f"Chain: {chain}")
    for ev in audit.evaluations:
        head = _headline(ev)
        lines.append(f"Evaluation {ev.step.run_id[:8]} on {ev.step.tags.get('card.name', '')}: "
                     + ", ".join(f"{k} {v}" for k, v in head.items() if v))
    n_warn = len(audit.warnings)
    lines.append(f"{n_warn} warning(s), {len(audit.findings) - n_warn} note(s). Tracking store: {audit.uri}. "
                 f"Generated {audit.generated}.")
    return lines


# HTML -----------------------------------------------------------------------------------------
_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1150px;color:#1b1f24;
line-height:1.45}
h1{font-size:24px;border-bottom:3px solid #4363d8;padding-bottom:6px}
h2{font-size:19px;margin-top:34px;background:#eef1fb;padding:6px 10px;border-left:6px solid #4363d8}
h3{font-size:15px;margin-top:22px}
table{border-collapse:collapse;margin:8px 0;font-size:12.5px;width:100%}
th,td{border:1px solid #cfd4dc;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#f3f4f7}
code,pre{font-family:SFMono-Regular,Menlo,Consolas,monospace;font-size:12px}
pre{background:#f6f8fa;padding:8px;overflow-x:auto;border:1px solid #e1e4e8}
.warning{background:#fde8e8;border-left:6px solid #d73027;padding:6px 10px;margin:6px 0}
.note{background:#e8f1fd;border-left:6px solid #4363d8;padding:6px 10px;margin:6px 0}
.ok{background:#e6f4ea;border-left:6px solid #1a9850;padding:6px 10px}
figure{margin:10px 0}figure img{max-width:100%;border:1px solid #cfd4dc}
figcaption{font-size:12px;color:#555}
"""


def _table_html(header: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return "<p><em>none</em></p>"
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _image_html(image: Image) -> str:
    data = base64.b64encode(image.png).decode()
    return (f'<figure><img alt="{html.escape(image.title)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(image.title)}</figcaption></figure>")


def _anchor(title: str) -> str:
    return title.lower().replace(" ", "-")


def render_html(audit: Audit) -> str:
    steps = _all_steps(audit)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>medda audit: {html.escape(audit.subject)}</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>medda audit report</h1><p>{html.escape(audit.subject)}</p>",
             "<nav>" + " · ".join(f"<a href='#{_anchor(s)}'>{s}</a>" for s in SECTIONS) + "</nav>"]

    def section(title: str, body: str) -> None:
        parts.append(f"<section id='{_anchor(title)}'><h2>{title}</h2>{body}</section>")

    section("Summary", "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in _summary_lines(audit)) + "</ul>")
    if audit.findings:
        body = "".join(f"<div class='{f.level}'><b>{f.level.upper()}</b> [{html.escape(f.code)}] "
                       f"{html.escape(f.message)}</div>" for f in audit.findings)
    else:
        body = "<div class='ok'>No warnings: units in mm, no oracle prior, no test-set selection, no collapse, "\
               "no train/eval overlap, clean git tree.</div>"
    section("Warnings", body)
    section("Lineage", "<p>From the audited run back to the data (each run's <code>parent.run_id</code>).</p>"
            + _table_html(*_lineage_rows(audit))
            + "".join(f"<p><b>{html.escape(s.label)}</b> recommendation: {html.escape(s.tags['recommendation.reason'])}</p>"
                      for s in audit.chain if s.tags.get("recommendation.reason")))
    section("Data", "<p>MLflow dataset inputs (data card and datalist digests with their contexts).</p>"
            + _table_html(*_data_rows(steps)))
    configs = "".join(
        f"<details><summary>{html.escape(s.label)} — config digest {html.escape(s.tags.get('config.digest', ''))}"
        f"</summary><pre>{html.escape(s.config or '(no config artifact)')}</pre></details>" for s in steps if s.run)
    section("Configuration", configs or "<p><em>none</em></p>")
    section("Code", _table_html(*_code_rows(steps)))
    section("Model registry", _table_html(*_registry_rows(audit, steps)))
    ev_parts = []
    for ev in audit.evaluations:
        ev_parts.append(f"<h3>{html.escape(ev.step.label)} on {html.escape(ev.step.tags.get('card.name', ''))}</h3>"
                        f"<p>run <code>{ev.step.run_id}</code></p>")
        head = _headline(ev)
        ev_parts.append(_table_html(list(head), [list(head.values())]))
        if ev.rows:
            ev_parts.append("<details open><summary>per-case metrics</summary>"
                            + _table_html(*_per_case_table(ev.rows)) + "</details>")
        for image in ev.images:
            ev_parts.append(_image_html(image))
        if ev.before_after:
            ev_parts.append(f"<p>Before/after per case ({html.escape(ev.before_after_source)}):</p>")
            ev_parts.append(_table_html(["case", "Dice before", "Dice after", "change"],
                                        [[r["case"], _fmt(r["dice_before"]), _fmt(r["dice_after"]), _fmt(r["delta"])]
                                         for r in ev.before_after]))
    for run_id, images in audit.adaptations.items():
        ev_parts.append(f"<h3>Adaptation {run_id[:8]}: label-free monitoring</h3>")
        ev_parts += [_image_html(i) for i in images]
    section("Evidence", "".join(ev_parts) or "<p><em>no evidence artifacts</em></p>")
    parts.append("</body></html>")
    return "".join(parts)


# Markdown --------------------------------------------------------------------------------------
def _table_md(header: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return "_none_\n"

    def cell(c: Any) -> str:
        return str(c).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def render_markdown(audit: Audit, image_dir: str) -> str:
    steps = _all_steps(audit)
    out = [f"# medda audit report\n\n{audit.subject}\n"]
    out.append("## Summary\n\n" + "\n".join(f"- {line}" for line in _summary_lines(audit)) + "\n")
    out.append("## Warnings\n")
    out += [f"- **{f.level.upper()}** [{f.code}] {f.message}" for f in audit.findings] or ["No warnings."]
    out.append("\n## Lineage\n\n" + _table_md(*_lineage_rows(audit)))
    out += [f"{s.label} recommendation: {s.tags['recommendation.reason']}\n" for s in audit.chain
            if s.tags.get("recommendation.reason")]
    out.append("## Data\n\n" + _table_md(*_data_rows(steps)))
    out.append("## Configuration\n")
    for s in steps:
        if s.run:
            out.append(f"### {s.label} (config digest {s.tags.get('config.digest', '')})\n\n```yaml\n"
                       f"{(s.config or '(no config artifact)').rstrip()}\n```\n")
    out.append("## Code\n\n" + _table_md(*_code_rows(steps)))
    out.append("## Model registry\n\n" + _table_md(*_registry_rows(audit, steps)))
    out.append("## Evidence\n")
    for ev in audit.evaluations:
        head = _headline(ev)
        out.append(f"### {ev.step.label} on {ev.step.tags.get('card.name', '')}\n\nrun `{ev.step.run_id}`\n\n"
                   + _table_md(list(head), [list(head.values())]))
        if ev.rows:
            out.append(_table_md(*_per_case_table(ev.rows)))
        out += [f"![{i.title}]({image_dir}/{i.file})\n" for i in ev.images]
        if ev.before_after:
            out.append(f"Before/after per case ({ev.before_after_source}):\n\n" + _table_md(
                ["case", "Dice before", "Dice after", "change"],
                [[r["case"], _fmt(r["dice_before"]), _fmt(r["dice_after"]), _fmt(r["delta"])] for r in ev.before_after]))
    for run_id, images in audit.adaptations.items():
        out.append(f"### Adaptation {run_id[:8]}: label-free monitoring\n")
        out += [f"![{i.title}]({image_dir}/{i.file})\n" for i in images]
    return "\n".join(out) + "\n"


def write_report(audit: Audit, out_dir: Path, stem: str | None = None) -> tuple[Path, Path]:
    """Write `<stem>.html` (self-contained) and `<stem>.md` (+ `<stem>_images/`) into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if stem is None:
        first = audit.chain[0]
        stem = f"audit-{first.run_id[:8]}"
        if audit.model_version:
            stem = f"audit-{audit.model_version['name']}-v{audit.model_version['version']}"
    html_path = out_dir / f"{stem}.html"
    html_path.write_text(render_html(audit), encoding="utf-8")
    image_dir = out_dir / f"{stem}_images"
    images = [i for ev in audit.evaluations for i in ev.images] + [i for v in audit.adaptations.values() for i in v]
    if images:
        image_dir.mkdir(exist_ok=True)
        for image in images:
            (image_dir / image.file).write_bytes(image.png)
    md_path = out_dir / f"{stem}.md"
    md_path.write_text(render_markdown(audit, image_dir.name), encoding="utf-8")
    return html_path, md_path


# --------------------------------------------------------------------------------------------- compare
@dataclass
class CompareGroup:
    card_name: str
    card_digest: str
    eval_digest: str
    n_cases: str
    rows: list[dict]


def compare(
    store: TrackingStore, experiments: list[str] | None = None, card_digest: str | None = None,
    eval_digest: str | None = None,
) -> list[CompareGroup]:
    """Evaluation runs grouped by target (data card digest) and labels (eval datalist digest): methods x metrics."""
    filters = {"medda.command": "evaluate"}
    if card_digest:
        filters["card.digest"] = card_digest
    groups: dict[tuple[str, str], CompareGroup] = {}
    parents: dict[str, RunRecord | None] = {}
    for run in store.search_runs(filters, experiments):
        if run.status != "FINISHED":
            continue
        digest = run.dataset_digest(EVALUATION) or run.tags.get("eval.digest", "?")
        if eval_digest and digest != eval_digest:
            continue
        key = (run.tags.get("card.digest", "?"), digest)
        group = groups.setdefault(key, CompareGroup(run.tags.get("card.name", "?"), key[0], digest,
                                                    _fmt(int(run.metrics["test/n_cases"])) if "test/n_cases" in run.metrics else "?",
                                                    []))
        parent_id = run.parent_run_id
        if parent_id and parent_id not in parents:
            parents[parent_id] = store.get_run(parent_id)
        parent = parents.get(parent_id)
        model = "?"
        if parent:
            model = {"adapt": "adapted", "train": "source"}.get(parent.command, parent.command)
            if parent.command == "train":
                model += f" ({parent.tags.get('card.name', '?')})"
        label = run.tags.get("method", "?")
        if run.tags.get("checkpoint.policy"):
            label += f" [{run.tags['checkpoint.policy']}]"
        row = {"method": label, "model": model, "recommended": parent.tags.get("recommended", "") if parent else "",
               "units": run.tags.get("metrics.units", ""), "run": run.run_id, "started": _time(run.start_time)}
        for m in METRICS:
            row[m] = run.metrics.get(f"test/{m}/mean", math.nan)
        group.rows.append(row)
    for group in groups.values():
        group.rows.sort(key=lambda r: -r["dice"] if not math.isnan(r["dice"]) else 1)
    return sorted(groups.values(), key=lambda g: (g.card_name, g.eval_digest))


def format_compare(groups: list[CompareGroup]) -> str:
    if not groups:
        return "no finished evaluation runs match"
    blocks = []
    for g in groups:
        units = "/".join(sorted({r["units"] for r in g.rows if r["units"]})) or "?"
        lines = [f"target {g.card_name} (card {g.card_digest}), evaluation cases {g.eval_digest} (n={g.n_cases}), "
                 f"distances in {units}"]
        header = f"{'method':<24} {'model':<24} {'rec.':<5} {'Dice':>6} {'HD95':>8} {'ASSD':>8} {'NSD':>6}  run"
        lines += [header, "-" * len(header)]
        for r in g.rows:
            lines.append(f"{r['method'][:24]:<24} {r['model'][:24]:<24} {r['recommended'][:5]:<5} {_fmt(r['dice']):>6} "
                         f"{_fmt(r['hd95'], 2):>8} {_fmt(r['assd'], 2):>8} {_fmt(r['nsd']):>6}  {r['run'][:12]}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def compare_before_after(store: TrackingStore, before_run: str, after_run: str) -> list[dict]:
    """Per-case Dice of two evaluation runs on the same cases (source model vs adapted model)."""
    runs = {}
    for name, run_id in (("before", before_run), ("after", after_run)):
        run = store.get_run(run_id)
        if run is None or run.command != "evaluate":
            raise MeddaError(f"--{name} {run_id}: not an evaluation run on {store.uri}")
        runs[name] = run
    a, b = runs["before"].dataset_digest(EVALUATION), runs["after"].dataset_digest(EVALUATION)
    if a and b and a != b:
        raise MeddaError(f"--before and --after evaluated different cases (datalist digests {a} vs {b})")
    before = store.read_csv(before_run, "evaluation/per_case.csv")
    after = store.read_csv(after_run, "evaluation/per_case.csv")
    rows = evidence.before_after_rows(before, after)
    if not rows:
        raise MeddaError("--before and --after share no evaluated case")
    return rows


def format_before_after(rows: list[dict]) -> str:
    header = f"{'case':<24} {'Dice before':>11} {'Dice after':>10} {'change':>8}"
    lines = [header, "-" * len(header)]
    lines += [f"{r['case'][:24]:<24} {_fmt(r['dice_before']):>11} {_fmt(r['dice_after']):>10} {r['delta']:>+8.3f}"
              for r in rows]
    mean_b = sum(r["dice_before"] for r in rows) / len(rows)
    mean_a = sum(r["dice_after"] for r in rows) / len(rows)
    better = sum(r["delta"] > 0 for r in rows)
    lines.append(f"{'mean':<24} {mean_b:>11.3f} {mean_a:>10.3f} {mean_a - mean_b:>+8.3f}   "
                 f"({better}/{len(rows)} cases better)")
    return "\n".join(lines)
