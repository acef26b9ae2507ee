"""Beam's DaskRunner (2.77) with its data losses and recomputation fixed.

``--runner=DaskRunner`` selects this class (see ``options.pipeline_options``).
It translates a pipeline into ``dask.bag`` operations like Beam's runner and
reuses its GroupByKey and Flatten translations, but differs where Beam's lost
or repeated work, or ran it on one core, on a ``dask.distributed`` cluster:

- What a DoFn emits in ``finish_bundle`` is kept (Beam's collected a bundle's
  outputs before calling it, so every batching DoFn lost its last batch).
- A side input is one node of the task graph that every bundle of its
  consumer depends on, so it is computed once. Beam's recomputed the whole
  branch behind it inside every bundle that read it.
- Every leaf of the pipeline runs, not only the last transform applied.
- ``Reshuffle`` spreads its input over the cluster: it is materialized on the
  workers and split into bundles of at most :data:`BUNDLE_ELEMENTS` elements
  (at least one per worker thread). Beam's made it a no-op, so a job reading
  one metadata.csv ran every later stage in one bundle, on one core.
- A DoFn is deserialized and set up once per worker thread and job, not once
  per bundle, and torn down when the job ends.
- A GroupByKey shuffles at most :data:`SHUFFLE_PARTITIONS` partitions (a
  task shuffle costs partitions squared tasks), then splits the groups back.

A ParDo with several tagged outputs is refused (Beam's merges them).
Stateful DoFns, timers and ``Read`` sources are not supported, as in Beam's.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import uuid
from collections.abc import Iterable
from typing import Any

import dask
import dask.bag
from apache_beam.internal import pickler
from apache_beam.pipeline import AppliedPTransform, PipelineVisitor
from apache_beam.runners.common import (
    DoFnContext,
    DoFnInvoker,
    DoFnSignature,
    Receiver,
    _OutputHandler,
)
from apache_beam.runners.dask import dask_runner as beam_dask
from apache_beam.runners.dask.overrides import (
    _Create,
    _GroupByKeyOnly,
    _Reshuffle,
    dask_overrides,
)
from apache_beam.runners.dask.transform_evaluator import (
    TRANSLATIONS,
    Flatten,
    GroupByKey,
    NoOp,
    get_windowed_value,
)
from apache_beam.runners.runner import PipelineState
from apache_beam.transforms import core
from apache_beam.transforms.sideinputs import SideInputMap
from distributed import Client, WorkerPlugin, get_worker

logger = logging.getLogger(__name__)

#: Largest bundle a Reshuffle makes: bounds a worker's memory per task
#: (a scoring bundle holds its decoded images) and the work a retry repeats.
BUNDLE_ELEMENTS = 256


#: Partitions a GroupByKey shuffles at most (unless there are more worker threads).
SHUFFLE_PARTITIONS = 8


@dataclasses.dataclass(frozen=True)
class _SideInputView:
    """How a bundle turns a side input's materialized values into its view."""

    view_class: Any
    view_options: dict[str, Any]
    window_fn: Any


@dataclasses.dataclass(frozen=True)
class _ParDoSpec:
    """What every bundle of one ParDo needs; the DoFn travels pickled."""

    pool: str
    label: str
    payload: bytes
    views: tuple[_SideInputView, ...]


class _Receiver(Receiver):
    """Collects one bundle's outputs, also those of ``finish_bundle``."""

    def __init__(self) -> None:
        super().__init__()
        self.values: list[Any] = []

    def receive(self, windowed_value: Any) -> None:
        self.values.append(windowed_value.value)


