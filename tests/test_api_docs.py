"""The API reference cannot go stale: every public name has an Args/Returns/Raises docstring, and
docs/api.md is exactly what scripts/gen_api.py makes of them (``make docs``). Reads sources only (ast)."""

import importlib.util
import sys

from launchers import ROOT

_spec = importlib.util.spec_from_file_location("gen_api", ROOT / "scripts" / "gen_api.py")
gen_api = sys.modules["gen_api"] = importlib.util.module_from_spec(_spec)  # (its dataclass looks itself up)
_spec.loader.exec_module(gen_api)


def test_every_public_name_has_a_complete_docstring():
    assert gen_api.problems() == []


def test_the_checker_finds_what_is_missing(tmp_path):
    """The rules bite: a function without Args, one that raises without Raises, no docstring at all."""
    import ast

    tree = ast.parse('def f(x, *, y=1) -> int:\n    """Does."""\n    raise ValueError(x)\n\n'
                     'def g(a):\n    pass\n\n'
                     'def h(a) -> int:\n    """The a.\n\n    Args:\n      a: A.\n    """\n    return a\n')
    f, g, h = tree.body
    assert gen_api._check_function(f, ast.get_docstring(f), property_=False) == [
        "no Args: section (parameters x, y)",
        "no Returns: section (and the first line does not say what it returns)",
        "raises, but has no Raises: section"]
    assert gen_api._check_function(g, ast.get_docstring(g) or "", property_=False) == ["no docstring"]
    assert gen_api._check_function(h, ast.get_docstring(h), property_=False) == []


def test_the_reference_is_generated_from_the_docstrings():
    names = [q for q, _, _ in gen_api.public_names()]
    assert names[0] == "disttrain.Trainer" and "disttrain.serving.save_model" in names
    text = (ROOT / "docs" / "api.md").read_text()
    assert text == gen_api.render(), "docs/api.md is stale: run `make docs` (python3 scripts/gen_api.py)"
    assert "`disttrain.Trainer(*, model: keras.Model | Sequence[keras.Model]" in text


def test_the_porting_guide_and_readme_name_only_what_exists():
    """Every ``dt.*``, ``backend.*``, ``ctx.*`` and ``trainer.*`` name in the code of docs/porting.md and
    the README is a documented public name (or an attribute its class documents): the guide cannot go
    stale either."""
    import re

    entries = {e.qualname: e for e in gen_api.entries()}
    owners = {"dt": "disttrain", "backend": "disttrain.Backend", "ctx": "disttrain.StepContext",
              "trainer": "disttrain.Trainer"}
    unknown, checked = [], 0
    for page in ("docs/porting.md", "README.md"):
        text = (ROOT / page).read_text()
        code = re.findall(r"```python\n(.*?)```", text, re.S) + re.findall(r"`([^`\n]+)`", text)
        for snippet in code:
            for owner, name in re.findall(r"(?<![\w.])(dt|backend|ctx|trainer)\.([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)",
                                          snippet):
                if name == "py":  # a file (trainer.py)
                    continue
                checked += 1
                qualname = f"{owners[owner]}.{name}"
                head, _, attribute = qualname.rpartition(".")
                if qualname in entries or (head in entries and re.search(rf"^\s*{attribute}:", entries[head].doc, re.M)):
                    continue
                if owner == "dt" and name.split(".")[0] in ("data", "lr", "metrics", "serving", "shards", "summaries",
                                                             "__version__") and "." not in name:
                    continue  # a submodule itself
                unknown.append(f"{page}: {owner}.{name}")
    assert checked > 50, checked
    assert unknown == [], sorted(set(unknown))
