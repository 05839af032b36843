"""The `federation` sub-app: `certs`, `key` and `linkage-key` (the credentials), `coordinate` (the
coordinating site's Flower SuperLink), `export` (a bundle of a finished job's final global
model) and `site` (a hospital's SuperNode).

The module is not named `federation`: `stagewise.cli.federation` is this typer sub-app."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from stagewise.cli.console import console, guard, out

federation = typer.Typer(no_args_is_help=True, help="Federated training across hospitals that keep their images: "
                         "keys, the coordinator, a bundle of its model, a hospital's site.")


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


@federation.command("linkage-key")
def federation_linkage_key(
    out_file: Path = typer.Option(..., "--out", "-o", help="the key file to write (never replaced)"),
) -> None:
    """A linkage key the hospitals share, and never give the coordinator: with it (`federation
    site --linkage-key`) the coordinator counts patients present at more than one hospital
    from keyed hashes of their ids, without learning who they are.

    Example: stagewise federation linkage-key -o linkage.key
    """
    from stagewise.federated.linkage import write_linkage_key

    def go():
        path = write_linkage_key(out_file)
        out.print(f"linkage key: {path} (copy it to every hospital through your own channel; never to the coordinator)")

    _guard_files(go)


def _stop_on_sigterm() -> None:
    """SIGTERM (a service manager, `kill`) stops like Ctrl-C, so Flower's processes are stopped too."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def _guard_files(fn):
    try:
        return guard(fn)
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
    host: str = typer.Option("127.0.0.1", help="address the hospitals' API listens on; the default, 127.0.0.1, is "
                             "reachable from this computer only: give the address the hospitals connect to "
                             "(or 0.0.0.0 for every interface) to let them in"),
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

    Example: stagewise federation coordinate fed.yaml --arm fedavg --certs certs --site-key a.pub --site-key b.pub --host 0.0.0.0
    """
    from stagewise.federated.job_dir import JobDir
    from stagewise.federated.launch import Coordinator
    from stagewise.hosts import is_loopback

    def go():
        from stagewise.recipe import load_recipe

        _stop_on_sigterm()
        target = out_dir or Path("runs") / f"{load_recipe(recipe).name}-{arm}"
        JobDir(target).write_job(recipe, arm, sites or len(site_key), cv, final, connect_timeout)
        coordinator = Coordinator(target, certs, host=host, port=port, site_keys=list(site_key))
        try:
            coordinator.start()
            reach = (" (this computer only: hospitals elsewhere cannot connect; give --host the address they use)"
                     if is_loopback(host) else "")
            out.print(f"coordinator listening on {coordinator.address}{reach}; waiting for {sites or len(site_key)} "
                      "sites")
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

    guard(go)


def _print_job(run_dir: Path) -> None:
    from stagewise.federated.linkage import linkage_line

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
    if linkage := res.get("patient_linkage"):
        out.print(linkage_line(linkage))
    if res.get("model"):
        out.print(f"model: {run_dir / res['model']}")


@federation.command("export")
def federation_export(
    job_dir: Path = typer.Argument(..., help="the coordinator's run directory (the -o of `federation coordinate`)"),
    out_dir: Path = typer.Option(None, "--out", "-o", help="bundle folder (default: JOB_DIR/bundles/ARM)"),
    threshold: float = typer.Option(None, "--threshold", help="the decision threshold (a probability); needed "
                                    "unless the recipe fixes one (protocol.threshold): the coordinator holds no "
                                    "out-of-fold scores to choose one on"),
) -> None:
    """Bundle a finished job's final global model, as `stagewise export` bundles a study's arm.

    Example: stagewise federation export runs/fed-fedavg --threshold 0.4 -o fedavg-bundle
    """
    from stagewise.bundle.federation import export_federation_bundle
    from stagewise.federated.job_dir import JobDir

    def go():
        target = out_dir
        if target is None:
            arm = JobDir(job_dir).spec()["arm"] if (job_dir / "job.json").is_file() else "model"
            target = job_dir / "bundles" / arm
        out.print(f"bundle: {export_federation_bundle(job_dir, target, threshold)}")

    guard(go)


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
    linkage_key: Path = typer.Option(None, "--linkage-key", help="the hospitals' shared linkage key (federation "
                                     "linkage-key): lets the coordinator count patients seen at several hospitals"),
    check: bool = typer.Option(False, "--check", help="check this site's files, manifest, the connection and TLS to "
                               "the coordinator, then stop without joining a job"),
) -> None:
    """Take part in a federated job as one hospital: checks the manifest, then a Flower
    SuperNode trains on this hospital's rows only and sends only the trainable groups' tensors.

    Example: stagewise federation site fed.yaml --manifest ours.csv --site hannover --server fl.example:9093 --ca ca.pem --key hannover.key

    With --check, a dry run: the same checks, then a connection to the coordinator that proves
    the network path and TLS; no job is joined.
    """
    import os

    from stagewise.federated.launch import prepare_site, run_site, site_credentials
    from stagewise.federated.site_process import REFUSED_EXIT, REFUSED_LINE

    def go():
        _stop_on_sigterm()
        site_ca, site_key = site_credentials(ca, key)  # before the manifest check, which takes a while
        site_file = prepare_site(recipe, manifest, site, workdir, threads or os.cpu_count() or 1, linkage_key)
        if check:
            from stagewise.federated.connection_check import check_connection

            lines = [f"manifest: {manifest.name} checked against the recipe (rows, columns, every image)",
                     *check_connection(server, site_ca, site_key)]
            for line in lines:
                out.print(f"{site}: ok: {escape(line)}")
            out.print(f"{site}: ready; run the same command without --check to take part")
            return
        out.print(f"{site}: manifest checked; connecting to {server} (Ctrl-C to leave)")
        note = lambda s: out.print(f"{site}: coordinator not reachable, or this site not admitted yet "  # noqa: E731
                                   f"({s:.0f} s); trying again")
        try:
            code = run_site(site_file, server, site_ca, site_key, port, workdir / "supernode.log", wait, on_retry=note)
        except KeyboardInterrupt:
            code = 130
        if code == REFUSED_EXIT:
            log = (workdir / "supernode.log").read_text(errors="replace")
            reason = log[log.rindex(REFUSED_LINE) + len(REFUSED_LINE):].splitlines()[0]
            console.print(f"[bold red]{escape(reason)}[/bold red]")
            raise typer.Exit(2)
        if code not in (0, 130, -15):
            console.print(f"[bold red]the site stopped (exit {code}):[/bold red] see {workdir / 'supernode.log'}")
            raise typer.Exit(2)

    guard(go)
