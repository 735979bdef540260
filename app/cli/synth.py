"""`radcohort synth` (synthetic radiographs) and `radcohort seed` (push them into a PACS)."""

from __future__ import annotations

from pathlib import Path

import typer


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())


def _syntaxes(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _run_synth(out: Path, per_class: int, seed: int, taxonomy: str, header_error_rate: float, size: str,
               workers: int | None, syntaxes: str | None = None):
    from app.synth.generate import check_options, generate

    check_options(taxonomy, size, _syntaxes(syntaxes), header_error_rate)
    with _progress() as bar:
        task = bar.add_task(f"rendering {taxonomy}", total=None)
        summary = generate(out, per_class, seed=seed, taxonomy=taxonomy, header_error_rate=header_error_rate,
                           size=size, workers=workers, syntaxes=_syntaxes(syntaxes),
                           progress=lambda d, n: bar.update(task, completed=d, total=n))
    typer.echo(f"{summary.count} images in {summary.seconds:.1f} s ({summary.images_per_second:.1f} img/s, "
               f"{summary.workers} workers) -> {out}/dicom, truth in {out}/truth.csv")
    typer.echo("per class: " + ", ".join(f"{k}={v}" for k, v in sorted(summary.per_class.items())))
    typer.echo("transfer syntaxes: " + ", ".join(f"{k}={v}" for k, v in sorted(summary.per_syntax.items())))
    if summary.header_errors:
        typer.echo("header errors: " + ", ".join(f"{k}={v}" for k, v in sorted(summary.header_errors.items())))
    return summary


def _node_address(name: str) -> tuple[str, int, str]:
    """(host, port, AE title) of a PACS node registered in the database."""
    from sqlalchemy import select
    from sqlalchemy.exc import SQLAlchemyError

    from app.config import get_settings
    from app.context import AppContext
    from app.db.models import PacsNode

    ctx = AppContext.build(get_settings())
    try:
        with ctx.sessions() as s:
            node = s.scalar(select(PacsNode).where(PacsNode.name == name))
    except SQLAlchemyError as exc:
        raise typer.BadParameter(f"cannot read PACS nodes ({exc.__class__.__name__}); run `radcohort db upgrade`",
                                 param_hint="--node") from exc
    finally:
        ctx.close()
    if node is None:
        raise typer.BadParameter(f"no PACS node named {name!r} (add one with the API or CLI)", param_hint="--node")
    return node.host, node.port, node.ae_title


def register(cli: typer.Typer) -> None:
    @cli.command("synth")
    def synth(
        per_class: int = typer.Option(..., "--per-class", min=1, help="images per class"),
        out: Path = typer.Option(..., "--out", help="output directory (dicom/ and truth.csv)"),
        seed: int = typer.Option(0, "--seed", help="same seed, same files"),
        taxonomy: str = typer.Option("xr10", "--taxonomy", help="xr10 or xr5"),
        header_error_rate: float = typer.Option(0.0, "--header-error-rate", min=0.0, max=1.0,
                                                help="fraction of wrong or missing header labels"),
        size: str = typer.Option("full", "--size", help="full (vendor detector), small (1/8), scale:F or WxH"),
        workers: int | None = typer.Option(None, "--workers", min=1, help="processes (default: all cores)"),
        syntaxes: str | None = typer.Option(None, "--syntaxes",
                                            help="comma list of explicit,j2k,jpegls,jpeg_sv1,rle (default: vendor mix)"),
    ) -> None:
        """Render synthetic radiographs with messy headers; the true class of each goes to truth.csv."""
        try:
            _run_synth(out, per_class, seed, taxonomy, header_error_rate, size, workers, syntaxes)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from exc

    @cli.command("seed")
    def seed_pacs(
        directory: Path | None = typer.Argument(None, help="files to push (a synth output directory)"),
        node: str | None = typer.Option(None, "--node", help="PACS node name from the database"),
        host: str | None = typer.Option(None, "--host"),
        port: int | None = typer.Option(None, "--port", min=1, max=65535),
        aet: str | None = typer.Option(None, "--aet", help="called AE title of the PACS"),
        calling_aet: str | None = typer.Option(None, "--calling-aet", help="our AE title (default: settings)"),
        associations: int = typer.Option(4, "--associations", min=1, max=32, help="parallel associations"),
        synth: bool = typer.Option(False, "--synth", help="generate into DIRECTORY first (synth options below)"),
        per_class: int = typer.Option(20, "--per-class", min=1),
        seed: int = typer.Option(0, "--seed"),
        taxonomy: str = typer.Option("xr10", "--taxonomy"),
        header_error_rate: float = typer.Option(0.0, "--header-error-rate", min=0.0, max=1.0),
        size: str = typer.Option("full", "--size"),
        syntaxes: str | None = typer.Option(None, "--syntaxes", help="with --synth: transfer syntaxes to use"),
        timeout: float = typer.Option(30.0, "--timeout", min=1.0, help="DICOM timeouts in seconds"),
    ) -> None:
        """C-STORE files into a PACS over several associations; exits 1 unless every file was stored."""
        from app.config import get_settings
        from app.dicom.push import dicom_files, push

        if node:
            if host or port or aet:
                raise typer.BadParameter("give --node or --host/--port/--aet, not both")
            host, port, aet = _node_address(node)
        elif not (host and port and aet):
            raise typer.BadParameter("give --node NAME, or --host, --port and --aet")
        if directory is None:
            if not synth:
                raise typer.BadParameter("DIRECTORY is required (or --synth to generate one)")
            directory = get_settings().data_dir / "synth" / f"{taxonomy}-seed{seed}"
        if synth:
            try:
                _run_synth(directory, per_class, seed, taxonomy, header_error_rate, size, None, syntaxes)
            except ValueError as exc:
                raise typer.BadParameter(str(exc)) from exc
        if not directory.exists():
            raise typer.BadParameter(f"{directory} does not exist")
        src = directory / "dicom" if (directory / "dicom").is_dir() else directory
        files = dicom_files(src)
        with _progress() as bar:
            task = bar.add_task(f"C-STORE -> {aet}@{host}:{port}", total=len(files))
            result = push(files, host, int(port), aet, calling_aet or get_settings().ae_title,
                          associations=associations, timeout=timeout,
                          progress=lambda d, n: bar.update(task, completed=d, total=n))
        typer.echo(result.summary())
        for path, why in result.failed[:20]:
            typer.echo(f"  failed {path}: {why}", err=True)
        if len(result.failed) > 20:
            typer.echo(f"  ... and {len(result.failed) - 20} more failures", err=True)
        for path, why in result.skipped[:5]:
            typer.echo(f"  skipped {path}: {why}", err=True)
        if not result.ok:
            raise typer.Exit(1)
