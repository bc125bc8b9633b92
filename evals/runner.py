"""Running a suite: check everything, call the model, score, store.

Top to bottom, for ``safegate eval run SUITE.yaml``:

1. **Prepare** (``Runner.prepare``), before any model is called: load and validate the
   suite, pick the model(s) (``--model``) and where they are (``--base-url``,
   ``SAFEGATE_BASE_URL``: ``evals.endpoints``), load and parse every dataset, build every
   metric through ``evals.metrics.base.build_metric`` (unknown name or bad options is an
   error naming the suite file and field), build each model's caller and ``check()`` it
   (the gateway serves it, litellm knows its provider, the key variable is set). Any
   problem raises ``SuiteError`` (usage: exit 2) and nothing is called or stored.
2. **Generate** (``Runner.execute``): a run row is created (or, with ``resume``, the
   interrupted run is reopened), then every sample not yet done is looked up in the call
   cache and the rest are called with at most ``concurrency`` calls in flight (an asyncio
   semaphore) under a rich progress bar on stderr. Identical calls in one run are made
   once. Each outcome is written to ``eval_samples`` as it completes, so an interrupted
   run loses at most the calls in flight. A failed call is recorded on its sample and the
   run goes on.
3. **Score and store**: each metric scores all samples, unless an earlier succeeded run of
   the suite scored it on the same inputs (``metric_inputs_sha256``: metric, options, its
   code and weights, and every sample's id, labels, reference and output): then that
   run's record is reused, marked ``reused_from``, and nothing is loaded (no engine, no
   evaluate), which keeps an unchanged rerun's cost to reading the cache. Each metric
   record keeps its ``inputs_sha256``. The run gets its metrics, counts
   and final status (``failed`` when a metric failed or more than ``max_error_rate`` of
   the calls failed), and its files are written under ``SAFEGATE_HOME/evals/<run_id>/``
   (``run.json``, ``samples.jsonl``, and ``report.md``/``report.json`` by ``evals.report``).

Resuming is explicit: ``safegate eval run SUITE --resume RUN_ID`` continues that run
(same suite file, datasets and model, checked by sha256) and calls only the samples it
has no output for, plus those whose call failed. A plain rerun starts a new run, but the
cache answers every call the interrupted run finished.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from evals.cache import CallCache, cache_key
from evals.datasets import Dataset, load_datasets
from evals.endpoints import Endpoints, apply_endpoints
from evals.errors import RunError, SuiteError
from evals.metrics.base import (
    Metric,
    MetricError,
    MetricOptionsError,
    build_metric,
    metric_inputs_sha256,
    metric_record,
)
from evals.models import Completion, ModelCaller, build_caller, describe_error
from evals.records import Output, Sample, prompt_sha256, reference_sha256
from evals.report import write_run_report
from evals.runs import Run, RunStatus, RunStore
from evals.suite import (
    ChosenModel,
    LitellmModel,
    MetricSpec,
    Suite,
    choose_models,
    load_suite,
    redact,
)

CallerFactory = Callable[[ChosenModel], ModelCaller]


def default_caller_factory(chosen: ChosenModel) -> ModelCaller:
    return build_caller(chosen.spec)


@dataclass(frozen=True)
class Plan:
    """One model's run of a suite, checked and ready: nothing here has called a model."""

    suite: Suite
    model: ChosenModel
    identity: Mapping[str, Any]
    datasets: Sequence[Dataset]
    samples: Sequence[Sample]
    metrics: Sequence[tuple[MetricSpec, Metric]]
    params: Mapping[str, Any]
    concurrency: int
    resume: Run | None = None
    warnings: Sequence[str] = ()

    def config(self) -> dict[str, Any]:
        """The resolved configuration a run records (no secrets)."""
        spec = self.model.spec
        model: dict[str, Any] = {
            "name": spec.name,
            "selector": self.model.selector,
            "identity": dict(self.identity),
        }
        if self.model.base_url_from is not None:
            model["base_url_from"] = self.model.base_url_from
        model["timeout_s"] = spec.timeout_s
        model["max_retries"] = spec.max_retries
        if isinstance(spec, LitellmModel):
            model["params"] = redact(spec.params)
        gate = self.suite.gate_path
        return {
            "model": model,
            "generation": dict(self.params),
            "datasets": [
                {
                    "name": dataset.name,
                    "source": dataset.source,
                    "sha256": dataset.sha256,
                    "samples": len(dataset.samples),
                }
                for dataset in self.datasets
            ],
            "metrics": [{"name": spec.name, "options": spec.options} for spec, _ in self.metrics],
            "concurrency": self.concurrency,
            "max_error_rate": self.suite.spec.max_error_rate,
            "gate": str(gate) if gate else None,
        }


