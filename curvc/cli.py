"""The ``curvc`` command: compile, check, explain, table, analyze, list, coverage.

User mistakes print a compiler-style message (file:line:col, the line, a
caret) and exit 1; they never show a Python traceback.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from curvc import cache, compiler, explain as explain_mod, resources, routing, routing_emit
from curvc.backends import BACKENDS
from curvc.errors import CurvError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="curvc: compile optimizer specs (Table 1 of the unified curvature view) "
                       "into torch.optim optimizers.")


def _message(err: Exception) -> str:
    """One line (or a compiler-style block) for the user; never a traceback."""
    if isinstance(err, CurvError):
        return str(err)
    if isinstance(err, OSError):  # compiler turns its own into CurvErrors; a safety net
        where = f"{err.filename}: " if err.filename else ""
        return f"error: {where}{cache.os_reason(err)}"
    return f"error: {err}"


def _fail(err: Exception) -> None:
    typer.echo(_message(err), err=True)
    raise typer.Exit(1)


def _for_each(specs: List[str], run) -> None:
    """Run ``run`` on every spec, print its output or its error; exit 1 if any failed."""
    failed = False
    for spec in specs:
        try:
            typer.echo(run(spec))
        except (CurvError, OSError) as e:
            typer.echo(_message(e), err=True)
            failed = True
    if failed:
        raise typer.Exit(1)


@app.command("compile")
def compile_cmd(
    specs: List[str] = typer.Argument(..., help="spec files, or names of shipped specs"),
    out: Path = typer.Option(Path("build"), "-o", "--out", help="output folder"),
    backend: str = typer.Option("auto", "--backend", help="auto | torch | triton"),
    dump: Optional[str] = typer.Option(None, "--dump",
                                       help="print the program after a stage instead: "
                                            + " | ".join(compiler.STAGES)),
) -> None:
    """Compile specs into Python modules (OUT/<stem>.py, each with one Optimizer class)."""
    if backend not in BACKENDS:
        _fail(CurvError("codegen.unknown_backend", name=backend, allowed=", ".join(BACKENDS)))
    def one(spec: str) -> str:
        if dump:
            return compiler.dump(*compiler.read(spec), dump, backend)
        return f"wrote {compiler.compile_file(spec, out, backend)}"

    _for_each(specs, one)


@app.command()
def check(specs: List[str] = typer.Argument(..., help="spec files or shipped names")) -> None:
    """Parse and check specs; report every error."""
    def one(spec: str) -> str:
        source, file = compiler.read(spec)
        return f"{file}: ok ({compiler.to_ir(source, file).name})"

    _for_each(specs, one)


@app.command()
def explain(spec: str = typer.Argument(..., help="a spec file or shipped name")) -> None:
    """Print the spec's row of Table 1 and its update equations."""
    try:
        source, file = compiler.read(spec)
        # a spec compile refuses still has equations: the refusal message points here
        opt = compiler.to_ir(source, file, compilable=False)
        text = routing_emit.explain_routed(opt) if routing.is_routed(opt) else \
            explain_mod.explain(opt)
        typer.echo(text, nl=False)
    except (CurvError, OSError) as e:
        _fail(e)


def _description(text: str) -> str:
    """A spec's one-line description: the first sentence of its leading comment."""
    words = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("#"):
            break
        words.append(line.lstrip("#").strip())
    first = " ".join(w for w in words if w)
    end = first.find(". ")
    first = first if end < 0 else first[:end + 1]
    if len(first) > 90:  # one line in a terminal
        first = first[:87].rsplit(" ", 1)[0].rstrip(",;:") + "..."
    return first


