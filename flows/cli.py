"""The ``umg`` command line: thin wrappers over library functions (no format or model logic here)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from flows.progress import progress_bar
from rich.logging import RichHandler

app = typer.Typer(add_completion=False, no_args_is_help=True, help="UMG-CLIP: build UMG-41M-style shards, train.")
console = Console(stderr=True)


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
    )


def _fail(message: str) -> None:
    console.print("[red]error:[/red]", escape(" ".join(message.split())), soft_wrap=True)  # one line, never wrapped
    raise typer.Exit(code=2)


@app.command()
def sample(
    out: Annotated[Path, typer.Option(help="output directory")],
    n: Annotated[int, typer.Option(help="number of images over all splits")] = 64,
    seed: Annotated[int, typer.Option(help="random seed; same seed gives byte-identical files")] = 0,
    shards: Annotated[bool, typer.Option("--shards", help="write ground-truth shards per split instead")] = False,
    shard_size: Annotated[int, typer.Option(help="inputs per shard (with --shards)")] = 64,
    eval_: Annotated[bool, typer.Option("--eval", help="also write the umg eval layouts (docs/evaluation.md); "
                                        "with --shards under OUT/raw")] = False,
    preset: Annotated[str, typer.Option(help="SampleConfig preset (pipeline/sample_data/presets.py): "
                                        "learnable, backgrounds, colors, small, default")] = "default",
) -> None:
    """Generate the "digit scenes" sample data: images + COCO JSON, or ground-truth shards."""
    from pipeline.sample_data import generate_sample
    from pipeline.sample_data.eval_formats import write_eval_layouts
    from pipeline.sample_data.presets import preset_config
    from pipeline.sample_shards import write_sample_shards

    try:
        config = preset_config(preset)
    except ValueError as exc:
        _fail(str(exc))
    if shards:
        summary = write_sample_shards(out, n=n, seed=seed, shard_size=shard_size, config=config)
    else:
        summary = generate_sample(out, n=n, seed=seed, config=config).model_dump(mode="json")
    if eval_:
        summary["eval"] = write_eval_layouts(out / "raw" if shards else out)
    typer.echo(json.dumps(summary, sort_keys=True, default=str))


@app.command()
def build(
    input: Annotated[str, typer.Option("--input", help="source path or URL (s3://bucket/prefix, gs://…, file://…): "
                                       "a folder, img2dataset dir, COCO/VG root")],
    output: Annotated[str, typer.Option("--output", help="build directory for the shards (path or URL)")],
    config: Annotated[Optional[Path], typer.Option(help="YAML BuildConfig")] = None,
    source_kind: Annotated[str, typer.Option(help="auto|folder|img2dataset|coco|vg")] = "auto",
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override, e.g. shard_size=64")] = None,
    follow_symlinks: Annotated[Optional[list[Path]], typer.Option(
        "--follow-symlinks", help="folder outside the input that symlinked inputs may point into (repeatable; "
        "default: a link resolving outside the input is an error row)")] = None,
    retry_errors: Annotated[bool, typer.Option(
        "--retry-errors", help="also rebuild error rows of an infrastructure kind (annotator / internal failures) "
        "in finished shards")] = False,
) -> None:
    """Read a source and write shards in-process (resumes a killed build in the same OUTPUT)."""
    from annotators import AnnotatorError
    from data_schemas import ConfigError, load_config
    from pipeline.breaker import ShardTripped
    from pipeline.placement import in_process_refusal
    from pipeline.shard_build import build_shards, prepare_build
    from pipeline.shards import ShardError
    from pipeline.sources.registry import build_source
    from pipeline.tiny_models import prepare_chain

    if not input.strip():  # Path("") is the current directory: never build that by accident
        _fail("--input is empty; name the folder (or COCO / VG root) to read")
    overrides = [f"source.path={json.dumps(input)}", f"source.kind={source_kind}", *(set_ or [])]
    if follow_symlinks:
        overrides.append(f"source.follow_symlinks={json.dumps([str(p) for p in follow_symlinks])}")
    try:
        cfg = load_config(config, overrides)
        refusal = in_process_refusal(cfg)
        if refusal:
            _fail(f"{config}: {refusal}")
        source = build_source(cfg.source)
        prepared = prepare_build(output, source, cfg.shard_size, cfg.lease_ttl_s,
                                 cfg.lock_output)  # output and plan checked before any model loads
    except (ConfigError, ValueError, OSError, ShardError) as exc:  # OSError: e.g. an object store refusing access
        _fail(str(exc))
    except MemoryError:
        _fail(f"out of memory while reading the inputs of {input} (an annotation file too large?)")
    plan, done, _ = prepared
    chain = None
    if retry_errors or any(shard.name not in done for shard in plan):  # else no model is needed
        try:
            chain = prepare_chain(cfg.annotate)
        except AnnotatorError as exc:
            _fail(str(exc))
    with progress_bar(console) as bar:
        task = bar.add_task("shards", total=None)
        try:
            summary = build_shards(
                source, output, cfg.shard_size, cfg.images, annotate=chain, breaker=cfg.breaker,
                retry_errors=retry_errors, prepared=prepared,
                on_shard=lambda stats: bar.advance(task),
                on_plan=lambda planned, finished: bar.update(task, total=planned, completed=finished),
            )
        except ShardTripped as exc:  # finished shards stay; rerun the same command after fixing the cause
            _fail(str(exc))
        except (OSError, ShardError, MemoryError) as exc:  # disk full, output removed …: finished shards stay
            reason = f"{type(exc).__name__}: {exc}" if isinstance(exc, MemoryError) or not str(exc) else str(exc)
            _fail(f"build stopped: {reason}; finished shards are kept, the same command resumes")
    written = summary.written
    typer.echo(json.dumps({
        "build_dir": str(output), "planned": summary.planned, "skipped": len(summary.skipped),
        "written": len(written), "repaired": len(summary.repaired), "inputs": summary.n_inputs,
        "ok": sum(s.n_ok for s in written), "errors": sum(s.n_error for s in written),
    }))


@app.command()
def validate(build_dir: Annotated[str, typer.Argument(help="build directory (path or URL)")]) -> None:
    """Schema-check every shard; prints counts as JSON last; exits 1 naming any broken shard."""
    from pipeline.validate import validate_build

    from pipeline.storage import StorageError

    try:
        report = validate_build(build_dir)
    except StorageError as exc:
        _fail(str(exc))
    for problem in report.problems:
        console.print("[red]broken:[/red]", escape(problem))
    typer.echo(json.dumps(report.summary()))
    if not report.ok:
        raise typer.Exit(code=1)


@app.command()
def show(
    build_dir: Annotated[str, typer.Argument(help="build directory (path or URL)")],
    key: Annotated[str, typer.Argument(help="sample key")],
    png: Annotated[Path, typer.Option("--png", help="where to write the picture")],
) -> None:
    """Draw one sample's boxes, masks, tags and captions into a PNG (paper Fig. 3 style)."""
    from pipeline.overlay import render_overlay
    from pipeline.shards import iter_samples

    for sample in iter_samples(build_dir):
        if sample.key == key:
            png.parent.mkdir(parents=True, exist_ok=True)
            render_overlay(sample.record(), sample.jpg).save(png)
            typer.echo(str(png))
            return
    _fail(f"key {key!r} not found in {build_dir}")


