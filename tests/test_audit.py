"""Auditing through MLflow against a real tracking server started on loopback by the test (stopped by PID).

One tiny chain (phantoms of a few mm-sized volumes, 10 training and 4 adaptation iterations): train on site A
-> adaptation sweep {tent, adabn} on site B (nested runs, with evaluations) -> a deliberately leaky evaluation
on site A's training and validation cases. Then: tags, dataset inputs and contexts, parent links, registered
versions and aliases, promotion, evidence PNGs, compare tables and the audit report (HTML + Markdown,
headless-Chromium screenshot).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from medda import api
from medda.audit import SECTIONS, Finding, Step, find_issues
from medda.config import TrackingConfig, load_config
from medda.data.cards import load_card
from medda.data.phantoms import write_phantom_dataset
from medda.errors import MeddaError
from medda.server import free_port, start_server, stop_server
from medda.sweep import adapt_sweep
from medda.tracking import RunRecord, TrackingStore, make_tracker, registered_model_name, resolve_uri
from pipelines.cli import app

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
EXPERIMENT = "audit-test"
TINY = ["train.threads=1", "data.patch_size=[32,32,8]", "model.channels=[8,16,32]", "inference.sw_batch_size=2",
        "data.samples_per_volume=1"]
runner = CliRunner()


# --------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    srv = start_server(backend_store_uri=f"sqlite:///{root / 'mlflow.db'}", artifacts_destination=root / "artifacts",
                       log=root / "server.log", cwd=root)
    yield srv
    stop_server(srv)
    assert srv.process.poll() is not None, "the server process outlived stop_server"
    with pytest.raises(ProcessLookupError):
        os.killpg(srv.pid, 0)  # no process of its group is left either


def _cfg(recipe: str, root: Path, uri: str, extra: list[str]):
    return load_config(REPO / "configs" / recipe, [f"tracking.uri={uri}", f"tracking.experiment={EXPERIMENT}", *TINY, *extra])


@pytest.fixture(scope="module")
def chain(server, tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    data = root / "data"
    write_phantom_dataset(data, sites=("A", "B"), cases_per_site=5, seed=0, fov_mm=(48, 48, 32), split=(0.4, 0.2, 0.4))
    card_a, card_b = REPO / "data_cards/phantom_site_a.yaml", REPO / "data_cards/phantom_site_b.yaml"
    a, b = data / "A/datalist.json", data / "B/datalist.json"
    train_cfg = _cfg("phantom_source.yaml", root, server.uri, [
        f"data.card={card_a}", f"data.train.path={a}", f"data.val.path={a}", f"data.test.path={a}",
        "train.iterations=10", "train.val_every=5", f"output_dir={root / 'source'}",
    ])
    source = api.train(train_cfg)
    adapt_cfg = _cfg("phantom_adapt.yaml", root, server.uri, [
        f"data.card={card_b}", f"data.target.path={b}", f"data.test.path={b}", f"source_checkpoint={source.checkpoint}",
        "method.name=tent", "method.options={}", "train.iterations=4", "train.val_every=2", "tracking.system_metrics=true",
        f"output_dir={root / 'sweep'}",
    ])
    saved = {k: os.environ.get(k) for k in ("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL",)}
    os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "0.5"
    try:
        sweep = adapt_sweep(adapt_cfg, ["tent", "adabn"], evaluate=True, echo=lambda _: None)
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    # A leaky evaluation: the source model on site A's training + validation + test cases.
    leaky_cfg = _cfg("phantom_source.yaml", root, server.uri, [
        f"data.card={card_a}", f"data.test.path={a}", "data.test.split=null", f"output_dir={root / 'leaky'}",
    ])
    leaky = api.evaluate(source.checkpoint, leaky_cfg)
    return {"root": root, "source": source, "sweep": sweep, "leaky": leaky, "store": TrackingStore(server.uri),
            "uri": server.uri, "card_a": load_card(card_a), "card_b": load_card(card_b)}


def _contexts(run: RunRecord) -> set[str]:
    return {i["context"] for i in run.inputs}


# --------------------------------------------------------------------------------------------- lineage
def test_lineage_tags_inputs_and_parent_links(chain):
    store, sweep = chain["store"], chain["sweep"]
    train = store.get_run(chain["source"].run_id)
    assert train.tags["medda.command"] == "train" and train.tags["card.digest"] == chain["card_a"].digest()
    for key in ("config.digest", "git.commit", "git.dirty", "medda.version", "host"):
        assert train.tags.get(key), key
    assert _contexts(train) == {"data-card", "source-train", "val"}
    manifest = store.read_json(train.run_id, "datasets/source-train.json")
    assert [c["id"] for c in manifest["cases"]] == ["A_000", "A_001"]

    parent = store.get_run(sweep.run_id)
    assert parent.tags["medda.command"] == "adapt-sweep" and parent.tags["sweep.methods"] == "tent,adabn"
    assert any(k.startswith("system/") for k in parent.metrics), "system metrics were not logged"
    assert "sweep/summary.csv" in store.list_artifacts(sweep.run_id)
    for method, result in sweep.adaptations.items():
        run = store.get_run(result.run_id)
        assert run.tags["method"] == method
        assert run.tags["parent.run_id"] == train.run_id  # lineage: adapted model -> source model
        assert run.tags["mlflow.parentRunId"] == sweep.run_id  # nested under the sweep
        assert _contexts(run) == {"data-card", "target-adapt"}
        assert run.tags["card.digest"] == chain["card_b"].digest()
        ev = store.get_run(sweep.evaluations[method].run_id)
        assert ev.tags["parent.run_id"] == result.run_id and ev.tags["mlflow.parentRunId"] == sweep.run_id
        assert _contexts(ev) == {"eval"} and ev.tags["eval.digest"] == ev.dataset_digest("eval")
        assert ev.tags["metrics.units"] == "mm" and "test/dice/mean" in ev.metrics
    baseline = store.get_run(sweep.evaluations["source"].run_id)
    assert baseline.tags["parent.run_id"] == train.run_id and baseline.tags["sweep.role"] == "baseline"


# --------------------------------------------------------------------------------------------- registry
def test_registered_versions_aliases_and_promotion(chain):
    store = chain["store"]
    name_a = registered_model_name("phantom_site_a", chain["card_a"].class_names)
    assert name_a == "medda-phantom_site_a-ring-blob-rv"
    (source_version,) = store.versions_for_run(chain["source"].run_id)
    assert source_version["name"] == name_a and "candidate" in source_version["aliases"]
    assert source_version["source"] == f"runs:/{chain['source'].run_id}/checkpoints"
    assert source_version["tags"]["method"] == "supervised"
    assert source_version["tags"]["card.digest"] == chain["card_a"].digest()

    name_b = registered_model_name("phantom_site_b", chain["card_b"].class_names)
    versions = {}
    for method, result in chain["sweep"].adaptations.items():
        (v,) = store.versions_for_run(result.run_id)
        assert v["name"] == name_b and v["tags"]["method"] == method
        assert v["tags"]["source.model_version"] == f"{name_a}/{source_version['version']}"
        assert v["tags"]["card.digest"] == chain["card_b"].digest()
        assert v["tags"]["recommended"] == str(result.recommended).lower()
        versions[method] = v
    recommended = [v for m, v in versions.items() if chain["sweep"].adaptations[m].recommended]
    candidate = store.registered_model(name_b)["aliases"].get("candidate")
    if recommended:  # the alias follows the newest recommended adapted model only
        assert str(candidate) == max(recommended, key=lambda v: int(v["version"]))["version"]
    else:
        assert candidate is None

    uri = ["--tracking-uri", chain["uri"]]
    refused = runner.invoke(app, ["promote", name_b, "1", "--alias", "champion", *uri])
    assert refused.exit_code == 2 and "--reason is required" in refused.output
    ok = runner.invoke(app, ["promote", name_b, "1", "--alias", "champion", "--reason", "best on site B review", *uri])
    assert ok.exit_code == 0, ok.output
    again = runner.invoke(app, ["promote", name_b, "2", "--alias", "champion", "--reason", "re-reviewed", *uri])
    assert again.exit_code == 0 and "was version 1" in again.output
    v2, v1 = store.model_version(name_b, "champion"), store.model_version(name_b, "1")
    import getpass

    assert v2["version"] == "2" and v2["tags"]["promotion.champion.by"] == getpass.getuser()
    assert v2["tags"]["promotion.champion.reason"] == "re-reviewed" and v2["tags"]["promotion.champion.replaced"] == "1"
    assert v1["tags"]["promotion.champion.reason"] == "best on site B review"
    assert v1["tags"]["promotion.champion.superseded_by"].startswith("version 2")
    missing = runner.invoke(app, ["promote", name_b, "99", "--reason", "x", *uri])
    assert missing.exit_code == 2 and "no version or alias '99'" in missing.output


# --------------------------------------------------------------------------------------------- evidence
def _download_png(chain, run_id: str, path: str) -> np.ndarray:
    from PIL import Image

    local = chain["store"].download(run_id, path, chain["root"] / "downloads" / run_id)
    assert local is not None, f"{path} missing from run {run_id}"
    return np.asarray(Image.open(local).convert("RGB")).astype(np.int16)


def _colour_pixels(image: np.ndarray) -> int:
    return int(((image.max(axis=2) - image.min(axis=2)) > 80).sum())


def test_overlay_and_plot_artifacts(chain):
    store = chain["store"]
    leaky = store.get_run(chain["leaky"].run_id)
    artifacts = store.list_artifacts(leaky.run_id)
    overlays = sorted(p for p in artifacts if p.startswith("evidence/overlay_"))
    assert [p.split("_")[1] for p in overlays] == ["best", "median", "worst"]  # 5 cases: 3 distinct ones
    cases = store.read_json(leaky.run_id, "evidence/cases.json")
    scores = {c["role"]: c["dice"] for c in cases}
    assert scores["best"] >= scores["median"] >= scores["worst"]
    for path in overlays:
        image = _download_png(chain, leaky.run_id, path)
        assert image.shape[0] > 200 and image.shape[1] > 400
        assert image.std() > 20  # not a constant picture
        assert _colour_pixels(image) > 200  # coloured contours on a grey image
    for method in ("tent", "adabn"):
        ev = chain["sweep"].evaluations[method]
        arts = store.list_artifacts(ev.run_id)
        assert "evidence/before_after.png" in arts and "evaluation/before_after.csv" in arts
        rows = store.read_csv(ev.run_id, "evaluation/before_after.csv")
        assert {r["case"] for r in rows} == {r["case"] for r in ev.rows}
        assert store.get_run(ev.run_id).tags["before.run_id"] == chain["sweep"].evaluations["source"].run_id
        assert _colour_pixels(_download_png(chain, ev.run_id, "evidence/before_after.png")) > 200
        monitoring = _download_png(chain, chain["sweep"].adaptations[method].run_id, "evidence/monitoring.png")
        assert monitoring.std() > 20 and _colour_pixels(monitoring) > 200


# --------------------------------------------------------------------------------------------- compare
def test_compare_tables(chain):
    uri = ["--tracking-uri", chain["uri"]]
    out = runner.invoke(app, ["compare", "--experiment", EXPERIMENT, "--target-card-digest", chain["card_b"].digest(), *uri])
    assert out.exit_code == 0, out.output
    text = out.output
    assert text.count("target phantom_site_b") == 1  # one target/labels group
    for method in ("supervised", "tent", "adabn"):
        assert any(line.startswith(method) for line in text.splitlines()), method
    everything = runner.invoke(app, ["compare", "--experiment", EXPERIMENT, *uri])
    assert "target phantom_site_a" in everything.output and "target phantom_site_b" in everything.output
    before, after = chain["sweep"].evaluations["source"].run_id, chain["sweep"].evaluations["tent"].run_id
    plot = chain["root"] / "ba.png"
    pair = runner.invoke(app, ["compare", "--before", before, "--after", after, "--plot", str(plot), *uri])
    assert pair.exit_code == 0, pair.output
    assert "mean" in pair.output and plot.is_file()
    wrong = runner.invoke(app, ["compare", "--before", before, "--after", chain["leaky"].run_id, *uri])
    assert wrong.exit_code == 2 and "different cases" in wrong.output


# --------------------------------------------------------------------------------------------- audit
@pytest.fixture(scope="module")
def report(chain):
    out = chain["root"] / "audit"
    result = runner.invoke(app, ["audit", chain["sweep"].evaluations["tent"].run_id, "--out", str(out),
                                 "--tracking-uri", chain["uri"]])
    assert result.exit_code == 0, result.output
    (html_path,) = out.glob("*.html")
    (md_path,) = out.glob("*.md")
    return html_path, md_path, result.output


def test_audit_report_content(chain, report):
    html_path, md_path, output = report
    text = html_path.read_text(encoding="utf-8")
    for title in SECTIONS:
        assert f"<h2>{title}</h2>" in text and f"## {title}" in md_path.read_text(encoding="utf-8")
    # the chain: evaluation -> adaptation -> source training, with their data, config and code
    tent = chain["sweep"].adaptations["tent"]
    for run_id in (chain["sweep"].evaluations["tent"].run_id, tent.run_id, chain["source"].run_id):
        assert run_id in text
    for context in ("eval", "target-adapt", "source-train", "val", "data-card"):
        assert f"<td>{context}</td>" in text
    store = chain["store"]
    for run_id in (tent.run_id, chain["source"].run_id):
        run = store.get_run(run_id)
        assert run.tags["config.digest"] in text and run.tags["git.commit"] in text
    assert "adapt-sweep" in text or "in sweep" in text
    assert text.count("data:image/png;base64,") >= 4  # overlays, before/after, monitoring
    assert "<script" not in text and "<link" not in text and "src=\"http" not in text  # stands alone
    assert "medda-phantom_site_b-ring-blob-rv/" in text and "medda-phantom_site_a-ring-blob-rv/" in text
    images = md_path.parent / f"{md_path.stem}_images"
    assert len(list(images.glob("*.png"))) >= 4 and "](audit-" in md_path.read_text(encoding="utf-8")
    assert "eval-overlaps-training" not in text and "selection-on-test" not in text  # B test vs A/B training: clean
    if store.get_run(tent.run_id).tags["git.dirty"] == "true":
        assert "dirty-git" in text and "WARNING: [dirty-git]" in output


def test_audit_warns_about_leaky_evaluation_and_model_uri(chain):
    out = chain["root"] / "audit-leaky"
    uri = ["--tracking-uri", chain["uri"]]
    result = runner.invoke(app, ["audit", chain["leaky"].run_id, "--out", str(out), "--strict", *uri])
    assert result.exit_code == 3, result.output  # --strict: warnings fail the gate
    assert "[eval-overlaps-training]" in result.output and "A_000, A_001" in result.output
    assert "[selection-on-test]" in result.output and "A_002" in result.output
    name = registered_model_name("phantom_site_a", chain["card_a"].class_names)
    by_model = runner.invoke(app, ["audit", f"models:/{name}@candidate", "--out", str(out), *uri])
    assert by_model.exit_code == 0, by_model.output
    html = next(out.glob(f"audit-{name}-v*.html")).read_text(encoding="utf-8")
    assert chain["leaky"].run_id in html and chain["sweep"].evaluations["source"].run_id in html  # its evaluations
    missing = runner.invoke(app, ["audit", "0123456789abcdef0123456789abcdef", *uri])
    assert missing.exit_code == 2 and "not found" in missing.output


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_report_screenshot_in_headless_chromium(report, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")
    from PIL import Image

    html_path = report[0]
    shot = tmp_path / "report.png"
    subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2000",
         html_path.resolve().as_uri()],
        check=True, capture_output=True, timeout=120,
    )
    image = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)
    assert image.shape[:2] == (2000, 1200)
    rows_with_ink = (image.min(axis=2) < 200).any(axis=1)
    assert rows_with_ink.mean() > 0.3  # text and tables all the way down, not a blank or error page
    # section headings are drawn on a tinted band (#eef1fb): several of them in the first 2000 px
    band = (np.abs(image - np.array([0xEE, 0xF1, 0xFB])).sum(axis=2) < 6).sum(axis=1) > 600
    assert (np.diff(band.astype(int)) == 1).sum() >= 5
    assert _colour_pixels(image) > 500  # the red warning box / blue bars / coloured evidence


# --------------------------------------------------------------------------------------------- units
def _run(run_id: str, tags: dict, inputs: list | None = None) -> RunRecord:
    return RunRecord(run_id, run_id, "1", EXPERIMENT, "FINISHED", 0, 0, tags, {}, {}, inputs or [], "")


def test_findings_without_a_server():
    base = {"git.commit": "abc", "git.dirty": "false"}
    ev = Step("evaluation", "e1", _run("e1", {**base, "medda.command": "evaluate", "metrics.units": "voxels",
                                              "card.name": "site"}))
    ev.manifests["eval"] = {"cases": [{"id": "c1", "image": "/d/c1.nii.gz"}, {"id": "c2", "image": "/d/c2.nii.gz"}]}
    adapt = Step("adaptation", "a1", _run("a1", {**base, "medda.command": "adapt", "prior.source": "oracle",
                                                 "collapse": "class 1 vanished", "git.dirty": "true",
                                                 "card.name": "site", "recommended": "false"},
                                          [{"context": "target-adapt", "digest": "x", "name": "t", "tags": {}}]))
    adapt.manifests["target-adapt"] = {"cases": [{"id": "c2", "image": "/d/c2.nii.gz"}]}
    missing = Step("source training", "s1", None)
    codes = {f.code: f for f in find_issues([adapt, missing], [(ev, [adapt, missing])])}
    for code in ("units-voxels", "oracle-prior", "collapse", "dirty-git", "lineage-broken"):
        assert codes[code].level == "warning", code
    assert codes["transductive"].level == "note" and "c2" in codes["transductive"].message
    assert codes["not-recommended"].level == "note"
    assert "eval-overlaps-training" not in codes and "selection-on-test" not in codes
    assert all(isinstance(f, Finding) for f in codes.values())
    # a val_dice source training whose validation cases are evaluated: selection on test data
    train = Step("source training", "s2", _run("s2", {**base, "medda.command": "train", "checkpoint.policy": "val_dice",
                                                      "card.name": "site"},
                                               [{"context": "val", "digest": "v", "name": "v", "tags": {}}]))
    train.manifests["val"] = {"cases": [{"id": "c1", "image": "/elsewhere/c1.nii.gz"}]}  # same card + id
    found = {f.code: f for f in find_issues([train], [(ev, [train])])}
    assert found["selection-on-test"].level == "warning" and "c1" in found["selection-on-test"].message
    train.tags["checkpoint.policy"] = "last"  # validation cases logged but not used to select: no warning
    assert "selection-on-test" not in {f.code for f in find_issues([train], [(ev, [train])])}


def test_unreachable_server_is_refused_unless_a_fallback_is_set(server, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(MeddaError, match="unreachable"):
        resolve_uri(TrackingConfig(uri=dead))
    with pytest.raises(MeddaError, match="unreachable"):
        make_tracker(TrackingConfig(uri=dead))
    fallback = f"sqlite:///{tmp_path / 'fallback.db'}"
    assert resolve_uri(TrackingConfig(uri=dead, fallback_uri=fallback)) == fallback
    assert resolve_uri(TrackingConfig(uri=server.uri, fallback_uri=fallback)) == server.uri
    result = runner.invoke(app, ["audit", "x", "--tracking-uri", dead])
    assert result.exit_code == 2 and "unreachable" in result.output
