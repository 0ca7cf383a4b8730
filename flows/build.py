"""Prefect flow ``build-umg41m``: plan shards, run one task per unfinished shard, report, announce.

The flow only adds orchestration to library calls (``pipeline.shard_build.process_shard``,
``pipeline.ray_pool.build_ray_chain``, ``pipeline.validate.validate_build``):

1. load the config (``build:`` section; ``input`` / ``output`` / ``overrides`` on top), pin the plan, skip
   finished shards (resume), discard partial files of a killed run;
2. with annotators configured: start (or join) Ray and one actor pool per model stage;
3. one task per shard (``shard-NNNNN``, retried with backoff; a dead Ray actor fails the task);
4. progress artifact (shards done / total), per-shard table artifact, markdown QA report with overlays
   saved in ``<output>/_qa/``;
5. only when every shard is finished and the build validates: emit ``umg.build.completed`` (payload:
   the shard dir) — the ``train/local`` deployment triggers on it (``flows/serve.py``). A failed or partial
   build raises, so the run ends Failed and training does not start. A rerun of a finished build whose shards
   did not change emits nothing (``pipeline.completion``: ``_completed.json``), so training does not start again.
"""

from __future__ import annotations

import base64
import io
import time
from collections import Counter
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.runtime import flow_run

from data_schemas import ConfigError, load_config
from flows.chain import BUILD_COMPLETED, announce
from flows.progress import shard_progress
from pipeline.chain_runner import ChainMetrics, PipelinedChain
from pipeline.completion import COMPLETED_NAME, already_announced, record_completion
from pipeline.key_ledger import partitions_for
from pipeline.overlay import render_overlay
from pipeline.ray_pool import RemoteChain, build_ray_chain, start_ray
from pipeline.ray_shards import ShardRunner
from pipeline.repair import shards_to_repair
from pipeline.shard_build import prepare_build, release_build
from pipeline.shards import iter_samples, read_stats, write_build_manifest
from pipeline.sources.base import InputShard
from pipeline.sources.registry import build_source
from pipeline.storage import StoragePath, as_path, is_local
from pipeline.validate import ValidationReport, validate_build

COMPLETED_EVENT = BUILD_COMPLETED
QA_DIR = "_qa"


class BuildIncomplete(RuntimeError):
    """Some shard failed after its retries, or the build does not validate; training must not start."""


@task(cache_policy=NO_CACHE)
def build_shard(runner: ShardRunner, shard: InputShard, repair: bool = False) -> dict[str, Any]:
    """Ingest, annotate (Ray pools) and commit one shard — in this process or as a Ray task (``runner``); with
    ``repair``, rebuild the retryable error rows of a finished shard. Returns its table row."""
    logger = get_run_logger()
    metrics = ChainMetrics()
    logger.info("shard=%s %s inputs=%d", shard.name, "repair" if repair else "start", len(shard.refs),
                extra={"shard": shard.name})
    stats = runner.run(shard, metrics, repair=repair)
    row = _table_row(stats, metrics)
    logger.info("shard=%s done inputs=%d ok=%d errors=%d regions=%d masks=%d seconds=%.2f", shard.name,
                stats.n_inputs, stats.n_ok, stats.n_error, row["regions"], row["masks"], stats.seconds,
                extra={"shard": shard.name})
    return row


def _table_row(stats, metrics: ChainMetrics | None = None, resumed: bool = False) -> dict[str, Any]:
    counts = stats.counts
    rates = metrics.pass_rates() if metrics is not None else {}
    if rates.get("caption_pass") is None and counts.get("n_captions"):
        rates["caption_pass"] = round(counts.get("n_captions_kept", 0) / counts["n_captions"], 4)
    return {
        "shard": stats.shard, "inputs": stats.n_inputs, "ok": stats.n_ok, "errors": stats.n_error,
        "regions": counts.get("n_regions", 0), "masks": counts.get("n_masks", 0),
        "captions": counts.get("n_captions", 0), "tags": counts.get("n_tags", 0),
        "caption_pass": rates.get("caption_pass"), "box_pass": rates.get("box_pass"),
        "mask_pass": rates.get("mask_pass"), "seconds": stats.seconds, "resumed": resumed,
        "error_reasons": ", ".join(f"{k}: {v}" for k, v in stats.errors.items()),
        "stage_seconds": ", ".join(f"{k} {v:.2f}" for k, v in (metrics.stage_seconds if metrics else {}).items()),
    }