class DoFnPool(WorkerPlugin):
    """Per worker and job: set-up DoFn instances, reused by later bundles.

    A dask worker plugin, so it lives on every worker (also one that joins
    late) and its ``teardown`` runs when the job unregisters it. An instance
    serves one bundle at a time; worker threads each get their own.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def setup(self, worker: Any = None) -> None:
        """Runs on the worker, after the plugin arrives (a lock cannot travel)."""
        self._idle: dict[str, list[Any]] = {}
        self._lock = threading.Lock()

    def acquire(self, spec: _ParDoSpec) -> tuple[Any, bool]:
        """A (fn, args, kwargs, window_fn) tuple for ``spec``, and whether it is new."""
        with self._lock:
            idle = self._idle.setdefault(spec.label, [])
            if idle:
                return idle.pop(), False
        return pickler.loads(spec.payload), True

    def release(self, spec: _ParDoSpec, instance: Any) -> None:
        with self._lock:
            self._idle.setdefault(spec.label, []).append(instance)

    def teardown(self, worker: Any = None) -> None:
        """Tears every idle DoFn down (the job is over); errors are logged, not raised."""
        with self._lock:
            instances = [i for idle in self._idle.values() for i in idle]
            self._idle.clear()
        for fn, *_ in instances:
            try:
                DoFnSignature(fn).teardown_lifecycle_method.method_value()
            except Exception:  # best effort, as Beam's own teardown
                logger.warning("DoFn teardown failed", exc_info=True)


def _concat(parts: Iterable[Iterable[Any]]) -> list[Any]:
    return [value for part in parts for value in part]


def _nothing(values: Iterable[Any]) -> list[Any]:
    return []


def _run_bundle(elements: Iterable[Any], spec: _ParDoSpec, *side_values: list[Any]) -> list[Any]:
    """Runs one bundle (a bag partition) through a ParDo; returns every output."""
    pool: DoFnPool = get_worker().plugins[spec.pool]  # type: ignore[assignment]
    instance, new = pool.acquire(spec)
    fn, args, kwargs, window_fn = instance
    receiver = _Receiver()
    handler = _OutputHandler(
        window_fn=window_fn,
        main_receivers=receiver,
        tagged_receivers={None: receiver},
        per_element_output_counter=None,
        output_batch_converter=None,
        process_yields_batches=False,
        process_batch_yields_elements=False,
    )
    side_inputs = [
        SideInputMap(
            view.view_class,
            view.view_options,
            [get_windowed_value(value, view.window_fn) for value in values],
        )
        for view, values in zip(spec.views, side_values, strict=True)
    ]
    invoker = DoFnInvoker.create_invoker(
        DoFnSignature(fn),
        handler,
        context=DoFnContext(spec.label, state=None),
        side_inputs=side_inputs,
        input_args=args,
        input_kwargs=kwargs,
        user_state_context=None,
        bundle_finalizer_param=core.DoFn.BundleFinalizerParam(),
    )
    if new:
        invoker.invoke_setup()
    invoker.invoke_start_bundle()
    for element in elements:
        invoker.invoke_process(get_windowed_value(element, window_fn))
    invoker.invoke_finish_bundle()
    # Only a bundle that ended well gives its instance back; a failed one's
    # state is unknown, and dask retries the bundle with a fresh instance.
    pool.release(spec, instance)
    return receiver.values


@dataclasses.dataclass
class _BagVisitor(PipelineVisitor):
    """Translates each primitive transform into a dask bag, in pipeline order."""

    client: Any
    pool: str
    bag_kwargs: dict[str, Any]
    threads: int
    bags: dict[AppliedPTransform, Any] = dataclasses.field(default_factory=dict)
    consumed: set[AppliedPTransform] = dataclasses.field(default_factory=set)

    def visit_transform(self, node: AppliedPTransform) -> None:
        inputs = [self.bags[pcoll.producer] for pcoll in node.inputs if pcoll.producer]
        self.consumed.update(pcoll.producer for pcoll in node.inputs if pcoll.producer)
        transform = node.transform
        # Exact classes, as Beam's runner: its GroupByKey translation already
        # groups by window, so the _GroupAlsoByWindow ParDo (a subclass) is a no-op.
        if type(transform) is core.ParDo:
            self.bags[node] = self._par_do(node, inputs[0])
        elif isinstance(transform, _Create):
            self.bags[node] = self._create(transform.values)
        elif isinstance(transform, _Reshuffle):
            self.bags[node] = self._reshuffle(inputs[0])
        elif isinstance(transform, _GroupByKeyOnly):
            self.bags[node] = self._group_by_key(node, inputs[0])
        else:
            op_class: Any = TRANSLATIONS.get(type(transform), NoOp)
            if op_class is NoOp:
                # Structural transforms (windowing reified, reshuffle markers...).
                if not inputs:
                    raise ValueError(f"DaskRunner: {node.full_label} is not supported on Dask")
                self.bags[node] = inputs[0]
                return
            source = inputs if op_class is Flatten else (inputs[0] if inputs else None)
            op = op_class(node, bag_kwargs=self.bag_kwargs)
            self.bags[node] = op.apply(input_bag=source, side_inputs=None)

    def _par_do(self, node: AppliedPTransform, bag: Any) -> Any:
        transform: Any = node.transform
        if len(node.outputs) > 1:
            raise ValueError(
                f"DaskRunner: {node.full_label} has tagged outputs, which Dask would merge"
            )
        main: Any = next(iter(node.main_inputs.values()))
        window_fn = main.windowing.windowfn
        views, side_items = [], []
        for side in node.side_inputs:
            self.consumed.add(side.pvalue.producer)
            side_bag = self.bags[side.pvalue.producer]
            # A Delayed, not the Item: an Item argument brings its own copy of
            # the branch's graph, which dask then runs a second time.
            values = side_bag.reduction(list, _concat)
            side_items.append(values.to_delayed(optimize_graph=False))
            views.append(
                _SideInputView(type(side), side._view_options(), side.pvalue.windowing.windowfn)
            )
        payload = pickler.dumps((transform.fn, transform.args, transform.kwargs, window_fn))
        spec = _ParDoSpec(self.pool, node.full_label, payload, tuple(views))
        # One graph node holds the spec: inlined, it would be sent once per bundle.
        shared = dask.delayed(spec, name=f"spec-{uuid.uuid4().hex}")
        return bag.map_partitions(_run_bundle, shared, *side_items)

    def _group_by_key(self, node: AppliedPTransform, bag: Any) -> Any:
        # A task shuffle makes (partitions)^2 tasks: shuffle fewer, larger
        # partitions, then split the groups back into as many bundles as came in.
        partitions = bag.npartitions
        shuffled = min(partitions, max(self.threads, SHUFFLE_PARTITIONS))
        grouped = GroupByKey(node).apply(bag.repartition(npartitions=shuffled), side_inputs=None)
        return grouped.repartition(npartitions=partitions)

    def _create(self, values: Iterable[Any]) -> Any:
        # Beam's warns on every Create that its default partition size changed.
        values = list(values)
        npartitions = self.bag_kwargs.get("npartitions")
        if npartitions:
            return dask.bag.from_sequence(values, npartitions=npartitions)
        size = self.bag_kwargs.get("partition_size") or BUNDLE_ELEMENTS
        return dask.bag.from_sequence(values, partition_size=size)

    def _reshuffle(self, bag: Any) -> Any:
        # Materialized on the workers (persist: computed once, later stages
        # reuse it), so the element count can size the bundles.
        bag = self.client.persist(bag)
        count = self.client.compute(bag.count()).result()
        partitions = self.bag_kwargs.get("npartitions") or max(
            self.threads, math.ceil(count / BUNDLE_ELEMENTS)
        )
        return bag.repartition(npartitions=partitions)

    def leaves(self) -> list[Any]:
        """The bags nothing consumes: computing them runs the whole pipeline."""
        return [bag for node, bag in self.bags.items() if node not in self.consumed]


class DaskRunnerResult(beam_dask.DaskRunnerResult):
    """Waits for the job, then tears its DoFns down and closes the client."""

    pool: str = ""

    def wait_until_finish(self, duration: Any = None) -> str:
        try:
            return super().wait_until_finish(duration)
        finally:
            if self._state in (PipelineState.DONE, PipelineState.FAILED):
                self.close()

    def close(self) -> None:
        """Releases the job's DoFns on every worker and the connection (idempotent)."""
        if self.client.status != "running":
            return
        try:
            self.client.unregister_worker_plugin(self.pool)
        except Exception:  # the job's result stands; workers drop the DoFns when they stop
            logger.warning("could not tear the job's DoFns down on the workers", exc_info=True)
        finally:
            self.client.close()


