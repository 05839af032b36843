"""`federation evaluate` (the coordinator, or the whole evaluation on this machine with
`--simulate`) and `federation evaluate-site` (a hospital): one bundle validated at several
hospitals at once, each scoring its own labelled manifest; only aggregates leave a site."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from stagewise.cli.console import console, guard, out
from stagewise.cli.federation_app import federation


def _num(v, digits: int = 3) -> str:
    return "-" if v is None or v != v else f"{v:.{digits}f}"


def print_results(results: dict, folder: Path) -> None:
    """Per site and pooled, as results.json holds them."""
    table = Table(title="federated evaluation: each site's figures, computed at the site")
    for c in ("site", "patients", "positive", "AUROC [95 % CI]", "sens.", "spec.", "mean predicted", "observed"):
        table.add_column(c, justify="left" if c == "site" else "right")
    for name, s in results["sites"].items():
        f = s["figures"]
        table.add_row(escape(name), str(f["n_patients"]), str(f["n_positive"]),
                      f"{_num(f['auroc'])} [{_num(f['auroc_low'])}, {_num(f['auroc_high'])}]", _num(f["sensitivity"]),
                      _num(f["specificity"]), _num(f["mean_predicted"]), _num(f["observed_rate"]))
    out.print(table)
    p = results["pooled"]
    a, t, c = p["auroc_binned"], p["at_threshold"], p["calibration_in_the_large"]
    out.print(f"pooled ({p['n_patients']} patients at {len(p['sites'])} sites): AUROC {_num(a['point'])} (from the summed "
              f"histograms; the unbinned AUROC lies in [{_num(a['lower'], 4)}, {_num(a['upper'], 4)}]), sensitivity "
              f"{_num(t['sensitivity']['point'])}, specificity {_num(t['specificity']['point'])} at the bundle's "
              f"threshold; mean predicted {_num(c['mean_predicted'])} vs observed {_num(c['observed_rate'])}")
    for site, why in results["failed_sites"].items():
        console.print(f"[yellow]{escape(site)}: {escape(why)}[/yellow]")
    out.print(f"results: {folder / 'results.json'}; report: {folder / 'report.html'}")


def _refuse(text: str) -> None:
    console.print(f"[bold red]error:[/bold red] {escape(text)}")
    raise typer.Exit(2)


@federation.command("evaluate")
def federation_evaluate(
    bundle: Path = typer.Argument(..., help="the bundle every site holds a copy of (stagewise export)"),
    site_key: list[Path] = typer.Option([], "--site-key", help="a hospital's public key, <site>.pub (repeatable): "
                                        "only these nodes may answer"),
    certs: Path = typer.Option(None, "--certs", help="folder with ca.pem, server.pem, server.key (federation certs)"),
    simulate: list[str] = typer.Option([], "--simulate", help="SITE=MANIFEST (repeatable): run the whole evaluation "
                                       "on this machine in Flower's simulation engine, one site per manifest"),
    out_dir: Path = typer.Option(None, "--out", "-o", help="output folder (default: evaluations/federated-<bundle name>)"),
    host: str = typer.Option("127.0.0.1", help="address the hospitals' API listens on (default: this computer only)"),
    port: int = typer.Option(9093, help="port the hospitals connect to"),
    sites: int = typer.Option(None, help="sites expected (default: one per --site-key or --simulate)"),
    bins: int = typer.Option(100, help="equal-width score bins on [0, 1] of the sites' histograms (edges are added at "
                             "the quantiles of the bundle's development scores)"),
    bootstrap: int = typer.Option(2000, help="patient bootstrap resamples of each site's CIs (0: none)"),
    seed: int = typer.Option(0, help="seed of the sites' bootstrap"),
    connect_timeout: float = typer.Option(600.0, help="seconds to wait for the sites to connect"),
    timeout: float = typer.Option(3600.0, help="seconds to wait for the sites' answers"),
) -> None:
    """Validate one bundle at several hospitals at once: each scores its own labelled manifest
    (`stagewise federation evaluate-site`) and sends only aggregates; this writes per-site and
    pooled figures (AUROC from summed score histograms, with its binning bound).

    Example: stagewise federation evaluate bundles/probe --certs certs --site-key a.pub --site-key b.pub --host 0.0.0.0
    """
    from stagewise.external.federated_evaluation import coordinate_evaluation, evaluate_across_sites, plan_evaluation

    def go():
        target = out_dir or Path("evaluations") / f"federated-{bundle.name}"
        if simulate:
            pairs = [s.partition("=") for s in simulate]
            if any(not name or not manifest for name, _, manifest in pairs):
                _refuse("give --simulate as SITE=MANIFEST, e.g. --simulate hannover=hannover.csv")
            results = evaluate_across_sites(bundle, {name: Path(m) for name, _, m in pairs}, target, bins=bins,
                                            bootstrap=bootstrap, seed=seed)
        else:
            if not site_key or certs is None:
                _refuse("give --certs and a --site-key per hospital, or --simulate SITE=MANIFEST per site to run it "
                        "on this machine")
            folder = plan_evaluation(bundle, target, sites or len(site_key), bins, bootstrap, seed, connect_timeout,
                                     timeout)
            note = lambda c: out.print(f"coordinator listening on {c.address}; waiting for "  # noqa: E731
                                       f"{sites or len(site_key)} sites")
            try:
                results = coordinate_evaluation(folder, certs, list(site_key), host, port, on_started=note)
            except KeyboardInterrupt:
                raise typer.Exit(130)
        print_results(results, target)

    guard(go)


@federation.command("evaluate-site")
def federation_evaluate_site(
    bundle: Path = typer.Argument(..., help="this hospital's copy of the coordinator's bundle"),
    manifest: Path = typer.Option(..., "--manifest", help="this hospital's labelled manifest (it never leaves)"),
    site: str = typer.Option(..., "--site", help="this hospital's site name"),
    server: str = typer.Option(..., "--server", help="the coordinator's HOST:PORT"),
    ca: Path = typer.Option(..., "--ca", help="the coordinator's ca.pem"),
    key: Path = typer.Option(..., "--key", help="this hospital's private key, <site>.key (federation key)"),
    workdir: Path = typer.Option(Path("federation-evaluation"), "--workdir", help="this hospital's folder (logs)"),
    image: str = typer.Option(None, help="image path column (default: the bundle recipe's)"),
    outcome: str = typer.Option(None, help="outcome column (default: the outcome the bundle predicts)"),
    patient: str = typer.Option(None, help="patient id column (default: the bundle recipe's)"),
    positive: list[str] = typer.Option([], "--positive", help="an outcome value read as positive (repeatable)"),
    negative: list[str] = typer.Option([], "--negative", help="an outcome value read as negative (repeatable)"),
    root: Path = typer.Option(None, help="folder relative image paths start from (default: the manifest's)"),
    drop_missing_outcome: bool = typer.Option(False, "--drop-missing-outcome", help="leave out rows without an outcome"),
    port: int = typer.Option(9095, help="local port of the SuperNode's own API"),
    wait: float = typer.Option(3600.0, help="seconds to keep trying while the coordinator is not reachable"),
) -> None:
    """Take part in a federated evaluation as one hospital: checks the manifest (every problem
    by CSV line), then scores it with the bundle here and sends only aggregates.

    Example: stagewise federation evaluate-site bundle --manifest ours.csv --site hannover --server fl.example:9093 --ca ca.pem --key hannover.key
    """
    from stagewise.external import ExternalOptions
    from stagewise.external.federated_evaluation import prepare_site, run_evaluation_site
    from stagewise.federated.launch import site_credentials

    def go():
        site_ca, site_key = site_credentials(ca, key)
        options = ExternalOptions(image=image, outcome=outcome, patient=patient, positive=positive, negative=negative,
                                  root=root, drop_missing_outcome=drop_missing_outcome)
        site_file = prepare_site(bundle, manifest, site, workdir, options)
        out.print(f"{site}: manifest checked; connecting to {server} (Ctrl-C to leave)")
        try:
            code = run_evaluation_site(site_file, server, site_ca, site_key, port, workdir / "supernode.log", wait)
        except KeyboardInterrupt:
            code = 130
        if code not in (0, 130, -15):
            console.print(f"[bold red]the site stopped (exit {code}):[/bold red] see {workdir / 'supernode.log'}")
            raise typer.Exit(2)

    guard(go)


__all__ = ["federation_evaluate", "federation_evaluate_site", "print_results"]