# --- training commands (umg train …; model/) ---


@app.command()
def train(
    shards: Annotated[list[str], typer.Option("--shards", help="shard build dir or tar, a path or URL "
                                              "(s3://…, gs://…, pipe:…; repeatable)")],
    out: Annotated[Path, typer.Option(help="run dir: checkpoints/, metrics.csv, loss_curve.png; resumes")],
    config: Annotated[Path, typer.Option(help="YAML with a train: section")] = Path("configs/smoke.yaml"),
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override, e.g. steps=50")] = None,
) -> None:
    """Train UMG-CLIP on shards (torchrun-aware); prints the result as JSON last."""
    import os

    from data_schemas import ConfigError, TrainConfig, load_config
    from model.trainer import train as run_training
    from pipeline.storage import StorageError

    try:
        cfg = load_config(config, set_, model=TrainConfig, section="train")
        result = run_training(cfg, shards, out)
    except (ConfigError, FileNotFoundError, RuntimeError, StorageError) as exc:
        _fail(str(exc))
    if os.environ.get("RANK", "0") == "0":
        typer.echo(json.dumps({"checkpoint": str(result.checkpoint), "steps": result.steps,
                               "metrics_csv": str(result.metrics_csv), "final_losses": result.final_losses}))


from flows.cli_adapt import adapt  # noqa: E402 - the umg adapt command (flows/cli_adapt.py)

