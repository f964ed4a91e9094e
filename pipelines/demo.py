"""`medda demo`: the embedded default, end to end on generated multi-site phantoms.

1. generate phantom sites A (source), D (A at low resolution: a shift adaptation can undo) and B (partly reordered
   contrast, other intensity range, bias, noise and grid: a shift it cannot undo);
2. train a 3D segmenter on site A (best checkpoint on A's validation cases);
3. evaluate it on A and, without adaptation, on D and B (the domain gaps);
4. adapt it to D's and to B's unlabelled scans with the source-free methods; the label-free rule says whether to use
   the adapted model; the target labels are used only afterwards, to evaluate;
5. with `ssl`: semi-supervised example, BCP with 2 labelled scans of A vs its supervised-only twin.
Everything is logged to MLflow (default: ./mlflow.db).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from medda import api
from medda.config import RunConfig, load_config
from medda.data.phantoms import write_phantom_dataset
from medda.resources import bundled

ADAPTATION = {
    # method -> recipe overrides: the settings of the real-data benchmarks (BENCHMARKS.md), i.e. the reference
    # optimisers of Tent (Adam 1e-3) and OSUDA (Adam 1e-4), and AdaMI's loss on BN affine parameters (Adam 1e-4).
    "none": [],
    "adabn": [],
    "tent": ["optim.lr=0.001"],
    "entropy_prior": ["method.options.trainable=bn_affine_batch_stats", "method.options.absent_classes=predicted_tags",
                      "optim.lr=0.0001"],
    "osuda": ["optim.lr=0.0001"],
}
TARGETS = {  # target site -> what kind of shift it is (printed with the site's summary)
    "D": "low resolution and noise (the features' statistics shift: adaptation can undo it)",
    "B": "partly reordered contrast on another grid (adaptation cannot undo it)",
}
WIDTH = 34  # model column


def _cfg(recipe: str, out: Path, tracking_uri: str, extra: list[str]) -> RunConfig:
    """Load a phantom recipe with its outputs under `out` and its data under `out`'s parent / data."""
    data = out.parent / "data"
    overrides = [f"tracking.uri={tracking_uri}", f"output_dir={out}"]
    cfg = load_config(bundled("configs", recipe), overrides + extra)
    # Recipes point at demo_out/data; re-root them at this demo's folder.
    for role in ("train", "unlabeled", "val", "test", "target"):
        ref = getattr(cfg.data, role)
        if ref is not None:
            site = ref.path.parent.name
            setattr(cfg.data, role, ref.model_copy(update={"path": data / site / "datalist.json"}))
    if not cfg.data.card.is_absolute():  # recipes name data_cards/NAME.yaml: the shipped card
        cfg.data.card = bundled("data_cards", cfg.data.card.name)
    return cfg


def _row(name: str, site: str, ev: api.EvaluationResult, note: str = "") -> str:
    s = ev.summary
    return f"{name:<{WIDTH}} {site:^4} {s['dice/mean']:>6.3f} {s['hd95/mean']:>9.2f} {s['assd/mean']:>9.2f}  {note}"


def _site_summary(site: str, gap_from: float, before: float, adapted: dict[str, tuple[float, bool]]) -> str:
    """Three lines per target: the gap, and what the label-free rule chose against the Dice change the labels show
    afterwards."""
    used = {m: d - before for m, (d, rec) in adapted.items() if rec}
    kept = {m: d - before for m, (d, rec) in adapted.items() if not rec and m != "none"}
    fmt = lambda d: ", ".join(f"{m} {g:+.3f}" for m, g in d.items()) or "no method"  # noqa: E731
    return (f"site {site}, {TARGETS[site]}: source Dice {before:.3f} (A: {gap_from:.3f})\n"
            f"  recommended: {fmt(used)}\n  kept the source instead of: {fmt(kept)}")


