"""Issue 10.4: one error path for the whole CLI.

``test_every_command_fails_in_one_line`` walks every command of the Typer app (introspected, so a new
command is covered without editing this file) and runs it with a broken input of each class that applies to
it: the registry (damaged file, missing driver, unknown dialect, bad URL, missing), model directories
(garbage or truncated weights, bad config, missing tokenizer, weights that do not fit the config, missing),
outputs (read-only or impossible locations) and missing input files. Each must exit non-zero with one line,
no traceback. ``test_every_hinted_option_exists`` collects every ``--flag`` and ``patchlab CMD`` that an
error message or hint in the source names and checks it against the app's real options and commands.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from cli.app import app

ROOT = Path(__file__).resolve().parents[2]
CLI = typer.main.get_command(app)


def leaf_commands(cmd=CLI, path=()):
    if hasattr(cmd, "commands"):
        for name, sub in cmd.commands.items():
            yield from leaf_commands(sub, (*path, name))
    else:
        yield path, cmd


COMMANDS = dict(leaf_commands())
MODEL_ARGS = {"base", "target", "finetuned", "model", "args"}  # arguments that name a model directory
OUT_ARGS = {"out"}
OUT_OPTS = {"--output"}
REF_ARGS = {"ref", "patch", "old", "new"}
# commands whose first act is to open the registry: a broken one must be what their error names
REGISTRY_COMMANDS = {
    ("init",), ("ls",), ("show",), ("log",), ("path",), ("rm",), ("gc",), ("verify",), ("base", "refresh"),
    ("alias", "set"), ("alias", "rm"), ("alias", "ls"), ("tag", "add"), ("tag", "rm"), ("evals", "ls"),
    ("evals", "show"), ("apply",), ("port",), ("diff",),
}  # fmt: skip
LOADERS = {"eval", "tuco", "report", "demo"}  # commands that load a transformers model
LOADING_ONLY = {"bad config", "missing tokenizer", "shape mismatch"}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from tests.factory import make_model

    tmp = tmp_path_factory.mktemp("errpath")
    base = make_model(tmp / "v1")
    ft = make_model(tmp / "ft", from_model=base, noise=0.02, seed=1)
    runner = CliRunner()
    home = tmp / "home"
    for args in (
        ["init"],
        ["base", "add", "tiny@v1", str(base)],
        ["diff", "tiny@v1", str(ft), str(tmp / "p"), "--name", "task"],
    ):
        r = runner.invoke(app, ["-R", str(home), *args])
        assert r.exit_code == 0, r.output
    (tmp / "task.jsonl").write_text(json.dumps({"id": "q1", "type": "generation", "prompt": "a", "answer": "b"}) + "\n")
    (tmp / "prompts.txt").write_text("hello there\n")
    (tmp / "afile").write_text("x")
    broken = tmp / "broken"
    weights = (base / "model.safetensors").read_bytes()

    def model(name: str, mutate) -> Path:
        d = broken / name
        d.mkdir(parents=True)
        for f in base.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        mutate(d)
        return d

    models = {
        "garbage weights": model("garbage", lambda d: (d / "model.safetensors").write_bytes(b"\x00garbage" * 64)),
        "truncated weights": model("trunc", lambda d: (d / "model.safetensors").write_bytes(weights[:-200])),
        "bad config": model("badcfg", lambda d: (d / "config.json").write_text("{not json")),
        "missing tokenizer": model(
            "notok", lambda d: [p.unlink() for p in d.iterdir() if p.name.startswith(("tokenizer", "special_"))]
        ),
        "shape mismatch": model(
            "shape",
            lambda d: (d / "config.json").write_text(
                json.dumps({**json.loads((d / "config.json").read_text()), "hidden_size": 64})
            ),
        ),
        "missing model": broken / "nothing-here",
    }
    bad_db = tmp / "bad.db"
    bad_db.write_bytes(b"this is not a database" * 100)
    registries = {
        "damaged database": str(bad_db),
        "missing driver": "postgresql+psycopg2://u:p@127.0.0.1:9/db",
        "unknown dialect": "nosuchdb://u@h/db",
        "bad URL": "postgresql://u@h:notaport/db",
        "missing registry": str(tmp / "no-registry-here-{k}"),
    }
    outputs = {
        "read-only location": "/proc/patchlab-out",
        "under a file": str(tmp / "afile" / "out"),
    }
    return {"tmp": tmp, "home": str(home), "base": base, "ft": ft, "models": models, "registries": registries,
            "outputs": outputs}  # fmt: skip


def good_args(path: tuple[str, ...], cmd, env, k: int) -> tuple[list[str], dict[str, int]]:
    """Arguments that name real things, and where each kind of argument sits (for the broken variants)."""
    tmp = env["tmp"]
    values = {
        "ref": "task", "patch": "task", "target": "tiny@v1", "base": "tiny@v1", "finetuned": str(env["ft"]),
        "model": "tiny@v1", "out": str(tmp / f"out-{'-'.join(path)}-{k}"), "path": str(tmp / "p"),
        "adapter": str(tmp / "p"), "tasks": str(tmp / "task.jsonl"), "result": str(tmp / "task.jsonl"),
        "evaluation_id": "1", "alias": "prod", "tags": "x", "old": str(tmp / "task.jsonl"),
        "new": str(tmp / "task.jsonl"), "args": str(env["ft"]),
    }  # fmt: skip
    if path == ("base", "add"):
        values["ref"] = f"tiny@err{k}"
    if path == ("import-peft",):
        values["base"] = str(env["base"])
    args, where = [], {}
    for p in cmd.params:
        if p.param_type_name == "argument":
            where[p.name] = len(args)
            args.append(values.get(p.name) or _by_type(p))
    for p in cmd.params:  # a command added later: its required options get plausible values too
        if p.param_type_name == "option" and p.required and p.name not in ("registry",):
            args += [p.opts[0], values.get(p.name) or _by_type(p)]
    return args, where


def _by_type(p) -> str:
    name = getattr(getattr(p, "type", None), "name", "")
    return {"integer": "1", "float": "0.5"}.get(name, "x")


def invocations(path, cmd, env):
    """(class, argv) pairs: each broken input class that applies to this command."""
    opts = {o for p in cmd.params if p.param_type_name == "option" for o in p.opts}
    k = 0
    names = [p.name for p in cmd.params if p.param_type_name == "argument"]
    extra = []
    if "--prompts" in opts:
        extra += ["--prompts", str(env["tmp"] / "prompts.txt")]
    if "--eval" in opts:
        extra += ["--eval", str(env["tmp"] / "task.jsonl")]
    if "--registry" in opts:
        for what, reg in env["registries"].items():
            if path == ("init",) and what == "missing registry":
                continue  # init makes it
            k += 1
            args, _ = good_args(path, cmd, env, k)
            yield f"registry: {what}", [*path, *args, *extra, "--registry", reg.format(k=k)]
    model_args = [n for n in names if n in MODEL_ARGS] + (["--base"] if path == ("export-peft",) else [])
    for what, mdir in env["models"].items():
        if what in LOADING_ONLY and path[0] not in LOADERS:
            continue  # commands that stream weights read neither the tokenizer nor the model class
        for n in model_args:
            if path == ("tuco",) and n == "base" and what == "missing tokenizer":
                continue  # TuCo reads prompts with the fine-tune's tokenizer only
            k += 1
            args, where = good_args(path, cmd, env, k)
            more = list(extra)
            if n == "--base":
                more += ["--base", str(mdir)]
            else:
                args[where[n]] = str(mdir)
            yield (
                f"model ({n}): {what}",
                [*path, *args, *more, "--registry", env["home"]][: None if "--registry" in opts else -2],
            )
    outs = [n for n in names if n in OUT_ARGS]
    for what, out in env["outputs"].items():
        for n in outs:
            k += 1
            args, where = good_args(path, cmd, env, k)
            args[where[n]] = out
            reg = ["--registry", env["home"]] if "--registry" in opts else []
            yield f"output: {what}", [*path, *args, *extra, *reg]
        if OUT_OPTS & opts and path == ("report",):
            k += 1
            args, _ = good_args(path, cmd, env, k)
            yield f"output -o: {what}", [*path, *args, "-o", out, "--registry", env["home"]]
    for n in names:
        if n in ("path", "tasks", "result", "old", "new", "adapter", "finetuned", "model"):
            k += 1
            args, where = good_args(path, cmd, env, k)
            args[where[n]] = str(env["tmp"] / "missing" / n)
            reg = ["--registry", env["home"]] if "--registry" in opts else []
            yield f"missing input ({n})", [*path, *args, *extra, *reg]
    if any(n in REF_ARGS for n in names) and "--registry" in opts and path != ("base", "add"):
        k += 1
        args, where = good_args(path, cmd, env, k)
        for n in names:
            if n in REF_ARGS:
                args[where[n]] = "nosuchthing@9"
        yield "unknown reference", [*path, *args, *extra, "--registry", env["home"]]


def test_every_command_is_walked():
    """The walk covers every command of the app (a new command is picked up by introspection)."""
    assert {"diff", "apply", "port", "report", "eval", "tuco", "rm", "gc", "verify"} <= {p[0] for p in COMMANDS}


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=lambda p: "-".join(p))
def test_every_command_fails_in_one_line(path, env, monkeypatch):
    monkeypatch.chdir(env["tmp"])
    monkeypatch.setenv("PATCHLAB_HOME", env["home"])
    cmd = COMMANDS[path]
    runner = CliRunner()
    seen = 0
    for what, argv in invocations(path, cmd, env):
        if path == ("demo",):
            continue
        seen += 1
        r = runner.invoke(app, argv)
        where = f"{' '.join(path)} with {what}: {argv}\n{r.output}"
        assert r.exit_code not in (0, None), where
        assert "Traceback" not in r.output, where
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), where
        line = lines[0]
        if what.startswith("registry") and what != "registry: missing registry" and path in REGISTRY_COMMANDS:
            assert "registry" in line, where
        if "missing tokenizer" in what:
            assert "sentencepiece" not in line.lower(), where
    if path == ("demo",):
        r = runner.invoke(app, ["demo", "--fixtures", str(env["tmp"] / "nowhere"), "--device", "cpu"])
        assert r.exit_code != 0 and "Traceback" not in r.output
        assert len([ln for ln in r.stderr.splitlines() if ln.strip()]) == 1, r.output
    elif not seen:  # a command no class applies to still fails in one line on a bad option value
        r = runner.invoke(app, [*path, "--registry", env["registries"]["damaged database"]])
        assert "Traceback" not in r.output


@pytest.mark.parametrize("flag", ["-q", "-v", "--json"])
def test_global_flags_after_the_command(flag, env):
    runner = CliRunner()
    before = runner.invoke(app, [flag, "ls", "--registry", env["home"]])
    after = runner.invoke(app, ["ls", "--registry", env["home"], flag])
    assert before.exit_code == after.exit_code == 0, (before.output, after.output)
    assert before.stdout == after.stdout
    r = runner.invoke(app, ["show", "nothing", "-R", env["home"], "-v"])
    assert r.exit_code == 1 and "Traceback" in r.output  # -v after the command shows the traceback


def test_database_failures_map_to_one_line():
    """Failures only a server can produce (unreachable), mapped like the rest: what, where, which flag."""
    from sqlalchemy.exc import OperationalError

    from cli.common import describe_error

    exc = OperationalError("SELECT 1", {}, Exception("could not connect to server: Connection refused\n\tIs it up?"))
    line, code = describe_error(exc, "postgresql://db.example/patchlab")
    assert code == 1 and "\n" not in line and "cannot reach" in line and "--registry" in line
    exc = OperationalError("INSERT", {}, Exception("attempt to write a readonly database"))
    assert "read-only" in describe_error(exc, "x")[0]
    for errno_, word in ((28, "no space"), (30, "read-only"), (13, "permission denied")):
        line, _ = describe_error(OSError(errno_, "boom", "/some/where"), None)
        assert word in line and "/some/where" in line


# ---- every option a message names exists ------------------------------------------------------------------------


def _all_options() -> tuple[set[str], set[tuple[str, ...]]]:
    opts: set[str] = {"--help"}
    for p in CLI.params:
        opts.update(o for o in getattr(p, "opts", ()) if o.startswith("--"))
        opts.update(o for o in getattr(p, "secondary_opts", ()) if o.startswith("--"))
    for cmd in COMMANDS.values():
        for p in cmd.params:
            opts.update(o for o in getattr(p, "opts", ()) if o.startswith("--"))
            opts.update(o for o in getattr(p, "secondary_opts", ()) if o.startswith("--"))
    return opts, set(COMMANDS)


def _message_strings() -> list[tuple[str, str]]:
    """Every string constant (f-string parts joined) in patchlab/, registry/ and cli/."""
    out = []
    for pkg in ("patchlab", "registry", "cli"):
        for f in sorted((ROOT / pkg).rglob("*.py")):
            tree = ast.parse(f.read_text(), str(f))
            docs = {
                id(n.body[0].value)
                for n in ast.walk(tree)
                if isinstance(n, ast.Module | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
                and n.body
                and isinstance(n.body[0], ast.Expr)
                and isinstance(n.body[0].value, ast.Constant)
            }
            for node in ast.walk(tree):
                if id(node) in docs:
                    continue  # docstrings describe; messages and hints are what users read
                if isinstance(node, ast.JoinedStr):
                    text = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
                    out.append((f"{f.relative_to(ROOT)}:{node.lineno}", text))
                elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                    out.append((f"{f.relative_to(ROOT)}:{node.lineno}", node.value))
    return out


# options of other tools that messages may name
FOREIGN = {"--log_samples", "--output_path", "--local-dir", "--upgrade"}
FLAG_RE = re.compile(r"(?<![\w-])(--[a-z][a-z0-9_-]*[a-z0-9])")
CMD_RE = re.compile(r"`patchlab ((?:[a-z-]+)(?: [a-z-]+)?)")


def test_every_hinted_option_exists():
    opts, commands = _all_options()
    groups = {p[0] for p in commands if len(p) > 1}
    bad = []
    for where, text in _message_strings():
        if "--" not in text and "patchlab " not in text:
            continue
        for flag in FLAG_RE.findall(text):
            if flag not in opts and flag not in FOREIGN:
                bad.append(f"{where}: {flag} in {text[:90]!r}")
        for m in CMD_RE.findall(text):
            words = m.split()
            if words[0] in groups:  # `patchlab GROUP` alone, or `patchlab GROUP CMD`
                ok = len(words) == 1 or tuple(words[:2]) in commands
            else:
                ok = (words[0],) in commands
            if not ok:
                bad.append(f"{where}: `patchlab {m}` in {text[:90]!r}")
    assert not bad, "\n".join(bad)


def test_no_python_keyword_arguments_in_cli_hints(env):
    """CLI messages name CLI flags, not Python keyword arguments (``overwrite=True``)."""
    r = CliRunner().invoke(app, ["diff", "tiny@v1", str(env["ft"]), str(env["tmp"] / "p"), "-R", env["home"]])
    assert r.exit_code == 1 and "--overwrite" in r.stderr and "=True" not in r.stderr


def test_hub_cli_named_in_hints_is_installed():
    """Hints name the Hub CLI the installed huggingface_hub ships (``hf``; ``huggingface-cli`` is gone)."""
    import shutil
    import sys

    bindir = Path(sys.executable).parent
    for where, text in _message_strings():
        for tool in ("huggingface-cli", "hf download"):
            if f"`{tool}" in text:
                exe = tool.split()[0]
                assert (bindir / exe).exists() or shutil.which(exe), f"{where}: {exe} is not installed"


def test_a_closed_pipe_ends_quietly():
    """`patchlab --help | head -1`: the reader goes away; the CLI must not print a traceback."""
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-c", "from cli.app import app; app()", "--help"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env={"COLUMNS": "80", "PATH": "/usr/bin:/bin"},
    )
    proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert "Traceback" not in err, err