app.command("adapt")(adapt)


# --- orchestration commands (umg export-coco, umg serve …; flows/) ---


@app.command("export-coco")
def export_coco(
    build_dir: Annotated[str, typer.Argument(help="build directory with finished shards (path or URL)")],
    out: Annotated[str, typer.Option("--out", help="COCO JSON file to write (path or URL)")],
    images: Annotated[Optional[str], typer.Option(help="also write the JPEGs into this folder (path or URL)")] = None,
) -> None:
    """Regions, masks and captions of a build as COCO JSON (pycocotools loads it); counts as JSON last."""
    from pipeline.export_coco import export_coco as run_export
    from pipeline.shards import ShardError

    try:
        counts = run_export(build_dir, out, images_dir=images)
    except (ShardError, OSError) as exc:
        _fail(str(exc))
    typer.echo(json.dumps({"out": str(out), **counts}))


@app.command("export-open-clip")
def export_open_clip(
    checkpoint: Annotated[Path, typer.Argument(help="run dir, checkpoint dir or .safetensors in one")],
    out: Annotated[Path, typer.Option("--out", help="folder for open_clip_config.json + open_clip_model.safetensors")],
) -> None:
    """The checkpoint's towers as a plain open_clip folder (open_clip / clip_benchmark: local-dir:OUT)."""
    from model.export import export_open_clip as run_export

    try:
        folder = run_export(checkpoint, out)
    except FileNotFoundError as exc:
        _fail(str(exc))
    typer.echo(json.dumps({"out": str(folder), "open_clip_name": f"local-dir:{folder}"}))


@app.command()
def serve(
    train_out: Annotated[Path, typer.Option(help="run dir of the train runs the build triggers")] = Path("out/train"),
    adapt_out: Annotated[Path, typer.Option(help="out dir of the adapt runs training triggers")] = Path("out/adapt"),
    eval_data: Annotated[Optional[Path], typer.Option(
        help="data of the evaluate runs adaptation triggers (zeroshot: an ImageFolder such as "
        "<umg sample --eval>/classification/test); without it evaluate is served untriggered")] = None,
    eval_out: Annotated[Path, typer.Option(help="result JSON of triggered evaluate runs")] = Path(
        "out/eval/result.json"),
    limit: Annotated[int, typer.Option(help="flow runs at once")] = 1,
    no_train: Annotated[bool, typer.Option("--no-train", help="serve build-umg41m/local only")] = False,
) -> None:
    """Serve build-umg41m/local, train/local, adapt/local and evaluate/local, chained by events (needs
    PREFECT_API_URL); runs until stopped."""
    import os

    from flows.serve import main as serve_main

    if not os.environ.get("PREFECT_API_URL"):
        _fail("set PREFECT_API_URL to a running Prefect server (see docs/orchestration.md)")
    serve_main(["--train-out", str(train_out), "--adapt-out", str(adapt_out), "--eval-out", str(eval_out),
                "--limit", str(limit), *(["--eval-data", str(eval_data)] if eval_data else []),
                *(["--no-train"] if no_train else [])])


from flows.cli_plan import plan_resources  # noqa: E402 - the umg plan-resources command (flows/cli_plan.py)

app.command("plan-resources")(plan_resources)

from flows.cli_eval import eval_app  # noqa: E402  (sub-app; imports nothing heavy)

app.add_typer(eval_app, name="eval")

if __name__ == "__main__":
    app()
