"""Mutation benchmark: do the tests notice when the folding math is broken?

A small self-contained mutation driver (mutmut's trampolines do not reach code that other
modules import by name, and it needs a full-suite run first). Each target file is parsed with
``ast``; every mutation site of the listed functions gives one mutant:

- arithmetic operator swap (+ <-> -, * <-> /, ** -> *, // -> /);
- comparison swap (< <-> <=, > <-> >=, == <-> !=, is <-> is not, in <-> not in);
- numeric constant c -> c + 1 (0.0 -> 1.0, 1e-12 -> 1.0 + 1e-12, ...), True <-> False;
- unary minus removed, ``not`` removed, ``and`` <-> ``or``;
- a reduction swapped: mean <-> sum, min <-> max, minimum <-> maximum, amin <-> amax;
- the two positional arguments of a call swapped;
- an expression statement or an augmented assignment removed (replaced by ``pass``);
- an ``if`` condition negated.

Each mutant runs its target's test subset (tests that exercise the file) in a forked child of
a process that has already imported torch, transformers and netfold, so a mutant costs the
tests' own time, not an interpreter start. The mutated module is executed into the module's
namespace and every name other netfold modules imported from it is rebound, so callers see
the mutant. A mutant is "killed" when the tests fail (or time out), "survived" when they pass.
Equivalent mutants (no observable change) are listed in ``EQUIVALENT`` with a reason each and
excluded from the kill rate.

Run from the repository root, in the background on a shared machine:

    PYTHONPATH=$PWD/src OMP_NUM_THREADS=1 nohup nice -n 10 .venv/bin/python \
        benchmarks/mutation.py > /tmp/mutation.log 2>&1 &

Options: ``--targets merge repair llm`` (default: all), ``--limit N`` (first N mutants of each
target, for a smoke run), ``--timeout-factor 5``, ``--out benchmarks/results/mutation.json``,
``--annotate`` (recompute the summary of an existing results file with the current
``EQUIVALENT`` list, without running anything).
"""

from __future__ import annotations

import argparse
import ast
import copy
import datetime as _dt
import importlib
import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from netfold.bench import meta

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Target:
    """One file under test: which module, which functions to mutate, which tests to run."""

    name: str
    module: str
    path: str
    functions: tuple[str, ...] | None  # None: every function in the file
    tests: tuple[str, ...]  # pytest arguments (node ids / files with -k)


TARGETS = {
    "merge": Target(
        "merge",
        "netfold.fold.merge",
        "src/netfold/fold/merge.py",
        None,
        (
            # one -k expression applies to every file given
            "tests/test_fold.py",
            "tests/test_baselines.py",
            "tests/test_trace.py",
            "-k",
            "merge_matches or group_features or planted_duplicates or negative_control "
            "or merge_matrices_rules or ifm_merges or unit_normalisation "
            "or ratio_zero_is_bit_identical and mlp "
            "or cat_of_same or crossing or grouped_conv_groups or grouped_conv_width",
        ),
    ),
    "repair": Target(
        "repair",
        "netfold.fold.repair",
        "src/netfold/fold/repair.py",
        None,
        ("tests/test_fold.py", "-k", "repair or collect_inputs or producer_stats"),
    ),
    "llm": Target(
        "llm",
        "netfold.fold.llm",
        "src/netfold/fold/llm.py",
        (
            "head_maps",
            "_heads",
            "_merge_rows",
            "_norm_fix",
            "merge_heads",
            "prune_heads",
            "merge_mlp",
            "prune_mlp",
            "mlp_hidden",
        ),
        (
            "tests/test_llm.py",
            "-k",
            "gqa or planted_duplicates or unplanted or magnitude_pruning or merge_mlp "
            "or merge_heads or prune_heads or repair_data_fits",
        ),
    ),
}

