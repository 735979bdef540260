"""`radcohort demo`: a synthetic PACS, radcohort's processes, and the whole flow over the REST API."""

from __future__ import annotations

from pathlib import Path

import typer


def register(cli: typer.Typer) -> None:
    @cli.command("demo")
    def demo(
        per_class: int = typer.Option(60, "--per-class", min=2, help="synthetic images per class"),
        synth_size: str = typer.Option("small", "--synth-size",
                                       help="synthetic image size: small (1/8 detector), full, scale:F or WxH"),
        epochs: int = typer.Option(None, "--epochs", min=1, help="training epochs (default: 40 on CPU, 30 on CUDA)"),
        image_size: int = typer.Option(None, "--image-size", min=16,
                                       help="input height in px (default: 96 on CPU, 256 on CUDA)"),
        model: str = typer.Option(None, "--model", help="timm model (default: resnet10t on CPU, resnet18 on CUDA)"),
        batch_size: int = typer.Option(None, "--batch-size", min=1),
        lr: float = typer.Option(None, "--lr", min=0.0, help="learning rate (default: 0.003 on CPU, the worker's on CUDA)"),
        experiments: str = typer.Option(None, "--experiments",
                                        help="comma-separated: rotate90,scale10 (default: none on CPU, both on CUDA)"),
        device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
        retrieve_method: str = typer.Option("move", "--retrieve-method", help="move (C-MOVE) or get (C-GET)"),
        header_error_rate: float = typer.Option(0.05, "--header-error-rate", min=0.0, max=1.0),
        seed: int = typer.Option(0, "--seed"),
        demo_dir: Path = typer.Option(Path(".demo"), "--dir", help="demo data (kept and reused between runs)"),
        fresh: bool = typer.Option(False, "--fresh", help="forget radcohort's DB and store (keeps the PACS)"),
        keep_running: bool = typer.Option(False, "--keep-running", help="leave the services up until Ctrl-C"),
    ) -> None:
        """Generate and seed a synthetic 10-class PACS, then retrieve, build xr10, train and report over REST."""
        from app.demo.processes import DemoError
        from app.demo.flow import FlowError
        from app.demo.runner import DemoOptions, run_demo

        opts = DemoOptions(
            demo_dir=demo_dir, per_class=per_class, epochs=epochs, image_size=image_size, model=model,
            batch_size=batch_size, lr=lr, device=device, retrieve_method=retrieve_method,
            header_error_rate=header_error_rate, synth_size=synth_size, seed=seed, fresh=fresh, keep_running=keep_running,
            experiments=None if experiments is None else [e.strip() for e in experiments.split(",") if e.strip()],
            say=lambda msg: typer.echo(msg),
        )
        try:
            run_demo(opts)
        except (DemoError, FlowError) as exc:
            typer.echo(f"demo failed: {exc}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            raise typer.Exit(130) from None
