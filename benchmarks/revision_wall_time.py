"""Wall time of the jobs, this tree's code against an earlier revision's, in alternating rounds.

The archive is the one of ``engine_wall_time.py`` (``xray-synth`` seed 0,
256-512 px, its transfer-syntax mix, cut to the first ``--images`` rows). The
two sides are:

* ``base``: ``--base REV`` (default ``92888b1``, the commit before the
  reorganization into packages), checked out with ``git worktree add
  --detach WORKDIR/base REV`` (reused when already there at that commit) and
  its C kernel (``_pixel_kernels``, git-ignored) built in place with
  ``python setup.py build_ext --inplace``;
* ``head``: this working tree, as it is (uncommitted edits included; the
  report counts them).

Every run is a subprocess with ``PYTHONPATH=<the side's tree>``, so the side's
packages shadow the editable install, and its working directory outside both
trees; its wall time is reported whole (interpreter, imports, the job):

* ``preprocess``: ``python -m beam_pipelines.preprocess --metadata CSV
  --output_dir WORKDIR/out/SIDE/pre`` (the default local runner);
* ``score``: ``python -m beam_pipelines.score --model MODEL --metadata CSV
  --output WORKDIR/out/SIDE/scores/archive``, with one tiny model trained
  once before the rounds with this tree (``trainer.train``, 1 epoch of 2
  steps of 8 images on a preprocessing of the archive that is not timed).

The machine may be shared and noisy, so the sides run in ``--rounds``
rounds, alternating which goes first (base, head; head, base; ...), and the
report gives every round, the medians and ``ratio`` (head median / base
median; above 1 is a slowdown). The reorganization promises the same bytes:
``identical`` says whether, in every round, each job's output files (all but
the ``.lock`` files and the jobs' logs) are the same on both sides, and ``differing`` names those
that are not.

    .venv/bin/python benchmarks/revision_wall_time.py --images 600 --rounds 3 > revision.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine_wall_time import _archive, _files  # this folder: run as a script

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
SIDES = ("base", "head")
JOBS = ("preprocess", "score")
# The compiled kernel, git-ignored: in beam_pipelines/dicom/ now, in beam_pipelines/ before.
KERNEL_GLOBS = ("beam_pipelines/dicom/_pixel_kernels*.so", "beam_pipelines/_pixel_kernels*.so")

# Run in a side's environment: where its packages and its kernel come from.
_PROBE = """
import importlib, json, sys
import beam_pipelines
loaded = None
if sys.argv[1]:
    try:
        loaded = importlib.import_module(sys.argv[1]).__file__
    except ImportError:
        pass