# (target, line, column, description) -> why the mutant cannot change any result
EQUIVALENT: dict[tuple[str, int, int, str], str] = {
    ("merge", 82, 16, "swap the arguments of promote_types"): ("torch.promote_types is symmetric"),
    ("merge", 120, 36, "swap the arguments of equal"): "torch.equal is symmetric",
    ("merge", 203, 16, "swap the arguments of minimum"): "torch.minimum is symmetric",
    ("llm", 207, 16, "swap the arguments of minimum"): "torch.minimum is symmetric",
    ("llm", 308, 8, "swap the arguments of minimum"): "torch.minimum is symmetric",
    ("llm", 223, 28, "Gt -> GtE (#0)"): (
        "den > 1e-20 vs den >= 1e-20 differ only when a sum of squares equals 1e-20 exactly"
    ),
    ("merge", 145, 46, "1.0 -> 2.0"): (
        "clamp_min(2.0) of N (N - 1): only clusters with N >= 2 use the value (torch.where), "
        "and there N (N - 1) >= 2 already"
    ),
    ("merge", 146, 23, "Gt -> GtE (#0)"): (
        "a singleton's mean cosine only enters ar_scale, where N = 1 gives sqrt(1 / 1) = 1 "
        "whatever the cosine"
    ),
    ("merge", 156, 47, "1.0 -> 2.0"): (
        "a mean cosine similarity never exceeds 1 (beyond rounding), so the upper clamp at 1 "
        "or 2 leaves it unchanged"
    ),
}

SWAP_BIN = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.Div,
    ast.Div: ast.Mult,
    ast.Pow: ast.Mult,
    ast.FloorDiv: ast.Div,
}
SWAP_CMP = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
}
SWAP_NAME = {
    "mean": "sum",
    "sum": "mean",
    "min": "max",
    "max": "min",
    "minimum": "maximum",
    "maximum": "minimum",
    "amin": "amax",
    "amax": "amin",
    "clamp_min": "clamp_max",
}


@dataclass
class Site:
    idx: int
    line: int
    col: int
    desc: str


class _Mutator(ast.NodeTransformer):
    """Walks the tree in a fixed order; counts sites, and applies the one with ``apply``."""

    def __init__(self, functions: tuple[str, ...] | None, apply: int = -1) -> None:
        self.functions = functions
        self.apply = apply
        self.sites: list[Site] = []
        self._in = 0

    def _site(self, node: ast.AST, desc: str) -> bool:
        if self._in == 0:
            return False
        line, col = getattr(node, "lineno", 0), getattr(node, "col_offset", 0)
        self.sites.append(Site(len(self.sites), line, col, desc))
        return self.sites[-1].idx == self.apply

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.AST:
        inside = self.functions is None or node.name in self.functions
        self._in += inside
        # skip the docstring
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            node.body = [body[0]] + [self.visit(s) for s in body[1:]]
        else:
            node.body = [self.visit(s) for s in body]
        node.decorator_list = node.decorator_list  # decorators/annotations: never mutated
        self._in -= inside
        return node

    def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
        self.generic_visit(node)
        new = SWAP_BIN.get(type(node.op))
        if new and self._site(node, f"{type(node.op).__name__} -> {new.__name__}"):
            node.op = new()
        return node

    def visit_AugAssign(self, node: ast.AugAssign) -> ast.AST:
        self.generic_visit(node)
        new = SWAP_BIN.get(type(node.op))
        if new and self._site(node, f"augmented {type(node.op).__name__} -> {new.__name__}"):
            node.op = new()
        if self._site(node, "remove augmented assignment"):
            return ast.Pass()
        return node

    def visit_Compare(self, node: ast.Compare) -> ast.AST:
        self.generic_visit(node)
        for i, op in enumerate(node.ops):
            new = SWAP_CMP.get(type(op))
            if new and self._site(node, f"{type(op).__name__} -> {new.__name__} (#{i})"):
                node.ops[i] = new()
        return node

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        v = node.value
        if isinstance(v, bool):
            if self._site(node, f"{v} -> {not v}"):
                return ast.Constant(not v)
        elif isinstance(v, (int, float)):
            if self._site(node, f"{v!r} -> {v + 1!r}"):
                return ast.Constant(v + 1)
        return node

    def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node.op, ast.USub) and self._site(node, "remove unary minus"):
            return node.operand
        if isinstance(node.op, ast.Not) and self._site(node, "remove not"):
            return node.operand
        return node

    def visit_BoolOp(self, node: ast.BoolOp) -> ast.AST:
        self.generic_visit(node)
        new = ast.Or if isinstance(node.op, ast.And) else ast.And
        if self._site(node, f"{type(node.op).__name__} -> {new.__name__}"):
            node.op = new()
        return node

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        f = node.func
        attr = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
        if attr in SWAP_NAME and self._site(node, f"{attr} -> {SWAP_NAME[attr]}"):
            if isinstance(f, ast.Attribute):
                f.attr = SWAP_NAME[attr]
            else:
                f.id = SWAP_NAME[attr]
        if (
            len(node.args) == 2
            and not any(isinstance(a, ast.Starred) for a in node.args)
            and ast.dump(node.args[0]) != ast.dump(node.args[1])
            and self._site(node, f"swap the arguments of {attr or 'call'}")
        ):
            node.args = [node.args[1], node.args[0]]
        return node

    def visit_Expr(self, node: ast.Expr) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node.value, ast.Call) and self._site(node, "remove call statement"):
            return ast.Pass()
        return node

    def visit_If(self, node: ast.If) -> ast.AST:
        self.generic_visit(node)
        if self._site(node, "negate if condition"):
            node.test = ast.UnaryOp(ast.Not(), node.test)
        return node


