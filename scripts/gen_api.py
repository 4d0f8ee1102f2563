"""Generates docs/api.md from the docstrings of disttrain's public names, and checks those docstrings.

    python scripts/gen_api.py            # writes docs/api.md (``make docs``)
    python scripts/gen_api.py --check    # exits 1, listing them, if a docstring is missing or incomplete
                                         # or docs/api.md is not what the docstrings give

It reads the sources with ``ast`` and imports nothing (no TensorFlow start-up: it runs in a fraction of a
second). The public names are those ``disttrain/__init__.py`` exports (``_NAMES``) and, for each submodule
it exposes (``_SUBMODULES``: ``dt.data``, ``dt.lr``, ...), the module's ``__all__``, else its names
without a leading underscore. Of a class, its public methods and properties count too.

The rules a docstring must follow (Google style, as the code base):
  * every public class, function, method and property has one; a constant has a ``#:`` comment;
  * a function or method with parameters (besides ``self``/``cls``) has ``Args:`` naming each of them (a
    class documents its constructor's in its own ``Args:``, or ``Attributes:`` for a record, or in
    ``__init__``'s); ``*args``/``**kwargs`` are named with stars or without;
  * one that returns a value (a return annotation other than ``None``, outside properties) has
    ``Returns:`` (or ``Yields:``), unless its first sentence says what it returns ("The ...",
    "Whether ...", "... and returns ...");
  * a method that overrides a documented method of a disttrain base class without a docstring of its
    own inherits that one (as pdoc and Sphinx do): a callback's ``on_epoch_end`` is the hook's;
  * one whose own body has a ``raise`` statement has ``Raises:``.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "disttrain"
OUTPUT = ROOT / "docs" / "api.md"
#: The top-level names the reference starts with, in this order (the rest follow by module).
FIRST = ("Trainer", "StepContext", "get_backend", "Backend", "InputContext", "Checkpointing", "Callback")
#: First words of a one-line docstring that says what the function returns (no ``Returns:`` needed).
SAYS_WHAT_IT_RETURNS = re.compile(r"^(The|A|An|Returns?|Whether|How|What|Which|True|Where|Its|This|One|``)\b")


@dataclass
class Entry:
    """One documented public object."""

    qualname: str  # e.g. "disttrain.Trainer.fit"
    kind: str  # "class", "function", "method", "property", "constant"
    signature: str
    doc: str
    module: str
    problems: list[str] = field(default_factory=list)


def _module_path(module: str) -> Path:
    parts = module.split(".")[1:]
    path = PACKAGE.joinpath(*parts)
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


_TREES: dict[str, ast.Module] = {}


def _tree(module: str) -> ast.Module:
    if module not in _TREES:
        _TREES[module] = ast.parse(_module_path(module).read_text())
    return _TREES[module]


def _literal(tree: ast.Module, name: str):
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            try:
                return ast.literal_eval(node.value)
            except ValueError:
                return None
    return None


def _definition(module: str, name: str, depth: int = 0):
    """``(module, node)`` defining ``name`` in ``module``, following ``from disttrain.x import name``."""
    tree = _tree(module)
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name == name:
            return module, node
        targets = []
        if isinstance(node, ast.Assign):
            targets = [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            targets = [node.target.id]
        if name in targets:
            return module, node
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("disttrain") and depth < 5:
            if any((alias.asname or alias.name) == name for alias in node.names):
                return _definition(node.module, name, depth + 1)
    raise LookupError(f"{name} is not defined in {module}")


def _constant_doc(module: str, node: ast.stmt) -> str:
    """The ``#:`` comment lines just above a module-level assignment."""
    lines = _module_path(module).read_text().splitlines()
    doc, i = [], node.lineno - 2
    while i >= 0 and lines[i].lstrip().startswith("#:"):
        doc.insert(0, lines[i].lstrip()[2:].strip())
        i -= 1
    return " ".join(doc)