@app.command("list")
def list_cmd() -> None:
    """Every shipped spec: its name for curvc.load, class, description and row of Table 1."""
    for name in compiler.available():
        source, file = compiler.read(name)
        opt = compiler.to_ir(source, file)
        typer.echo(f"{name:<34}{opt.name:<26}{_description(source)}")
        rows = routing_emit.table_rows(opt) if routing.is_routed(opt) else \
            [(None, explain_mod.table_row(opt))]
        for label, row in rows:  # a routed spec: one row per pipeline
            # Table 1's cells, '-' where the paper leaves one empty (Newton's row is all '-')
            cells = "; ".join(f"{c.split()[0].lower()}: {row[c] or '-'}"
                              for c in explain_mod.TABLE_COLUMNS)
            typer.echo(f"{'':<34}{label + ': ' if label else ''}{cells}")


@app.command("coverage")
def coverage_cmd() -> None:
    """How much of the language compiles: every curvature x structure x iterate x length x
    clip form, accepted or refused, by which rule."""
    from curvc import coverage  # its own import: the other commands do not need it
    typer.echo(coverage.report())


def _version(value: bool) -> None:
    if value:
        from curvc.version import __version__
        typer.echo(f"curvc {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                          help="print curvc's version and exit")) -> None:
    """curvc: compile optimizer specs (Table 1 of the unified curvature view) into
    torch.optim optimizers."""


@app.command()
def table(markdown: bool = typer.Option(False, "--markdown", help="a Markdown table")) -> None:
    """The paper's Table 1, regenerated from the shipped specs."""
    rows = []
    order = {n: i for i, n in enumerate(explain_mod.PAPER_ORDER)}
    for name, path in resources.shipped_specs().items():
        opt = compiler.to_ir(*compiler.read(path))
        # the paper's order, then its other variants, then the hybrids
        key = (path.parent.name == "hybrids", order.get(opt.name, len(order)), opt.name)
        if routing.is_routed(opt):  # a row per pipeline: MuonAdamW/muon, MuonAdamW/adamw
            rows += [((*key, i), label, row)
                     for i, (label, row) in enumerate(routing_emit.table_rows(opt))]
            continue
        rows.append((key, opt.name, explain_mod.table_row(opt)))
    rows = [(n, r) for _, n, r in sorted(rows, key=lambda x: x[0])]
    cols = ("Optimizer",) + explain_mod.TABLE_COLUMNS
    cells = [[n] + [r[c] or "-" for c in explain_mod.TABLE_COLUMNS] for n, r in rows]
    if markdown:
        typer.echo("| " + " | ".join(cols) + " |")
        typer.echo("|" + "---|" * len(cols))
        for row in cells:
            typer.echo("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
        return
    widths = [max(len(x) for x in col) for col in zip(cols, *cells)]
    for row in [list(cols), ["-" * w for w in widths]] + cells:
        typer.echo("  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip())


@app.command()
def analyze(
    specs: List[str] = typer.Argument(..., help="spec files or shipped names"),
    problem: str = typer.Option("quadratic:n=50,cond=1e4", "--problem",
                                help="quadratic:n=50,cond=1e4[,seed=0] or mlp:digits[,hidden=16]"),
    batch: Optional[int] = typer.Option(None, "--batch", help="also the minibatch noise (N_b) "
                                        "over batches of this size"),
    samples: int = typer.Option(32, "--samples", help="minibatches drawn for --batch"),
    top: Optional[int] = typer.Option(None, "--top", help="only the top K eigenpairs of H, by "
                                      "Lanczos (the default above 3,000 parameters: 32)"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="write Delta_d^i and ||d_i||_H^2 "
                                        "against the eigenvalues to this PNG"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of tables"),
) -> None:
    """The paper's one-step analysis: what each spec's first step does to the local model."""
    from curvc import analyze as analyze_mod
    try:
        prob = analyze_mod.problem(problem)
        results = analyze_mod.analyze_all(specs, prob, top=top, batch=batch, samples=samples)
        if plot is not None:
            analyze_mod.plot(results, str(plot), prob)
    except (CurvError, FileNotFoundError, ValueError, RuntimeError, TypeError, OSError) as e:
        _fail(e)
    typer.echo(analyze_mod.to_json(results, prob) if as_json
               else analyze_mod.table(results, prob, batch))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