@flow(name="build-umg41m")
def build_umg41m(config: str = "configs/smoke.yaml", input: str | None = None, output: str | None = None,
                 overrides: list[str] | None = None, retry_errors: bool = False) -> dict[str, Any]:
    """Build UMG-41M-style shards from ``input`` into ``output`` (both default to the config's); with
    ``retry_errors`` also rebuild the error rows of an infrastructure kind in finished shards."""
    logger = get_run_logger()
    cfg = load_config(config, [*(overrides or []), *([f"source.path={input}"] if input else [])])
    if output is None and cfg.output is None:
        raise ConfigError(f"{config}: no output directory (pass output= or set build.output)")
    build_dir = as_path(output if output is not None else cfg.output)
    build_dir = build_dir.resolve() if is_local(build_dir) else build_dir
    source = build_source(cfg.source)
    plan, done, keys_in_use = prepare_build(build_dir, source, cfg.shard_size, cfg.lease_ttl_s, cfg.lock_output)
    todo = [shard for shard in plan if shard.name not in done]
    repairs = shards_to_repair(build_dir, plan) if retry_errors else []
    work = [(shard, False) for shard in todo] + [(shard, True) for shard in repairs]
    concurrent = cfg.flow.concurrent_shards
    logger.info("plan: %d shards, %d finished, %d to build, %d to repair into %s (%d at once)", len(plan), len(done),
                len(todo), len(repairs), build_dir, concurrent)
    progress = create_progress_artifact(_percent(len(done), len(plan)), key="umg41m-build-progress",
                                        description=f"shards done / total in {build_dir}")
    rows = {name: _table_row(read_stats(build_dir, name), resumed=True) for name in sorted(done)}
    failed: list[str] = []
    chain, owns_ray = None, False
    try:
        if work and (cfg.annotate is not None or concurrent > 1):
            owns_ray = start_ray(cfg.ray)
        runner = ShardRunner(source, str(build_dir), cfg.images, keys_in_use, None, cfg.breaker, remote=concurrent > 1,
                             num_cpus=cfg.flow.shard_num_cpus, warm_workers=min(concurrent, len(work)),
                             key_partitions=partitions_for(sum(len(s.refs) for s in plan), cfg.flow.key_partitions))
        if work and cfg.annotate is not None:  # the shard workers warm up while the models load
            chain = runner.chain = build_ray_chain(cfg.annotate, cfg.ray)
        runner.wait_warm()
        started = time.perf_counter()
        shard_task = build_shard.with_options(retries=cfg.flow.shard_retries,
                                              retry_delay_seconds=cfg.flow.retry_delay_s)
        n_done = len(done)  # counted here, not listed: per-shard bookkeeping must not grow with the build
        with shard_progress(len(plan), len(done)) as advance:
            for shard, state in _run_shards(shard_task, runner, work, concurrent):
                if state.is_completed():
                    rows[shard.name] = state.result()
                    n_done += shard.name not in done
                else:
                    failed.append(shard.name)
                    logger.error("shard=%s failed after retries: %s", shard.name, state.message,
                                 extra={"shard": shard.name})
                advance()
                update_progress_artifact(progress, _percent(n_done, len(plan)),
                                         description=f"{n_done} / {len(plan)} shards done in {build_dir}")
        shards_wall_s = time.perf_counter() - started
    finally:
        _stop_ray(chain, owns_ray)
        release_build(build_dir)
    write_build_manifest(build_dir)
    report = validate_build(build_dir)
    rows = [rows[name] for name in sorted(rows)]
    create_table_artifact(rows, key="umg41m-build-shards", description=f"per-shard results of {build_dir}")
    pictures = _save_overlays(build_dir, cfg.flow.overlays)
    create_markdown_artifact(_qa_markdown(build_dir, config, rows, report, pictures, failed, len(plan)),
                             key="umg41m-build-qa", description=f"QA report of {build_dir}")
    summary = {"build_dir": str(build_dir), "planned": len(plan), "skipped": len(done),
               "written": len({s.name for s in todo} - set(failed)),
               "repaired": len({s.name for s in repairs} - set(failed)), "failed": sorted(failed), "shards_wall_s": round(shards_wall_s, 3),
               "inputs_per_s": round(sum(len(shard.refs) for shard, _ in work) / max(shards_wall_s, 1e-9), 2),
               **report.summary()}
    if failed or not report.ok:
        raise BuildIncomplete(f"build {build_dir} incomplete: failed shards {failed}, problems {report.problems}")
    summary["announced"] = not already_announced(build_dir)
    if summary["announced"]:
        _announce(build_dir, config, summary)
        record_completion(build_dir, run=str(flow_run.get_id()), samples=summary["samples"])
    else:  # a rerun of a finished, unchanged build: training was started by the first announcement
        logger.info("build %s was already announced complete (%s); no %s event", build_dir,
                    build_dir / COMPLETED_NAME, COMPLETED_EVENT)
    return summary