def _params(fn: ast.FunctionDef) -> list[str]:
    a = fn.args
    names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
    names = [n for n in names if n not in ("self", "cls")]
    if a.vararg:
        names.append("*" + a.vararg.arg)
    if a.kwarg:
        names.append("**" + a.kwarg.arg)
    return names


def _signature(fn: ast.FunctionDef, *, drop_self: bool) -> str:
    args = fn.args
    if drop_self and (args.posonlyargs + args.args) and (args.posonlyargs + args.args)[0].arg in ("self", "cls"):
        args = ast.arguments(posonlyargs=args.posonlyargs[1:] if args.posonlyargs else [],
                             args=args.args[1:] if not args.posonlyargs else args.args, vararg=args.vararg,
                             kwonlyargs=args.kwonlyargs, kw_defaults=args.kw_defaults, kwarg=args.kwarg,
                             defaults=args.defaults)
    text = f"({ast.unparse(args)})"
    if fn.returns is not None:
        text += f" -> {ast.unparse(fn.returns)}"
    return text


def _raises(fn: ast.FunctionDef) -> bool:
    """Whether the function's own body (not nested functions or classes) has a ``raise`` with an exception."""
    stack = list(fn.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        if isinstance(node, ast.Raise) and node.exc is not None and "NotImplementedError" not in ast.unparse(node.exc):
            return True  # (an abstract method's NotImplementedError needs no Raises:)
        stack.extend(ast.iter_child_nodes(node))
    return False


def _section(doc: str, name: str) -> str | None:
    """The text of section ``name`` (e.g. ``Args``) of a Google-style docstring, or None."""
    match = re.search(rf"^(\s*){name}:\s*$(.*?)(?=^\s*[A-Z][A-Za-z ]+:\s*$|\Z)", doc, re.M | re.S)
    return match.group(2) if match else None


def _check_function(fn: ast.FunctionDef, doc: str, *, property_: bool, args_doc: str | None = None) -> list[str]:
    problems = []
    if not doc:
        return ["no docstring"]
    params = _params(fn)
    if params and not property_:
        args = args_doc if args_doc is not None else _section(doc, "Args")
        if args is None:
            problems.append(f"no Args: section (parameters {', '.join(params)})")
        else:
            missing = [p for p in params
                       if not re.search(rf"^\s*\**{re.escape(p.lstrip('*'))}\b.*?:", args, re.M)]
            if missing:
                problems.append(f"Args: does not name {', '.join(missing)}")
    returns = fn.returns is not None and ast.unparse(fn.returns) not in ("None", "NoReturn")
    first = doc.strip().split(". ")[0].split("\n\n")[0]
    if (returns and not property_ and _section(doc, "Returns") is None and _section(doc, "Yields") is None
            and not SAYS_WHAT_IT_RETURNS.match(first) and "return" not in first.lower()):
        problems.append("no Returns: section (and the first line does not say what it returns)")
    if _raises(fn) and _section(doc, "Raises") is None:
        problems.append("raises, but has no Raises: section")
    return problems


def _is_property(fn: ast.FunctionDef) -> bool:
    return any(ast.unparse(d) in ("property", "functools.cached_property", "cached_property") for d in fn.decorator_list)


def _inherited_docs(module: str, node: ast.ClassDef, depth: int = 0) -> dict[str, tuple[str, str]]:
    """``{method name: (docstring, defining class)}`` of the disttrain base classes of ``node``."""
    docs: dict[str, tuple[str, str]] = {}
    for base in node.bases:
        name = ast.unparse(base).split(".")[-1]
        try:
            where, base_node = _definition(module, name)
        except LookupError:
            continue
        if not isinstance(base_node, ast.ClassDef) or depth > 5:
            continue
        for child in base_node.body:
            if isinstance(child, ast.FunctionDef) and ast.get_docstring(child) and child.name not in docs:
                docs[child.name] = (ast.get_docstring(child), f"{where}.{base_node.name}")
        for k, v in _inherited_docs(where, base_node, depth + 1).items():
            docs.setdefault(k, v)
    return docs


def _class_entries(qualname: str, module: str, node: ast.ClassDef) -> list[Entry]:
    doc = ast.get_docstring(node) or ""
    init = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
    signature = _signature(init, drop_self=True) if init is not None else ""
    entry = Entry(qualname, "class", signature, doc, module)
    if not doc:
        entry.problems.append("no docstring")
    elif init is not None:
        init_doc = ast.get_docstring(init) or ""
        # the constructor's parameters: in the class's Args (or Attributes, for a record), or __init__'s Args
        found = [_section(doc, "Args"), _section(doc, "Attributes"), _section(init_doc, "Args") if init_doc else None]
        args = "\n".join(f for f in found if f is not None) if any(f is not None for f in found) else None
        entry.problems += [p.replace("Args:", "the class's Args:") for p in
                           _check_function(init, doc, property_=False, args_doc=args if args is not None else None)
                           if not p.startswith(("no Returns", "raises"))]
        if _raises(init) and _section(doc, "Raises") is None and _section(init_doc, "Raises") is None:
            entry.problems.append("its constructor raises, but the class has no Raises: section")
    entries = [entry]
    inherited = _inherited_docs(module, node)
    for child in node.body:
        if not isinstance(child, ast.FunctionDef) or child.name.startswith("_"):
            continue
        prop = _is_property(child)
        if any(ast.unparse(d).endswith(".setter") for d in child.decorator_list):
            continue
        child_doc = ast.get_docstring(child) or ""
        own = bool(child_doc)
        if not own and child.name in inherited:
            base_doc, base = inherited[child.name]
            child_doc = f"{base_doc}\n\n(Inherited from ``{base}``.)"
        e = Entry(f"{qualname}.{child.name}", "property" if prop else "method",
                  "" if prop else _signature(child, drop_self=True), child_doc, module)
        # an inherited docstring is the base's contract: only its Args are checked against the override
        e.problems = [p for p in _check_function(child, child_doc, property_=prop)
                      if own or not p.startswith(("no Returns", "raises"))]
        entries.append(e)
    return entries


def public_names() -> list[tuple[str, str, str]]:
    """``(public qualname, module, name)`` of every public name, in the order of the reference."""
    init = _tree("disttrain")
    names = _literal(init, "_NAMES") or {}
    submodules = _literal(init, "_SUBMODULES") or {}  # public name -> the module that is it
    first = {n: i for i, n in enumerate(FIRST)}  # the trainer first, then what a step and a launch use
    out = [(f"disttrain.{n}", m, n) for n, m in sorted(names.items(), key=lambda kv: (first.get(kv[0], len(first)),
                                                                                       kv[1], kv[0]))]
    for sub, module in submodules.items():
        tree = _tree(module)
        exported = _literal(tree, "__all__")
        if exported is None:
            exported = [n.name for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))
                        and not n.name.startswith("_")]
        out += [(f"disttrain.{sub}.{n}", module, n) for n in exported]
    return out