@dataclass
class _Tally:
    done: int = 0
    called: int = 0
    cached: int = 0
    errors: int = 0
    filtered: int = 0
    outputs: dict[str, Output] = field(default_factory=dict)


class Runner:
    """Prepares and executes suite runs against a run store and a call cache."""

    def __init__(
        self,
        store: RunStore,
        cache: CallCache,
        *,
        caller_factory: CallerFactory = default_caller_factory,
        console: Console | None = None,
        progress: bool = True,
    ) -> None:
        self.store = store
        self.cache = cache
        self.caller_factory = caller_factory
        self.console = console or Console(stderr=True, soft_wrap=True)
        self.show_progress = progress

    # -- 1. prepare ------------------------------------------------------------------------------

    def prepare(
        self,
        suite_path: Path | str,
        *,
        model: str | None = None,
        concurrency: int | None = None,
        resume: str | None = None,
        endpoints: Endpoints | None = None,
    ) -> list[Plan]:
        """Check everything a run needs; raises ``SuiteError``/``RunError``, calls no model.

        ``endpoints`` replaces the suite's base URLs (``evals.endpoints``).
        """
        suite = load_suite(suite_path)
        previous = self.store.get(resume) if resume else None
        if previous is not None and model is None:
            model = previous.config.get("model", {}).get("selector", previous.model)
        chosen = apply_endpoints(suite, choose_models(suite, model), endpoints or Endpoints())
        problems: list[str] = []
        datasets: list[Dataset] = []
        metrics: list[tuple[MetricSpec, Metric]] = []
        try:
            datasets = load_datasets(suite)
        except SuiteError as exc:
            problems.append(str(exc))
        try:
            metrics = self._build_metrics(suite)
        except SuiteError as exc:
            problems.append(str(exc))
        if not problems:  # the models last: checking one may ask a gateway over the network
            try:
                asyncio.run(self._check_models(suite, chosen))
            except SuiteError as exc:
                problems.append(str(exc))
        if problems:
            raise SuiteError("\n".join(problems))
        samples = [sample for dataset in datasets for sample in dataset.samples]
        params = suite.spec.generation.params()
        plans = [
            Plan(
                suite=suite,
                model=item,
                identity=dict(item.spec.identity()),
                datasets=datasets,
                samples=samples,
                metrics=metrics,
                params=params,
                concurrency=concurrency or suite.spec.concurrency,
                warnings=[warning for dataset in datasets for warning in dataset.warnings],
            )
            for item in chosen
        ]
        if previous is not None:
            plans = [self._resumable(previous, plans)]
        return plans

    def _build_metrics(self, suite: Suite) -> list[tuple[MetricSpec, Metric]]:
        built: list[tuple[MetricSpec, Metric]] = []
        problems: list[str] = []
        for index, spec in enumerate(suite.spec.metrics):
            where = f"metrics[{index}]"
            try:
                built.append((spec, build_metric(spec.name, spec.options)))
            except MetricOptionsError as exc:
                problems.append(f"{suite.where(where + '.options')}: {exc}")
            except MetricError as exc:
                problems.append(f"{suite.where(where + '.name')}: {exc}")
        if problems:
            raise SuiteError("\n".join(problems))
        return built

    async def _check_models(self, suite: Suite, chosen: Sequence[ChosenModel]) -> None:
        problems: list[str] = []
        for item in chosen:
            where = suite.where(item.field)
            if item.base_url_from is not None:
                where += f" (base URL from {item.base_url_from})"
            try:
                caller = self.caller_factory(item)
            except SuiteError as exc:
                problems.append(f"{where}{'.' if item.field[0] != '-' else ': '}{exc}")
                continue
            try:
                await caller.check()
            except SuiteError as exc:
                problems.append(f"{where}: {exc}")
            finally:
                await caller.aclose()
        if problems:
            raise SuiteError("\n".join(problems))

    @staticmethod
    def _resumable(previous: Run, plans: Sequence[Plan]) -> Plan:
        plan = plans[0]
        if len(plans) != 1 or plan.model.spec.name != previous.model:
            raise RunError(f"run {previous.id} ran model {previous.model!r}; resume it alone")
        if previous.status is RunStatus.SUCCEEDED:
            raise RunError(f"run {previous.id} already succeeded; there is nothing to resume")
        if previous.suite_sha256 != plan.suite.sha256:
            raise RunError(
                f"run {previous.id} ran another version of the suite "
                f"({previous.suite_path}); start a new run"
            )
        then = {d["name"]: d["sha256"] for d in previous.config.get("datasets", [])}
        now = {dataset.name: dataset.sha256 for dataset in plan.datasets}
        if then != now:
            changed = sorted(n for n in now.keys() | then.keys() if then.get(n) != now.get(n))
            raise RunError(
                f"run {previous.id}: datasets changed since it ran ({', '.join(changed)}); "
                "start a new run"
            )
        then_identity = previous.config.get("model", {}).get("identity")
        if then_identity != dict(plan.identity):
            then_url = _url_of(then_identity)
            now_url = _url_of(plan.identity)
            moved = (
                f" (it ran at {then_url}, now at {now_url or 'the provider default'}; "
                "pass the same --base-url to resume it)"
                if then_url != now_url and then_url is not None
                else ""
            )
            raise RunError(
                f"run {previous.id}: model {previous.model!r} is configured differently now{moved}"
            )
        return replace(plan, resume=previous)

    # -- 2 and 3. execute --------------------------------------------------------------------------

    def run(
        self,
        suite_path: Path | str,
        *,
        model: str | None = None,
        concurrency: int | None = None,
        resume: str | None = None,
        use_cache: bool = True,
        endpoints: Endpoints | None = None,
    ) -> list[Run]:
        plans = self.prepare(
            suite_path, model=model, concurrency=concurrency, resume=resume, endpoints=endpoints
        )
        return [self.execute(plan, use_cache=use_cache) for plan in plans]

    def execute(self, plan: Plan, *, use_cache: bool = True) -> Run:
        """Generate, score and store one plan; returns the finished run.

        With ``use_cache=False`` every call is made afresh (and refreshes the cache), and
        every metric scores afresh.
        An interruption (Ctrl-C, or any ``BaseException`` from a caller) marks the run
        failed, saying how to resume it, and is raised again.
        """
        for warning in plan.warnings:
            self.console.print(f"[yellow]warning:[/] {warning}", markup=True, highlight=False)
        if plan.resume is not None:
            run = self.store.start(plan.resume.id, pid=os.getpid())
            done = {
                sample_id: output
                for sample_id, output in self.store.outputs(run.id).items()
                if output.error is None
            }
        else:
            run = self.store.create(
                suite=plan.suite.name,
                # Absolute: the dashboard reads the prompts back from wherever it runs.
                suite_path=str(plan.suite.path.resolve()),
                suite_sha256=plan.suite.sha256,
                model=plan.model.spec.name,
                config=plan.config(),
            )
            run = self.store.start(run.id, pid=os.getpid())
            done = {}
        tally = _Tally(done=len(done), outputs=dict(done))
        try:
            asyncio.run(self._generate(plan, run, tally, use_cache=use_cache))
        except BaseException:
            remaining = len(plan.samples) - len(tally.outputs)
            failed = self.store.finish(
                run.id,
                RunStatus.FAILED,
                error=(
                    f"interrupted with {remaining} of {len(plan.samples)} samples left; "
                    f"resume with: safegate eval run {plan.suite.path} --resume {run.id}"
                ),
                counts=self._counts(plan, tally),
            )
            self._write_files(failed, plan.samples, self.store.outputs(run.id))
            self.console.print(
                f"[red]interrupted:[/] {run.id}; resume with: safegate eval run "
                f"{plan.suite.path} --resume {run.id}",
                highlight=False,
            )
            raise
        return self._finish(plan, run, tally, reuse_scores=use_cache)

    async def _generate(self, plan: Plan, run: Run, tally: _Tally, *, use_cache: bool) -> None:
        """Answer every sample not done yet: from the cache in bulk, else one call per
        distinct (messages, parameters), at most ``plan.concurrency`` at once.

        A finished call's outcome is written (cache entry and sample rows, in a worker
        thread) before anything else can interrupt it; an interruption cancels only the
        calls still in flight, waits for the writes under way, and is raised again.
        """
        todo = [
            (position, sample)
            for position, sample in enumerate(plan.samples)
            if sample.id not in tally.outputs
        ]
        keys = {
            sample.id: cache_key(plan.identity, sample.messages, plan.params) for _, sample in todo
        }
        hits = await asyncio.to_thread(self.cache.get_many, keys.values()) if use_cache else {}
        groups: dict[str, list[tuple[int, Sample]]] = {}
        for position, sample in todo:
            if keys[sample.id] not in hits:
                groups.setdefault(keys[sample.id], []).append((position, sample))
        caller = self.caller_factory(plan.model)
        semaphore = asyncio.Semaphore(plan.concurrency)
        writes: list[asyncio.Future[None]] = []

        def output_of(sample: Sample, completion: Completion, *, cached: bool) -> Output:
            return Output(
                sample_id=sample.id,
                text=completion.text,
                finish_reason=completion.finish_reason,
                filtered=completion.filtered,
                error=completion.error,
                latency_ms=completion.latency_ms,
                cached=cached,
                prompt_sha256=prompt_sha256(sample.messages),
                reference_sha256=reference_sha256(sample.reference),
            )

        def count(outputs: Sequence[tuple[int, Sample, Output]], progress: _Bar) -> None:
            for _, _, output in outputs:
                tally.outputs[output.sample_id] = output
                tally.cached += output.cached
                tally.errors += output.error is not None
                tally.filtered += output.filtered is not None
                progress.advance(tally)

        def persist(
            key: str, completion: Completion, outputs: Sequence[tuple[int, Sample, Output]]
        ) -> None:
            self.cache.put(key, plan.identity, completion)  # errors are not kept
            self.store.record_outputs(run.id, outputs)

        async def call(key: str, members: Sequence[tuple[int, Sample]], progress: _Bar) -> None:
            async with semaphore:
                try:
                    completion = await caller.complete(members[0][1].messages, plan.params)
                except Exception as exc:  # a caller's own failure is this example's error
                    completion = Completion(None, None, None, describe_error(exc), 0.0)
            # no await between the answer and starting its write: it cannot be lost
            tally.called += 1
            outputs = [(p, s, output_of(s, completion, cached=False)) for p, s in members]
            write = asyncio.ensure_future(asyncio.to_thread(persist, key, completion, outputs))
            writes.append(write)
            await asyncio.shield(write)
            count(outputs, progress)

        with self._progress(plan, tally) as bar:
            answered = [
                (position, sample, output_of(sample, hits[keys[sample.id]], cached=True))
                for position, sample in todo
                if keys[sample.id] in hits
            ]
            await asyncio.to_thread(self.store.record_outputs, run.id, answered)
            count(answered, bar)
            tasks = [
                asyncio.ensure_future(call(key, members, bar)) for key, members in groups.items()
            ]
            try:
                await asyncio.gather(*tasks)
            except BaseException:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await asyncio.gather(*writes, return_exceptions=True)
                raise
            finally:
                await caller.aclose()

    def _finish(self, plan: Plan, run: Run, tally: _Tally, *, reuse_scores: bool) -> Run:
        outputs = [tally.outputs[sample.id] for sample in plan.samples]
        metrics: dict[str, Any] = {}
        problems: list[str] = []
        for spec, metric in plan.metrics:
            try:
                digest: str | None = metric_inputs_sha256(
                    spec.name, spec.options, plan.samples, outputs
                )
            except (TypeError, ValueError):  # a label JSON cannot spell: score, never reuse
                digest = None
            earlier = (
                self.store.scored_metric(spec.name, digest, suite=plan.suite.name)
                if reuse_scores and digest is not None
                else None
            )
            if earlier is not None:
                scored_in, record = earlier
                metrics[spec.name] = {
                    **record,
                    "reused_from": record.get("reused_from") or scored_in,
                }
                continue
            try:
                record = metric_record(metric, metric.score(plan.samples, outputs))
            except Exception as exc:  # one metric's failure fails the run, not the others
                problems.append(f"metric {spec.name}: {describe_error(exc)}")
                continue
            metrics[spec.name] = {**record, "inputs_sha256": digest} if digest else record
        errors = sum(output.error is not None for output in outputs)
        rate = errors / len(outputs) if outputs else 0.0
        if errors and rate > plan.suite.spec.max_error_rate:
            first = next(output.error for output in outputs if output.error is not None)
            problems.insert(
                0,
                f"{errors} of {len(outputs)} calls failed ({rate:.1%} > max_error_rate "
                f"{plan.suite.spec.max_error_rate:.1%}); first: {first}",
            )
        finished = self.store.finish(
            run.id,
            RunStatus.FAILED if problems else RunStatus.SUCCEEDED,
            error="; ".join(problems) or None,
            counts=self._counts(plan, tally),
            metrics=metrics,
        )
        self._write_files(finished, plan.samples, tally.outputs)
        return finished

    def _write_files(
        self, run: Run, samples: Sequence[Sample], outputs: Mapping[str, Output]
    ) -> None:
        """``run.json``, ``samples.jsonl``, ``report.md`` and ``report.json``."""
        folder = self.store.write_files(run, samples, outputs)
        write_run_report(folder, run.record())

    @staticmethod
    def _counts(plan: Plan, tally: _Tally) -> dict[str, int]:
        outputs = list(tally.outputs.values())
        return {
            "samples": len(plan.samples),
            "done": len(outputs),
            "called": tally.called,
            "cached": sum(output.cached for output in outputs),
            "errors": sum(output.error is not None for output in outputs),
            "filtered_prompt": sum(output.filtered == "prompt" for output in outputs),
            "filtered_completion": sum(output.filtered == "completion" for output in outputs),
        }

    @contextmanager
    def _progress(self, plan: Plan, tally: _Tally) -> Iterator[_Bar]:
        progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            disable=not self.show_progress,
        )
        description = f"{plan.suite.name} / {plan.model.spec.name}"
        task = progress.add_task(
            description, total=len(plan.samples), completed=tally.done, detail=""
        )
        with progress:
            yield _Bar(progress, task)


def _url_of(identity: Any) -> str | None:
    """The base URL a run's recorded model identity names, if any."""
    if not isinstance(identity, Mapping):
        return None
    url = identity.get("base_url") or (identity.get("params") or {}).get("api_base")
    return url if isinstance(url, str) else None


class _Bar:
    def __init__(self, progress: Progress, task: TaskID) -> None:
        self.progress = progress
        self.task = task

    def advance(self, tally: _Tally) -> None:
        detail = f"cached {tally.cached}  errors {tally.errors}  filtered {tally.filtered}"
        self.progress.update(self.task, advance=1, detail=detail)
