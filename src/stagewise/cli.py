"""The command line: `stagewise run RECIPE`, `stagewise demo`, `stagewise validate`, ..."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from stagewise.progress import LineReporter
from stagewise.runs import RunError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Staged transfer learning on small clinical imaging cohorts.")


def _version(value: bool) -> None:
    if value:
        from stagewise import __version__

        print(f"stagewise {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print the version and exit")) -> None:
    """Staged transfer learning on small clinical imaging cohorts.

    Example: stagewise validate examples/covid-outcome.yaml && stagewise run examples/covid-outcome.yaml
    """
def _console(stderr: bool) -> Console:
    """A terminal's own width; in logs and pipes (and test runners) a wide one, so a message
    naming a long file path is not cut across lines at Rich's default 80 columns."""
    return Console(stderr=stderr, width=None if Console(stderr=stderr).is_terminal else 200)


console = _console(stderr=True)
out = _console(stderr=False)


class RichReporter:
    """Progress over folds (all arms) and over the epochs of the current fold."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.folds = None
        self.epochs = None

    def start(self, total_folds: int) -> None:
        self.trained = None
        self.folds = self.progress.add_task("folds", total=total_folds)
        self.epochs = self.progress.add_task("epochs", total=1, visible=False)

    def plan(self, trained_units: list[str], n_splits: int) -> None:
        """Count (and time, for the ETA) only the folds that train a network."""
        self.trained = set(trained_units)
        self.progress.reset(self.folds, total=len(trained_units) * n_splits, description="folds trained")

    def fold_started(self, arm, split, n_epochs) -> None:
        self.progress.update(self.folds, description=f"{arm} {split.name}")
        self.progress.reset(self.epochs, total=n_epochs, visible=True, description="  epoch")

    def epoch_done(self, stage, epoch, entry) -> None:
        self.progress.update(self.epochs, advance=1, description=f"  {stage} loss {entry['loss']:.3f}")

    def fold_done(self, arm, split, metrics, resumed) -> None:
        if self.trained is not None and arm not in self.trained:
            return  # baseline scores and the clinical model train nothing
        if resumed:  # not trained in this session: it counts, but leaves the ETA to the folds trained now
            self.progress.update(self.folds, total=next(t.total for t in self.progress.tasks if t.id == self.folds) - 1)
        else:
            self.progress.advance(self.folds)
        if resumed:
            self.progress.console.print(f"[dim]{arm} {split.name}: finished earlier, read back[/dim]")

    def message(self, text: str) -> None:
        """A line above the bars (the Ray executor: how many fits run at once, and where)."""
        self.progress.console.print(f"[dim]{escape(text)}[/dim]", highlight=False)


def _known_errors() -> tuple[type[BaseException], ...]:
    from stagewise.data import CohortError, ImageReadError
    from stagewise.evaluation.splits import SplitError
    from stagewise.models import BackboneError, WeightsUnavailable
    from stagewise.recipe import RecipeError
    from stagewise.checks import StudyCheckError
    from stagewise.federated.rounds import FederatedError
    from stagewise.training.engine import StageError
    from stagewise.external.options import EvaluateError

    return (RecipeError, CohortError, ImageReadError, BackboneError, WeightsUnavailable, StageError, SplitError, RunError,
            StudyCheckError, FederatedError, FloatingPointError, EvaluateError)


def metrics_table(metrics: dict) -> Table:
    table = Table(title=f"{metrics['recipe']}: {metrics['n_splits']} folds per arm, mean ± sd")
    table.add_column("arm")
    table.add_column("backbone")
    table.add_column("stages")
    columns = {"auroc": "AUROC", "balanced_accuracy": "balanced acc.", "f1": "F1",
               "sensitivity": "sens.", "specificity": "spec."}  # PPV, NPV, AUPRC, counts: report
    for m in columns.values():
        table.add_column(m, justify="right")
    for name, arm in metrics["arms"].items():
        s = arm["summary"]
        cells = [f"{s[k]['mean']:.3f} ± {s[k]['sd']:.3f}" if k in s else "-" for k in columns]
        table.add_row(name, arm["backbone"], " -> ".join(arm["stages"]), *cells)
    return table


def _run_recipe(recipe, out_dir: Path) -> None:
    from stagewise.study import run_study

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn()]
    try:
        if console.is_terminal:
            with Progress(*columns, console=console, transient=False) as progress:
                result = run_study(recipe, out_dir, RichReporter(progress))
        else:  # a pipe, a log file, a batch job: plain lines (fold done, metrics, ETA)
            result = run_study(recipe, out_dir, LineReporter())
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted.[/yellow] Finished folds are saved in {out_dir}; run the same command to resume.")
        raise typer.Exit(130)
    out.print(metrics_table(result.metrics))
    out.print(f"run directory: {result.run_dir}")
    if (result.run_dir / "report.html").is_file():
        out.print(f"report: {result.run_dir / 'report.html'}")


def _guard(fn, *args):
    try:
        return fn(*args)
    except _known_errors() as err:
        console.print(f"[bold red]error:[/bold red] {escape(str(err))}")
        raise typer.Exit(2)


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="the study's YAML recipe"),
    out_dir: Path = typer.Option(None, "--out", "-o", help="run directory (default: runs/<recipe name>)"),
    overrides: list[str] = typer.Option([], "--set", help="change a field: --set protocol.repeats=1 (repeatable)"),
    executor: str = typer.Option(None, "--executor", help="local (default: one process) or ray (a task per fit); "
                                 "sets compute.executor"),
    address: str = typer.Option(None, "--address", help="the Ray cluster to join: auto or HOST:PORT (implies "
                                "--executor ray; none starts Ray on this machine); sets compute.address"),
) -> None:
    """Run a study; running it again resumes and skips finished folds.

    Example: stagewise run recipe.yaml --executor ray --address auto
    """
    from stagewise.checks import missing_manifest_hint
    from stagewise.recipe import RecipeError, load_recipe

    def go():
        if executor not in (None, "local", "ray"):
            raise RecipeError(f"--executor {executor!r}: choose local or ray")
        if address is not None and executor == "local":
            raise RecipeError("--address is the Ray cluster to join: it goes with --executor ray, not local")
        extra = []
        if executor is not None or address is not None:
            extra.append(f"compute.executor={executor or 'ray'}")
        if address is not None or executor == "local":
            extra.append(f"compute.address={json.dumps(address)}")  # quoted: HOST:PORT stays a string
        r = load_recipe(recipe, [*overrides, *extra])
        hint = missing_manifest_hint(recipe, r.cohort.manifest)
        if hint:
            raise RunError(hint.replace("then validate again", "then run again"))
        _run_recipe(r, out_dir or Path("runs") / r.name)

    _guard(go)


@app.command()
def validate(
    recipe: Path = typer.Argument(..., help="the study's YAML recipe"),
    overrides: list[str] = typer.Option([], "--set", help="check the recipe as `run --set` would change it"),
) -> None:
    """Everything `run` checks before training, without training: the recipe, every manifest
    row, every image decoded, each arm's architecture and stages, source manifests, folds.

    Example: stagewise validate examples/covid-outcome.yaml --set protocol.repeats=1
    """
    from stagewise.checks import check_study, missing_manifest_hint
    from stagewise.recipe import load_recipe

    def go():
        r = load_recipe(recipe, overrides)
        hint = missing_manifest_hint(recipe, r.cohort.manifest)
        if hint:
            raise RunError(hint)
        cohort = check_study(r, source=str(recipe))
        for warning in cohort.warnings:
            console.print(f"[yellow]warning:[/yellow] {escape(warning)}")
        s = cohort.summary()
        out.print(f"{recipe}: valid. {len(r.arms)} arm(s); cohort of {s['images']} images from {s['patients']} patients, "
                  f"{s['positive_patients']} positive ({s['prevalence_patients']:.1%}).")

    _guard(go)


@app.command()
def demo(out_dir: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="run directory")) -> None:
    """An offline two-arm study on scikit-learn's digits (real scans), in about a minute or two.

    Example: stagewise demo --out runs/demo 2>&1 | tee demo.log
    """
    from stagewise.demo import demo_recipe, make_demo_cohort

    def go():
        manifest = make_demo_cohort(out_dir / "cohort")
        _run_recipe(demo_recipe(manifest), out_dir)

    _guard(go)


@app.command()
def report(run_dir: Path = typer.Argument(..., help="a finished run directory")) -> None:
    """Write RUN_DIR/report.html: one self-contained file that opens offline.

    Example: stagewise report runs/covid-outcome-icu
    """
    from stagewise.report.html import write_report

    def go():
        if not (run_dir / "metrics.json").is_file():
            raise RunError(f"{run_dir}: no metrics.json; run the study (stagewise run) to the end first")
        out.print(f"report: {write_report(run_dir)}")

    _guard(go)


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="a finished run directory"),
    arm: list[str] = typer.Option(..., "--arm", "-a", help="a model arm; repeat for arms sharing one frozen backbone"),
    fold: str = typer.Option(None, "--fold", help="a saved fold model, e.g. r0-f0 (needs compute.save_models)"),
    refit: bool = typer.Option(False, "--refit", help="train the arm on every image instead"),
    out_dir: Path = typer.Option(None, "--out", "-o", help="bundle folder (default: RUN_DIR/bundles/ARM)"),
) -> None:
    """Write a deployable bundle: safetensors + ONNX, preprocessing, threshold, model card.

    Example: stagewise export runs/covid-outcome-icu --arm probe-thaw --refit
    """
    from stagewise.deploy import export_bundle

    target = out_dir or run_dir / "bundles" / "+".join(arm)
    _guard(lambda: out.print(f"bundle: {export_bundle(run_dir, arm, target, fold, refit)}"))


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".nii", ".nii.gz")


def _image_files(paths: list[Path]) -> list[Path]:
    """Files as given; a folder stands for the image files in it (sorted, not recursive)."""
    files = []
    for p in paths:
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.is_file() and f.name.lower().endswith(IMAGE_SUFFIXES))
        else:
            files.append(p)
    return files


@app.command(name="predict")
def predict_cmd(
    bundle: Path = typer.Argument(..., help="a bundle folder made by `stagewise export`"),
    images: list[Path] = typer.Argument(..., help="PNG, JPEG, DICOM or NIfTI files, or folders of them"),
    engine: str = typer.Option("torch", help="torch or onnx"),
    csv: Path = typer.Option(None, help="also write the table to this CSV file"),
) -> None:
    """Per-image probability and decision, on the CPU. Files that cannot be scored are named
    with the reason, the others are scored, and the exit status is 1.

    Example: stagewise predict runs/covid-outcome-icu/bundles/probe-thaw scans/ --csv scores.csv
    """
    from stagewise.deploy import Bundle

    def go():
        files = _image_files(images)
        if not files:
            raise RunError(f"no image files in {', '.join(map(str, images))} (looked for {', '.join(IMAGE_SUFFIXES)})")
        loaded = Bundle.load(bundle)
        if loaded.intensity_notice:
            console.print(f"[yellow]note:[/yellow] {escape(loaded.intensity_notice)}")
        table = loaded.predict(files, engine=engine)
        scored = table[table["error"].isna()].drop(columns="error")
        view = Table(*scored.columns)
        for row in scored.itertuples(index=False):
            view.add_row(*[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row])
        out.print(view)
        if csv:
            table.to_csv(csv, index=False)
        failed = table[table["error"].notna()]
        for file, reason in zip(failed["image"], failed["error"]):
            console.print(f"[bold red]not scored:[/bold red] {escape(file)}: {escape(reason)}")
        return len(failed)

    if _guard(go):
        raise typer.Exit(1)


@app.command()
def evaluate(
    bundle: Path = typer.Argument(..., help="a bundle folder made by `stagewise export`"),
    manifest: Path = typer.Argument(..., help="the external cohort: a CSV manifest, one row per image, with outcome and patient"),
    out_dir: Path = typer.Option(None, "--out", "-o", help="output folder (default: evaluations/<manifest name>)"),
    image: str = typer.Option(None, help="image path column (default: the bundle recipe's)"),
    outcome: str = typer.Option(None, help="outcome column (default: the outcome the bundle predicts)"),
    patient: str = typer.Option(None, help="patient id column (default: the bundle recipe's)"),
    site: str = typer.Option(None, help="site column, for per-site figures (default: the bundle recipe's, if present)"),
    positive: list[str] = typer.Option([], "--positive", help="an outcome value read as positive (repeatable)"),
    negative: list[str] = typer.Option([], "--negative", help="an outcome value read as negative (repeatable)"),
    root: Path = typer.Option(None, help="folder relative image paths start from (default: the manifest's)"),
    drop_missing_outcome: bool = typer.Option(False, "--drop-missing-outcome", help="leave out rows without an outcome"),
    output: str = typer.Option(None, help="which bundle output to validate (default: the first)"),
    images: str = typer.Option(None, "--images", help="first or all: images scored per patient (default: the bundle's protocol)"),
    aggregate: str = typer.Option(None, help="mean, max or first: image scores -> patient score (default: the bundle's)"),
    recalibrate: str = typer.Option(None, help="intercept or slope: fit a logistic recalibration on part of the cohort, "
                                    "evaluate it on the rest, save a recalibrated bundle"),
    fit_fraction: float = typer.Option(0.5, "--fit-fraction", help="share of patients the recalibration is fitted on"),
    seed: int = typer.Option(0, help="seed of the bootstrap and of the recalibration split"),
    bootstrap: int = typer.Option(2000, help="bootstrap resamples of patients for the 95 % CIs (0: none)"),
    engine: str = typer.Option("torch", help="torch or onnx"),
) -> None:
    """External validation: the bundle on another site's labelled cohort, against its own
    cross-validated figures; an HTML report with the TRIPOD+AI items, per-image and
    per-patient predictions, optional recalibration.

    Example: stagewise evaluate bundles/probe site-b.csv --outcome icu --positive yes --negative no -o eval-site-b
    """
    from stagewise.external import ExternalOptions, evaluate_bundle

    def go():
        options = ExternalOptions(image=image, outcome=outcome, patient=patient, site=site, positive=positive,
                                  negative=negative, root=root, drop_missing_outcome=drop_missing_outcome, output=output,
                                  test_images=images, aggregate=aggregate, recalibrate=recalibrate,
                                  fit_fraction=fit_fraction, seed=seed, bootstrap=bootstrap)
        target = out_dir or Path("evaluations") / manifest.stem
        res = evaluate_bundle(bundle, manifest, target, options, engine)
        if res["bundle"].get("intensity_notice"):
            out.print(f"[yellow]note:[/yellow] {escape(res['bundle']['intensity_notice'])}")
        table = Table("metric", "development (CV, pooled)", "external [95 % CI]", "Δ")
        for r in res["comparison"]:
            e, dev = r["external"], r["reference"]
            ci = f" [{e['low']:.3f}, {e['high']:.3f}]" if e.get("low") is not None and e.get("high") is not None else ""
            table.add_row(r["metric"], "—" if dev is None else f"{dev:.3f}",
                          "—" if e.get("point") is None else f"{e['point']:.3f}{ci}",
                          "—" if r["difference"] is None else f"{r['difference']:+.3f}")
        out.print(table)
        if "recalibration" in res:
            rec = res["recalibration"]
            out.print(f"recalibrated ({rec['method']}): intercept {rec['intercept']:.3f}, slope {rec['slope']:.3f}; "
                      f"held-out calibration-in-the-large {rec['before']['calibration']['intercept']:.3f} -> "
                      f"{rec['after']['calibration']['intercept']:.3f}; bundle: {target / 'bundle-recalibrated'}")
        out.print(f"report: {target / 'report.html'}")

    _guard(go)


@app.command()
def serve(
    bundle: Path = typer.Argument(..., help="a bundle folder made by `stagewise export`"),
    host: str = typer.Option("127.0.0.1", help="address to listen on; the default is reachable from this computer only"),
    port: int = typer.Option(8000, help="port to listen on"),
    max_upload_mb: float = typer.Option(64.0, "--max-upload-mb", help="largest file accepted, in MB (2^20 bytes)"),
    engine: str = typer.Option("auto", help="auto (ONNX Runtime when the bundle has model.onnx), onnx or torch"),
    concurrency: int = typer.Option(2, help="files scored at the same time; more requests wait their turn"),
) -> None:
    """A local web page and HTTP API that score images with a bundle, show what the network
    saw and where it looked. Uploads stay in memory; nothing is stored.

    Example: stagewise serve runs/covid-outcome-icu/bundles/probe-thaw  (then open http://127.0.0.1:8000)
    """
    from stagewise.serve import run_server

    _guard(run_server, bundle, host, port, max_upload_mb, engine, concurrency)


@app.command()
def backbones() -> None:
    """List the backbone sources a recipe can name (every source in the registry).

    Example: stagewise backbones
    """
    from stagewise.models import describe_sources

    table = Table("spec", "what it is")
    for spec, what in describe_sources():
        table.add_row(escape(spec), escape(what))  # '[#<arm>]' is text, not a style
    out.print(table)

federation = typer.Typer(no_args_is_help=True, help="Federated training across hospitals that keep their images: "
                         "keys, the coordinator, a hospital's site.")
app.add_typer(federation, name="federation")


@federation.command("certs")
def federation_certs(
    folder: Path = typer.Argument(..., help="where ca.pem, server.pem and server.key are written"),
    host: list[str] = typer.Option(..., "--host", help="a name or IP address the hospitals connect to (repeatable)"),
) -> None:
    """The coordinator's TLS certificates: give ca.pem to every hospital; server.key stays here.

    Example: stagewise federation certs certs --host fl.hospital-a.example --host 10.1.2.3
    """
    from stagewise.federated.credentials import make_certificates

    def go():
        paths = make_certificates(folder, host)
        out.print(f"CA certificate (send to every site): {paths['ca']}\nserver certificate and key (keep): "
                  f"{paths['cert']}, {paths['key']}")

    _guard_files(go)


@federation.command("key")
def federation_key(
    folder: Path = typer.Argument(..., help="where <site>.key and <site>.pub are written"),
    site: str = typer.Option(..., "--site", help="this hospital's site name (letters, digits, _ . -)"),
) -> None:
    """A hospital's node key: <site>.key stays at the hospital, <site>.pub goes to the coordinator.

    Example: stagewise federation key keys --site hannover
    """
    from stagewise.federated.credentials import make_site_key

    def go():
        paths = make_site_key(folder, site)
        out.print(f"private key (keep): {paths['key']}\npublic key (send to the coordinator): {paths['pub']}")

    _guard_files(go)


def _stop_on_sigterm() -> None:
    """SIGTERM (a service manager, `kill`) stops like Ctrl-C, so Flower's processes are stopped too."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def _guard_files(fn):
    try:
        return _guard(fn)
    except (FileExistsError, ValueError) as err:
        console.print(f"[bold red]error:[/bold red] {escape(str(err))}")
        raise typer.Exit(2)


@federation.command("coordinate")
def federation_coordinate(
    recipe: Path = typer.Argument(..., help="the recipe every site holds a copy of"),
    arm: str = typer.Option(..., "--arm", help="the federated arm to run"),
    site_key: list[Path] = typer.Option(..., "--site-key", help="a hospital's public key, <site>.pub (repeatable): "
                                        "only these nodes may join"),
    certs: Path = typer.Option(..., "--certs", help="folder with ca.pem, server.pem, server.key (federation certs)"),
    out_dir: Path = typer.Option(None, "--out", "-o", help="run directory (default: runs/<recipe name>-<arm>)"),
    host: str = typer.Option("0.0.0.0", help="address to listen on"),
    port: int = typer.Option(9093, help="port the hospitals connect to"),
    sites: int = typer.Option(None, help="sites expected (default: one per --site-key)"),
    cv: bool = typer.Option(True, "--cv/--no-cv", help="cross-validate on each site's own folds"),
    final: bool = typer.Option(True, "--final/--no-final", help="then train the model to deploy on every row"),
    connect_timeout: float = typer.Option(600.0, help="seconds to wait for the sites to connect and answer their first message (their app starting)"),
    timeout: float = typer.Option(7 * 24 * 3600.0, help="seconds to wait for the job"),
) -> None:
    """Run a federated job as the coordinating site: a Flower SuperLink with TLS that admits the
    listed sites only; each hospital joins with `stagewise federation site`. Stopped, it
    continues from the last finished round when run again with the same -o.

    Example: stagewise federation coordinate fed.yaml --arm fedavg --certs certs --site-key a.pub --site-key b.pub
    """
    from stagewise.federated.deployment import JobDir
    from stagewise.federated.launch import Coordinator

    def go():
        from stagewise.recipe import load_recipe

        _stop_on_sigterm()
        target = out_dir or Path("runs") / f"{load_recipe(recipe).name}-{arm}"
        JobDir(target).write_job(recipe, arm, sites or len(site_key), cv, final, connect_timeout)
        coordinator = Coordinator(target, certs, host=host, port=port, site_keys=list(site_key))
        try:
            coordinator.start()
            out.print(f"coordinator listening on {coordinator.address}; waiting for {sites or len(site_key)} sites")
            status = coordinator.wait(coordinator.submit(), timeout)
        except KeyboardInterrupt:
            console.print(f"[yellow]interrupted.[/yellow] Finished rounds are saved in {target}; run the same command "
                          "to continue.")
            raise typer.Exit(130)
        finally:
            coordinator.stop()
        if status["state"] != "finished":
            console.print(f"[bold red]the job failed:[/bold red] {escape(status.get('error', '?'))}")
            raise typer.Exit(2)
        _print_job(target)

    _guard(go)


def _print_job(run_dir: Path) -> None:
    res = json.loads((run_dir / "results.json").read_text())
    table = Table(title=f"{res['arm']} ({res['strategy']}): per site, mean ± sd over folds")
    for c in ("site", "AUROC", "balanced acc.", "sens.", "spec.", "test patients"):
        table.add_column(c, justify="left" if c == "site" else "right")
    fmt = lambda m: "-" if m.get("mean") is None else f"{m['mean']:.3f} ± {m['sd'] or 0:.3f}"  # noqa: E731
    for site, m in res["sites"].items():
        table.add_row(site, fmt(m["auroc"]), fmt(m["balanced_accuracy"]), fmt(m["sensitivity"]),
                      fmt(m["specificity"]), str(m["n_test_patients"]))
    out.print(table)
    out.print(f"AUROC across sites: {fmt(res['auroc_across_sites'])}; sent {res['bytes_total'] / 1e6:.1f} MB "
              f"(full-model FedAvg: {res['bytes_full_model_fedavg'] / 1e6:.1f} MB)")
    for r in res["rounds_with_missing_sites"]:
        out.print(f"[yellow]fit {r['fit']} round {r['round']}: {r['sites_replied']} sites replied[/yellow]")
    if res.get("model"):
        out.print(f"model: {run_dir / res['model']}")


@federation.command("site")
def federation_site(
    recipe: Path = typer.Argument(..., help="this hospital's copy of the coordinator's recipe"),
    manifest: Path = typer.Option(..., "--manifest", help="this hospital's own manifest (it never leaves)"),
    site: str = typer.Option(..., "--site", help="this hospital's site name"),
    server: str = typer.Option(..., "--server", help="the coordinator's HOST:PORT"),
    ca: Path = typer.Option(..., "--ca", help="the coordinator's ca.pem"),
    key: Path = typer.Option(..., "--key", help="this hospital's private key, <site>.key (federation key)"),
    workdir: Path = typer.Option(Path("federation-site"), "--workdir", help="this hospital's folder: its state "
                                 "between rounds, its predictions, logs"),
    threads: int = typer.Option(None, help="torch threads (default: all cores)"),
    port: int = typer.Option(9094, help="local port of the SuperNode's own API"),
    wait: float = typer.Option(3600.0, help="seconds to keep trying while the coordinator is not reachable or has "
                               "not admitted this site's key yet"),
) -> None:
    """Take part in a federated job as one hospital: checks the manifest, then a Flower
    SuperNode trains on this hospital's rows only and sends only the trainable groups' tensors.

    Example: stagewise federation site fed.yaml --manifest ours.csv --site hannover --server fl.example:9093 --ca ca.pem --key hannover.key
    """
    import os

    from stagewise.federated.launch import prepare_site, run_site

    def go():
        _stop_on_sigterm()
        site_file = prepare_site(recipe, manifest, site, workdir, threads or os.cpu_count() or 1)
        out.print(f"{site}: manifest checked; connecting to {server} (Ctrl-C to leave)")
        note = lambda s: out.print(f"{site}: coordinator not reachable, or this site not admitted yet "  # noqa: E731
                                   f"({s:.0f} s); trying again")
        try:
            code = run_site(site_file, server, ca, key, port, workdir / "supernode.log", wait, on_retry=note)
        except KeyboardInterrupt:
            code = 130
        if code not in (0, 130, -15):
            console.print(f"[bold red]the site stopped (exit {code}):[/bold red] see {workdir / 'supernode.log'}")
            raise typer.Exit(2)

    _guard(go)


def main() -> None:
    app()