def entries() -> list[Entry]:
    """Every public object's entry, with the problems of its docstring."""
    found, seen = [], set()
    for qualname, module, name in public_names():
        where, node = _definition(module, name)
        if (where, name) in seen:  # e.g. dt.TensorBoard, also dt.summaries.TensorBoard: documented once
            continue
        seen.add((where, name))
        if isinstance(node, ast.ClassDef):
            found += _class_entries(qualname, where, node)
        elif isinstance(node, ast.FunctionDef):
            doc = ast.get_docstring(node) or ""
            e = Entry(qualname, "function", _signature(node, drop_self=False), doc, where)
            e.problems = _check_function(node, doc, property_=False)
            found.append(e)
        else:
            doc = _constant_doc(where, node)
            value = ast.unparse(node.value) if getattr(node, "value", None) is not None else ""
            e = Entry(qualname, "constant", f" = {value}" if len(value) < 60 else "", doc, where)
            if not doc:
                e.problems.append("no #: comment above it")
            found.append(e)
    return found


def problems() -> list[str]:
    """``"qualname: problem"`` for every docstring that breaks a rule (see the module docs)."""
    return [f"{e.qualname} ({e.module}): {p}" for e in entries() for p in e.problems]


def render() -> str:
    """docs/api.md's text."""
    lines = ["# API reference", "",
             "Generated from the docstrings by `scripts/gen_api.py` (`make docs`); do not edit by hand: "
             "`tests/test_api_docs.py` fails when this file and the docstrings differ, or when a public "
             "name lacks a docstring.", ""]
    all_entries = entries()
    top = [e for e in all_entries if e.qualname.count(".") == 1 or (e.kind in ("method", "property")
                                                                     and e.qualname.count(".") == 2
                                                                     and e.qualname.split(".")[1][0].isupper())]
    lines.append("Top level (`import disttrain as dt`): " +
                 ", ".join(f"[`{e.qualname.split('.', 1)[1]}`](#{_anchor(e.qualname)})"
                           for e in top if e.qualname.count(".") == 1) + ".")
    lines.append("")
    section = None
    for e in all_entries:
        parts = e.qualname.split(".")
        group = "disttrain" if e in top else ".".join(parts[:2])
        if group != section:
            section = group
            lines += [f"## `{group}`", ""]
        level = "####" if e.kind in ("method", "property") else "###"
        label = {"property": " (property)", "constant": ""}.get(e.kind, "")
        lines += [f'{level} <a id="{_anchor(e.qualname)}"></a>`{e.qualname}{e.signature}`{label}', "",
                  f"*Defined in `{e.module}`.*" if e.kind != "method" and e.kind != "property" else "", ""]
        lines += [_markdown(e.doc), ""]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).rstrip() + "\n"