class DaskRunner(beam_dask.DaskRunner):
    """Runs a pipeline on a ``dask.distributed`` cluster (module docstring: how it differs)."""

    def run_pipeline(self, pipeline: Any, options: Any) -> DaskRunnerResult:
        dask_options = options.view_as(beam_dask.DaskOptions).get_all_options(
            drop_default=True, current_only=True
        )
        bag_kwargs = beam_dask.DaskOptions._extract_bag_kwargs(dask_options)
        client = Client(**dask_options)
        pool = f"beam-dofns-{uuid.uuid4().hex}"
        try:
            client.register_plugin(DoFnPool(pool), name=pool)
            pipeline.replace_all(dask_overrides())
            threads = max(1, sum(client.nthreads().values()))
            visitor = _BagVisitor(client, pool, bag_kwargs, threads)
            pipeline.visit(visitor)
            # One collection, so dask optimizes one graph: computed as a list of
            # collections, each is optimized (fused) alone and shared stages run
            # once per collection. Nothing but completion comes back.
            done = dask.bag.concat([leaf.map_partitions(_nothing) for leaf in visitor.leaves()])
            futures = [client.compute(done)]
        except BaseException:
            client.close()
            raise
        result = DaskRunnerResult(client, futures)
        result.pool = pool
        return result