print(json.dumps({"package": beam_pipelines.__file__, "kernel_loaded": loaded}))
"""


def _git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout.strip()


def _env(tree: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), env.get("PYTHONPATH")]))
    return env


def _kernel(tree: Path) -> Path | None:
    """The compiled kernel in `tree` (relative), or None."""
    for pattern in KERNEL_GLOBS:
        found = sorted(tree.glob(pattern))
        if found:
            return found[0].relative_to(tree)
    return None


def _base_tree(workdir: Path, rev: str) -> Path:
    """WORKDIR/base: a detached worktree at `rev` with its kernel built."""
    commit = _git("rev-parse", "--verify", f"{rev}^{{commit}}")
    tree = workdir / "base"
    if tree.exists():
        present = _git("rev-parse", "HEAD", cwd=tree) if (tree / ".git").exists() else None
        if present != commit:
            logger.info("replacing the worktree %s (at %s, not %s)", tree, present, commit)
            if present is not None:
                _git("worktree", "remove", "--force", str(tree))
            shutil.rmtree(tree, ignore_errors=True)
    if not tree.exists():
        logger.info("git worktree add --detach %s %s", tree, rev)
        _git("worktree", "add", "--force", "--detach", str(tree), commit)
    if _kernel(tree) is None and (tree / "setup.py").exists():
        logger.info("building the C kernel in %s", tree)
        subprocess.run(
            [sys.executable, "setup.py", "build_ext", "--inplace"],
            cwd=tree,
            check=True,
            capture_output=True,
        )
    return tree


def _side(tree: Path, commit: str, cwd: Path) -> dict[str, Any]:
    """What a side runs: its tree, commit, kernel and where its imports really come from."""
    kernel = _kernel(tree)
    module = ".".join(kernel.with_suffix("").with_suffix("").parts) if kernel else ""
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, module],
        cwd=cwd,
        env=_env(tree),
        check=True,
        capture_output=True,
        text=True,
    )
    probe = json.loads(done.stdout)
    if not Path(probe["package"]).resolve().is_relative_to(tree):
        raise RuntimeError(f"beam_pipelines comes from {probe['package']}, not from {tree}")
    return {
        "tree": str(tree),
        "commit": commit,
        "kernel": str(kernel) if kernel else None,
        "kernel_loaded": probe["kernel_loaded"] is not None,
    }


def _timed(command: list[str], tree: Path, cwd: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=_env(tree), capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:3])} failed: {done.stderr[-2000:]}")
    return seconds


def _commands(job: str, metadata: Path, out: Path, model: Path) -> list[str]:
    if job == "preprocess":
        args = ["--metadata", str(metadata), "--output_dir", str(out / "pre")]
    else:
        args = ["--model", str(model), "--metadata", str(metadata)]
        args += ["--output", str(out / "scores" / "archive")]
    return [sys.executable, "-m", f"beam_pipelines.{job}", *args]


def _outputs(job: str, out: Path) -> dict[str, bytes]:
    files = _files(out / ("pre" if job == "preprocess" else "scores"))
    # Locks name their holder; a job's log (logs/<job>.log beside a scoring prefix) is no output.
    return {
        name: data
        for name, data in files.items()
        if not name.endswith(".lock") and not (name.startswith("logs/") and name.endswith(".log"))
    }


def _model(workdir: Path, metadata: Path, cwd: Path) -> Path:
    """A tiny model trained with this tree on the whole synthetic archive (once per size)."""
    root = workdir / "model" / metadata.stem
    model = root / "results" / "model"
    if model.exists():
        return model
    shutil.rmtree(root, ignore_errors=True)
    logger.info("training a tiny model in %s", root)
    # The whole synthetic archive: a few images may all be one patient's (no validation split).
    preprocess = _commands("preprocess", metadata.parent / "metadata.csv", root, model)
    _timed(preprocess, REPO, cwd)
    train = [sys.executable, "-m", "trainer.train", "--data_dir", str(root / "pre")]
    train += ["--output_dir", str(root / "results"), "--epochs", "1", "--steps_per_epoch", "2"]
    train += ["--global_batch_size", "8", "--verbose", "0"]
    _timed(train, REPO, cwd)
    return model


def _differing(left: dict[str, bytes], right: dict[str, bytes]) -> list[str]:
    return sorted(name for name in left.keys() | right.keys() if left.get(name) != right.get(name))


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Times the jobs on both sides; returns the JSON-ready report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--base", default="92888b1", help="the earlier revision (git rev)")
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "revision_wall_time",
        help="worktree, archive, model and outputs (default: %(default)s)",
    )
    parser.add_argument("--jobs", nargs="+", choices=JOBS, default=list(JOBS))
    args = parser.parse_args(argv)
    workdir = args.workdir.resolve()
    cwd = workdir / "cwd"  # outside both trees: nothing shadows their packages
    cwd.mkdir(parents=True, exist_ok=True)
    trees = {"base": _base_tree(workdir, args.base), "head": REPO}
    commits = {
        "base": _git("rev-parse", "HEAD", cwd=trees["base"]),
        "head": _git("rev-parse", "HEAD"),
    }
    sides = {name: _side(trees[name], commits[name], cwd) for name in SIDES}
    sides["base"] = {"rev": args.base, **sides["base"]}
    uncommitted = _git("status", "--porcelain", "--untracked-files=no").splitlines()
    sides["head"]["uncommitted_files"] = len(uncommitted)
    metadata = _archive(workdir, args.images)
    model = _model(workdir, metadata, cwd) if "score" in args.jobs else None

    jobs: dict[str, dict[str, Any]] = {
        job: {"rounds": [], "differing": set()} for job in JOBS if job in args.jobs
    }
    for index in range(args.rounds):
        order = list(SIDES) if index % 2 == 0 else list(reversed(SIDES))
        seconds: dict[str, dict[str, float]] = {job: {} for job in jobs}
        outputs: dict[str, dict[str, dict[str, bytes]]] = {job: {} for job in jobs}
        for side in order:
            out = workdir / "out" / side
            shutil.rmtree(out, ignore_errors=True)
            for job in jobs:
                logger.info("round %d: %s %s", index, side, job)
                command = _commands(job, metadata, out, model or Path())
                seconds[job][side] = round(_timed(command, trees[side], cwd), 2)
                outputs[job][side] = _outputs(job, out)
        for job, report in jobs.items():
            report["rounds"].append({"order": order, **seconds[job]})
            files = outputs[job]
            if not files["base"]:
                raise RuntimeError(f"{job} wrote no files")
            report["differing"].update(_differing(files["base"], files["head"]))

    for report in jobs.values():
        medians = {s: round(statistics.median(r[s] for r in report["rounds"]), 2) for s in SIDES}
        report["median_wall_seconds"] = medians
        report["ratio"] = round(medians["head"] / medians["base"], 3)
        report["differing"] = sorted(report["differing"])
        report["identical"] = not report["differing"]
    return {
        "machine": {"load_avg": os.getloadavg()},
        "settings": {
            "base": sides["base"],
            "head": sides["head"],
            "images": args.images,
            "rounds": args.rounds,
            "cores": len(os.sched_getaffinity(0)),
            "archive": str(metadata),
            "model": str(model) if model else None,
        },
        "jobs": {job: {key: report[key] for key in _KEYS} for job, report in jobs.items()},
    }


_KEYS = ("rounds", "median_wall_seconds", "ratio", "identical", "differing")


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: prints the report as JSON on stdout."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True
    )
    print(json.dumps(run(argv), indent=2))


if __name__ == "__main__":
    main()