def _anchor(qualname: str) -> str:
    return qualname.replace(".", "-").lower()


def _markdown(doc: str) -> str:
    """A docstring as Markdown: sections in bold, their items as list entries, ``::`` blocks as code."""
    out, in_code = [], False
    doc = re.sub(r":(?:meth|func|class|mod|attr|data):`~?([^`]+)`", r"``\1``", doc)
    for line in doc.splitlines():
        if in_code:
            if line.strip() and not line.startswith((" ", "\t")):
                out.append("```")
                in_code = False
            else:
                out.append(line[4:] if line.startswith("    ") else line)
                continue
        header = re.match(r"^(Args|Returns|Raises|Yields|Attributes|Example|Examples|Note):\s*$", line)
        if header:
            out += ["", f"**{header.group(1)}:**", ""]
            continue
        item = re.match(r"^  (\**[A-Za-z_][\w.]*(?: \([^)]*\))?):\s*(.*)$", line)
        if item:
            out.append(f"- `{item.group(1)}`: {item.group(2)}")
            continue
        if line.startswith("    ") and out and out[-1].startswith("- "):
            out[-1] += " " + line.strip()
            continue
        if line.rstrip().endswith("::"):
            out += [line.rstrip()[:-1], "", "```python"]
            in_code = True
            continue
        out.append(line.strip() if line.startswith("  ") and not line.startswith("    ") else line)
    if in_code:
        out.append("```")
    return "\n".join(out).strip()


def main(argv: list[str] | None = None) -> int:
    """Writes docs/api.md, or with ``--check`` reports what is stale or missing.

    Args:
      argv: The command line (default ``sys.argv[1:]``).

    Returns:
      The exit status: 0, or 1 when ``--check`` found a problem.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    found = problems()
    text = render()
    if args.check:
        if OUTPUT.exists() and OUTPUT.read_text() == text and not found:
            return 0
        print("\n".join(found or ["docs/api.md is out of date: run make docs"]), file=sys.stderr)
        return 1
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT.relative_to(ROOT)} ({len(entries())} entries)")
    if found:
        print("docstring problems:\n  " + "\n  ".join(found), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