def _run_shards(shard_task, runner: ShardRunner, work: list[tuple[InputShard, bool]], concurrent: int):
    """Yield ``(shard, final state)`` as shard tasks finish, with at most ``concurrent`` in flight."""
    pending = iter(work)
    in_flight: dict[Any, InputShard] = {}

    def submit_next() -> bool:
        item = next(pending, None)
        if item is None:
            return False
        shard, repair = item
        name = f"{'repair' if repair else 'shard'}-{shard.name}"
        in_flight[shard_task.with_options(task_run_name=name).submit(runner, shard, repair)] = shard
        return True

    while len(in_flight) < concurrent and submit_next():
        pass
    while in_flight:
        future = next(as_completed(list(in_flight)))
        shard = in_flight.pop(future)
        future.wait()
        yield shard, future.state
        submit_next()


def _percent(done: int, total: int) -> float:
    return round(100.0 * done / total, 2) if total else 100.0


def _stop_ray(chain: PipelinedChain | RemoteChain | None, owns_ray: bool) -> None:
    if chain is not None:
        chain.close()
    if owns_ray:
        import ray

        ray.shutdown()


def _announce(build_dir: StoragePath, config: str, summary: dict[str, Any]) -> None:
    """The event the ``train`` deployments trigger on (``flows/chain.py``)."""
    announce(COMPLETED_EVENT, {"shards": str(build_dir), "config": str(Path(config).resolve()),
                               "samples": summary["samples"], "shards_total": summary["shards"]}, name=str(build_dir))


def _save_overlays(build_dir: StoragePath, n: int) -> list[tuple[str, StoragePath, str]]:
    """Draw up to ``n`` samples (most regions first among the first shard's) into ``<build>/_qa/``.

    Returns ``(key, png path, data URI of a small JPEG thumbnail)``.
    """
    if n <= 0:
        return []
    candidates = []
    for sample in iter_samples(build_dir):
        candidates.append(sample)
        if len(candidates) >= 8 * n:
            break
    picked = sorted(candidates, key=lambda s: -len(s.record().regions))[:n]
    out_dir = build_dir / QA_DIR
    if is_local(out_dir):
        out_dir.mkdir(exist_ok=True)
    saved = []
    for sample in picked:
        picture = render_overlay(sample.record(), sample.jpg)
        path = out_dir / f"overlay_{sample.key}.png"
        with path.open("wb") as handle:
            picture.save(handle, format="PNG")
        thumb = picture.copy()
        thumb.thumbnail((480, 480))
        buffer = io.BytesIO()
        thumb.save(buffer, format="JPEG", quality=70)
        saved.append((sample.key, path, "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()))
    return saved


def _qa_markdown(build_dir: StoragePath, config: str, rows: list[dict], report: ValidationReport,
                 pictures: list[tuple[str, StoragePath, str]], failed: list[str], planned: int) -> str:
    total = Counter()
    for row in rows:
        total.update({k: row[k] for k in ("inputs", "ok", "errors", "regions", "masks", "captions", "tags")})
    reasons = Counter()
    for row in rows:
        for part in filter(None, row["error_reasons"].split(", ")):
            reason, _, count = part.rpartition(": ")
            reasons[reason] += int(count)
    status = "**complete**" if not failed and report.ok else "**INCOMPLETE — training not triggered**"
    lines = [
        f"# UMG-41M build QA — {status}", "",
        f"- build dir: `{build_dir}`", f"- config: `{config}`",
        f"- shards: {len(rows)} finished of {planned} planned" + (f"; failed: {', '.join(failed)}" if failed else ""),
        f"- inputs {total['inputs']}, ok {total['ok']}, errors {total['errors']}"
        + (" (" + ", ".join(f"{r}: {c}" for r, c in reasons.most_common(8)) + ")" if reasons else ""),
        f"- regions {total['regions']}, masks kept {total['masks']}, captions {total['captions']}, "
        f"tags {total['tags']}",
        f"- filter pass rates (mean over shards): {_mean_rates(rows)}",
        f"- validation: {'ok' if report.ok else 'PROBLEMS: ' + '; '.join(report.problems[:5])}",
        "", "## Overlays", "",
    ]
    for key, path, thumb in pictures:
        link = f"file://{path}" if is_local(path) else str(path)
        lines += [f"**{key}** — full size: [`{path}`]({link})", "", f"![{key}]({thumb})", ""]
    if not pictures:
        lines.append("(none: no samples)")
    return "\n".join(lines)


def _mean_rates(rows: list[dict]) -> str:
    parts = []
    for name in ("caption_pass", "box_pass", "mask_pass"):
        values = [row[name] for row in rows if row.get(name) is not None]
        parts.append(f"{name} {sum(values) / len(values):.3f}" if values else f"{name} n/a")
    return ", ".join(parts)