def run_demo(
    out: Path, quick: bool = False, ssl: bool = False, tracking_uri: str = "sqlite:///mlflow.db",
    echo: Callable[[str], None] = print,
) -> list[str]:
    """Run the demo into `out`; returns the printed summary lines."""
    out = out.resolve()
    budget = (["train.iterations=30", "train.val_every=15"] if quick else [])
    # quick: the label-free rule scores 3 target volumes instead of 6 (its checks were a third of the smoke run)
    adapt_budget = (["train.iterations=6", "train.val_every=3", "selection.cases=3"] if quick else [])
    ssl_budget = (["train.iterations=24", "train.val_every=12", "method.options.pretrain_iterations=8"] if quick else [])
    echo(f"phantoms -> {out / 'data'}")
    write_phantom_dataset(out / "data", sites=("A", *TARGETS), cases_per_site=8 if quick else 12, seed=0)

    source_cfg = _cfg("phantom_source.yaml", out / "source", tracking_uri, budget)
    echo("training the source model on site A ...")
    source = api.train(source_cfg)
    lines = [f"{'model':<{WIDTH}} {'site':^4} {'Dice':>6} {'HD95 mm':>9} {'ASSD mm':>9}  label-free verdict"]
    summaries = []

    def evaluate(checkpoint: Path, site: str, name: str, tags: dict | None = None) -> api.EvaluationResult:
        card = bundled("data_cards", f"phantom_site_{site.lower()}.yaml")
        cfg = _cfg("phantom_source.yaml", out / f"eval_{name}_{site}", tracking_uri, [f"data.card={card}"])
        cfg.data.test = cfg.data.test.model_copy(update={"path": out / "data" / site / "datalist.json"})
        return api.evaluate(checkpoint, cfg, tags=tags)

    on_source = evaluate(source.checkpoint, "A", "source")
    lines.append(_row("source (trained on A)", "A", on_source))
    for site in TARGETS:
        before = evaluate(source.checkpoint, site, "source")
        lines.append(_row("source, no adaptation", site, before))
        adapted: dict[str, tuple[float, bool]] = {}
        for method, extra in ADAPTATION.items():
            echo(f"adapting to site {site} with {method} ...")
            target = [f"data.card=data_cards/phantom_site_{site.lower()}.yaml",
                      f"data.target.path=demo_out/data/{site}/datalist.json",
                      f"data.test.path=demo_out/data/{site}/datalist.json"]
            cfg = _cfg("phantom_adapt.yaml", out / f"adapt_{site}_{method}", tracking_uri,
                       [f"method.name={method}", f"source_checkpoint={source.checkpoint}", *target, *extra,
                        *adapt_budget])
            if method != "entropy_prior":
                cfg.method.options = {}
            result = api.adapt(cfg)
            verdict = ("use adapted" if result.recommended else "keep source") + (
                " (collapse)" if result.collapse else "")
            ev = evaluate(result.adapted, site, f"adapt_{site}_{method}", tags={"adapt.run_id": result.run_id or ""})
            adapted[method] = (ev.summary["dice/mean"], result.recommended)
            lines.append(_row(f"adapted: {method}", site, ev, verdict))
        summaries.append(_site_summary(site, on_source.summary["dice/mean"], before.summary["dice/mean"], adapted))

    if ssl:
        echo("semi-supervised: BCP with 2 labelled scans of site A vs the supervised-only twin ...")
        from pipelines.ssl import run_ssl_with_twin

        ssl_cfg = _cfg("phantom_ssl.yaml", out / "ssl", tracking_uri, ssl_budget)
        results = run_ssl_with_twin(ssl_cfg, [], echo, evaluate=False)
        for name, result in results.items():
            lines.append(_row(f"{name} (2 labelled, best-val)", "A", evaluate(result.checkpoint, "A", f"ssl_{name}")))

    echo("\n" + "\n".join(lines) + "\n\n" + "\n".join(summaries))
    echo("\nDice/HD95/ASSD: means over foreground classes of the test cases (mm). "
         f"Runs are in MLflow: mlflow ui --backend-store-uri {tracking_uri}")
    return lines + summaries