def sites_of(target: Target) -> tuple[ast.Module, list[Site]]:
    tree = ast.parse((ROOT / target.path).read_text())
    m = _Mutator(target.functions)
    m.visit(copy.deepcopy(tree))
    return tree, m.sites


def mutant_source(tree: ast.Module, target: Target, idx: int) -> str:
    m = _Mutator(target.functions, apply=idx)
    new = ast.fix_missing_locations(m.visit(copy.deepcopy(tree)))
    return ast.unparse(new)


def _install(module_name: str, source: str) -> None:
    """Execute ``source`` into the live module and rebind names other modules imported."""
    mod = importlib.import_module(module_name)
    old = dict(vars(mod))
    exec(compile(source, mod.__file__, "exec"), vars(mod))
    new = vars(mod)
    # id of a replaced object -> (the old object, its replacement)
    moved = {id(v): (v, new[k]) for k, v in old.items() if k in new and new[k] is not v}
    for other in list(sys.modules.values()):
        name = getattr(other, "__name__", "") or ""
        if other is mod or not name.startswith(("netfold", "test_")):
            continue
        for k, v in list(vars(other).items()):
            hit = moved.get(id(v))
            if hit is not None and hit[0] is v:
                setattr(other, k, hit[1])


def run_tests(target: Target, source: str | None, timeout: float) -> tuple[str, float]:
    """Fork, install ``source`` (None: unmutated), run the tests; ("killed"|"survived"|
    "timeout", seconds)."""
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # child
        code = 3
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            os.environ["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # no entry-point plugins: faster
            if source is not None:
                _install(target.module, source)
            import pytest

            code = int(pytest.main(["-x", "-q", "-p", "no:cacheprovider", *target.tests]))
        except BaseException:  # any crash while installing or testing counts as a failure
            code = 4
        os._exit(code)
    deadline = t0 + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            rc = os.waitstatus_to_exitcode(status)
            return ("survived" if rc == 0 else "killed"), time.perf_counter() - t0
        if time.perf_counter() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timeout", time.perf_counter() - t0
        time.sleep(0.05)


def summarise(results: list[dict]) -> dict:
    out: dict = {}
    for name in sorted({r["target"] for r in results}) + ["all"]:
        rs = [r for r in results if name in ("all", r["target"])]
        eq = [r for r in rs if (r["target"], r["line"], r["col"], r["desc"]) in EQUIVALENT]
        live = [r for r in rs if r not in eq]
        killed = sum(r["status"] in ("killed", "timeout") for r in live)
        out[name] = {
            "mutants": len(rs),
            "equivalent": len(eq),
            "killed": killed,
            "survived": len(live) - killed,
            "kill_rate": round(killed / len(live), 4) if live else None,
        }
    return out


def annotate(results: list[dict]) -> None:
    for r in results:
        key = (r["target"], r["line"], r["col"], r["desc"])
        r["equivalent"] = EQUIVALENT.get(key)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--timeout-factor", type=float, default=5.0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/mutation.json")
    ap.add_argument("--annotate", action="store_true")
    ap.add_argument(
        "--rerun",
        nargs="+",
        default=None,
        metavar="LINE",
        help="re-run only the mutants on these lines of the single --targets file and update "
        "their entries in --out (after a test was added)",
    )
    args = ap.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if args.timeout_factor <= 1:
        raise ValueError(f"--timeout-factor must be > 1, got {args.timeout_factor}")
    if args.annotate:
        data = json.loads(args.out.read_text())
        annotate(data["mutants"])
        data["summary"] = summarise(data["mutants"])
        args.out.write_text(json.dumps(data, indent=1) + "\n")
        print(json.dumps(data["summary"], indent=1))
        return 0

    os.chdir(ROOT)
    import pytest  # noqa: F401
    import torch  # noqa: F401  (imported once, before forking)
    import transformers  # noqa: F401

    for t in args.targets:
        importlib.import_module(TARGETS[t].module)
    importlib.import_module("netfold")
    # the test modules too, under the names pytest gives them (rootdir-relative basenames): a
    # child then only runs the tests (imported names from the target are rebound by _install)
    for t in args.targets:
        for arg in TARGETS[t].tests:
            if arg.startswith("tests/"):
                _import_test_module(ROOT / arg.split("::")[0])
    t_start = time.perf_counter()
    results: list[dict] = []
    baselines: dict[str, float] = {}

    def write(complete: bool) -> dict:
        annotate(results)
        info = {
            "command": "PYTHONPATH=$PWD/src OMP_NUM_THREADS=1 nice -n 10 python "
            "benchmarks/mutation.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "complete": complete,
            "git_revision": meta.git_revision(),
            "machine": meta.machine(),
            "wall_s": round(time.perf_counter() - t_start, 1),
            "baseline_test_s": baselines,
            "targets": {
                n: {
                    "file": TARGETS[n].path,
                    "functions": TARGETS[n].functions,
                    "tests": list(TARGETS[n].tests),
                }
                for n in args.targets
            },
            "summary": summarise(results),
            "mutants": results,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(info, indent=1) + "\n")
        tmp.replace(args.out)  # atomic: a reader never sees a half-written file
        return info

    if args.rerun:
        if len(args.targets) != 1:
            raise ValueError("--rerun needs exactly one --targets name")
        lines = {int(v) for v in args.rerun}
        old = json.loads(args.out.read_text())
        keep = [
            r for r in old["mutants"] if not (r["target"] == args.targets[0] and r["line"] in lines)
        ]
    for name in args.targets:
        target = TARGETS[name]
        status, secs = run_tests(target, None, timeout=1800)
        if status != "survived":
            raise SystemExit(f"{name}: the unmutated tests fail ({status}); fix them first")
        baselines[name] = round(secs, 2)
        tree, sites = sites_of(target)
        if args.limit:
            sites = sites[: args.limit]
        if args.rerun:
            sites = [s for s in sites if s.line in lines]
        print(f"{name}: {len(sites)} mutants, baseline {secs:.1f} s", flush=True)
        for s in sites:
            src = mutant_source(tree, target, s.idx)
            status, secs2 = run_tests(target, src, timeout=max(20.0, args.timeout_factor * secs))
            results.append(
                asdict(s) | {"target": name, "status": status, "seconds": round(secs2, 2)}
            )
            print(f"  {name}:{s.line}:{s.col} {s.desc}: {status} ({secs2:.1f} s)", flush=True)
            if len(results) % 10 == 0 and not args.rerun:
                write(complete=False)
    if args.rerun:  # merge into the earlier run's file, in site order
        rerun = results[:]
        results[:] = sorted(
            keep + rerun, key=lambda r: (list(TARGETS).index(r["target"]), r["idx"])
        )
        old["mutants"] = results
        old["summary"] = summarise(results)
        name = args.targets[0]
        old["targets"][name]["tests"] = list(TARGETS[name].tests)  # the selection now in use
        old.setdefault("reruns", []).append(
            {
                "target": name,
                "lines": sorted(lines),
                "mutants": len(rerun),
                "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            }
        )
        annotate(results)
        args.out.write_text(json.dumps(old, indent=1) + "\n")
        print(json.dumps(old["summary"], indent=1))
        return 0
    info = write(complete=True)
    print(json.dumps(info["summary"], indent=1))
    return 0


def _import_test_module(path: Path) -> None:
    """Import ``tests/NAME.py`` as module ``NAME`` (the name pytest gives it), without putting
    tests/ on sys.path; a sibling test module it imports (``from test_trace import ...``) is
    imported the same way first."""
    import importlib.util

    name = path.stem
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except ModuleNotFoundError as e:
        del sys.modules[name]
        dep = path.parent / f"{e.name}.py"
        if e.name == name or not dep.is_file():
            raise
        _import_test_module(dep)
        _import_test_module(path)


if __name__ == "__main__":
    raise SystemExit(main())
