"""Plumbing the benchmarks share: which labelled cases a run takes, one method's results on them, and a cache of
each case's forward process.

Every benchmark that scores cases picks them the same way (a data folder, optionally the cases of named splits of
a prepared data set, optionally listed ids) and, where it compares decision rules or settings on one forward
process, keeps that process on disk with ``prepared_forward`` so the comparison can be run again without the
network. The cache holds pickles made by this code for these scripts only: never point it at files from elsewhere.
"""

from __future__ import annotations

import argparse
import pickle
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from anofpdm.arguments import comma_list
from anofpdm.data.brats import CaseFiles, find_cases
from anofpdm.evaluation.case_scoring import EvaluationCase, prepare_case
from anofpdm.evaluation.evaluate import split_case_ids
from anofpdm.evaluation.methods import EvaluationSettings, run_method
from anofpdm.method.model import LoadedModel, NetworkConfig, load_model
from anofpdm.method.periventricular import PERIVENTRICULAR_FINDINGS
from anofpdm.method.pipeline import ForwardOutputs, InferenceOptions, SegmentationResult, run_forward

T = TypeVar("T")


def select_cases(
    data: Path, prepared: Path | None = None, splits: Sequence[str] = (), case_ids: Sequence[str] | None = None
) -> list[CaseFiles]:
    """The cases under ``data``, in order: those of ``splits`` of ``prepared`` when given, then ``case_ids``."""
    cases = find_cases(data)
    if prepared is not None and splits:
        wanted = {case for split in splits for case in split_case_ids(prepared, split)}
        cases = [files for files in cases if files.case_id in wanted]
    if case_ids:
        cases = [files for files in cases if files.case_id in set(case_ids)]
    return cases


def readable_cases(cases: Sequence[CaseFiles], config: NetworkConfig) -> Iterator[EvaluationCase]:
    """Each case prepared for ``config``; an unreadable or invalid one is reported and left out, as evaluate does."""
    for files in cases:
        try:
            yield prepare_case(files, config)
        except ValueError as exc:
            print(f"{files.case_id} left out: {exc}", flush=True)


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a benchmark that looks at one method's masks on labelled cases (``method_results``)."""
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", type=Path, required=True, help="labelled cases (BraTS layout, synth folders)")
    parser.add_argument("--cases", type=comma_list, help="only these case ids")
    parser.add_argument("--method", default="anofpdm-volume-fast")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--periventricular-findings", choices=PERIVENTRICULAR_FINDINGS,
                        default=EvaluationSettings.periventricular_findings,
                        help="leave the periventricular findings out of the masks (the default) or keep them")


def method_results(args: argparse.Namespace) -> Iterator[tuple[EvaluationCase, SegmentationResult]]:
    """Each readable case ``add_method_arguments``'s options name, with the method's result as ``anofpdm evaluate``
    gets it."""
    model = load_model(args.model)
    settings = EvaluationSettings(batch_size=args.batch_size, periventricular_findings=args.periventricular_findings)
    for case in readable_cases(select_cases(args.data, case_ids=args.cases), model.config):
        yield case, run_method(args.method, model, case, settings)


def cached(cache: Path | None, compute: Callable[[], T]) -> T:
    """``compute()``, kept in ``cache`` (a file path; None: not kept) and read from there when it holds it."""
    if cache is not None and cache.is_file():
        return pickle.loads(cache.read_bytes())
    value = compute()
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_bytes(pickle.dumps(value))
    return value


def prepared_forward(
    files: CaseFiles, model: LoadedModel, options: InferenceOptions, cache: Path | None
) -> tuple[EvaluationCase, ForwardOutputs]:
    """A case and its forward process, from ``cache`` (a file path) when it holds them, else computed and stored."""

    def compute() -> tuple[EvaluationCase, ForwardOutputs]:
        case = prepare_case(files, model.config)
        return case, run_forward(model, case.images, options)

    return cached(cache, compute)


def add_forward_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a benchmark that scores settings on one forward process per labelled case (``forward_cases``)."""
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="labelled cases (BraTS layout)")
    parser.add_argument("--prepared", type=Path, help="prepared slices whose --split names the cases (default: all)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--max-cases", type=int, help="the first N cases in case-id order (as evaluate's)")
    parser.add_argument("--mode", default="fast")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default=None)
    parser.add_argument("--cache", type=Path, help="folder for each case's forward process")


def forward_cases(
    args: argparse.Namespace, model: LoadedModel, options: InferenceOptions
) -> Iterator[tuple[EvaluationCase, ForwardOutputs]]:
    """Each case ``add_forward_arguments``'s options name, with its forward process (kept in ``--cache``); an
    unreadable or invalid case is reported and left out, as evaluate does."""
    for files in select_cases(args.data, args.prepared, [args.split])[:args.max_cases]:
        cache = None if args.cache is None else args.cache / f"{files.case_id}.{options.mode}.pkl"
        try:
            case, outputs = prepared_forward(files, model, options, cache)
        except ValueError as exc:
            print(f"{files.case_id} left out: {exc}", flush=True)
            continue
        yield case, outputs
