"""The forbidden forms stay out of the tree: unpickling loads, eval/exec, shell commands built from strings,
unsafe YAML. Checked on the code itself (comments and strings removed), so a docstring may name them."""
from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TREES = ("distillery", "teacher", "student", "export", "runtime", "bench")

FORBIDDEN = [  # (pattern on code, why)
    (r"(?<![\w.])eval\s*\(", "eval() of a string"),
    (r"(?<![\w.])exec\s*\(", "exec() of a string"),
    (r"\bpickle\s*\.\s*loads?\s*\(", "pickle.load: runs code from the file"),
    (r"\b(?:cloudpickle|dill|joblib)\s*\.\s*loads?\s*\(", "unpickling load"),
    (r"\bshell\s*=\s*True\b", "subprocess with shell=True"),
    (r"\bos\s*\.\s*(?:system|popen)\s*\(", "os.system/os.popen: a shell command line"),
    (r"\byaml\s*\.\s*(?:unsafe_load|full_load|load_all|unsafe_load_all)\s*\(", "unsafe YAML loader"),
    (r"\ballow_pickle\s*=\s*True\b", "numpy load with pickles"),
]
CHECKED_CALLS = [  # (call, what the arguments must contain)
    ("torch.load", r"\bweights_only\s*=\s*True\b"),
    ("yaml.load", r"\bSafeLoader\b"),
]


def code_only(source: str) -> str:
    """The source with comments removed and every string literal emptied (line structure kept)."""
    out, last = [], (1, 0)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = ""
        elif tok.type == tokenize.STRING or tok.type in {getattr(tokenize, n, -1) for n in
                                                         ("FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END")}:
            text = '""' if tok.type == tokenize.STRING else ""
        else:
            text = tok.string
        (sr, sc), (er, ec) = tok.start, tok.end
        if sr > last[0]:
            out.append("\n" * (sr - last[0]))
            last = (sr, 0)
        out.append(" " * max(sc - last[1], 0) if sr == last[0] else "")
        out.append(text)
        last = (er, ec)
    return "".join(out)


def call_args(code: str, start: int) -> str:
    """The text between the parentheses of the call whose '(' is at ``start``."""
    depth = 0
    for i in range(start, len(code)):
        depth += {"(": 1, ")": -1}.get(code[i], 0)
        if depth == 0:
            return code[start + 1:i]
    return code[start + 1:]


def violations(source: str, name: str = "<src>") -> list[str]:
    code = code_only(source)
    found = []
    for pattern, why in FORBIDDEN:
        for m in re.finditer(pattern, code):
            found.append(f"{name}:{code.count(chr(10), 0, m.start()) + 1}: {why}")
    for call, must in CHECKED_CALLS:
        for m in re.finditer(r"\b" + re.escape(call).replace(r"\.", r"\s*\.\s*") + r"\s*\(", code):
            if not re.search(must, call_args(code, m.end() - 1)):
                found.append(f"{name}:{code.count(chr(10), 0, m.start()) + 1}: {call}( without {must!r}")
    return found


def test_the_tree_has_none_of_the_forbidden_forms():
    files = [p for t in TREES for p in sorted((REPO / t).rglob("*.py"))]
    assert len(files) > 40
    found = [v for p in files for v in violations(p.read_text(encoding="utf-8"), str(p.relative_to(REPO)))]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("bad", [
    "x = torch.load(path)", "x = torch.load(path, map_location='cpu',\n  weights_only=False)", "eval(text)",
    "exec(code)", "pickle.load(f)", "pickle.loads(b)", "subprocess.run(cmd, shell=True)", "os.system('ls ' + d)",
    "yaml.load(text)", "yaml.load(text, Loader=yaml.Loader)", "yaml.unsafe_load(t)", "np.load(f, allow_pickle=True)",
])
def test_each_form_is_caught(bad):
    assert violations(bad), bad


@pytest.mark.parametrize("ok", [
    "x = torch.load(path, map_location='cpu', weights_only=True)", "model.eval()", "yaml.safe_load(t)",
    "yaml.load(t, Loader=yaml.SafeLoader)", "subprocess.run(['ls', d])", '"""eval(x) in a docstring"""',
    "# pickle.load(f) in a comment", "np.load(f, allow_pickle=False)", "f'{x} shell=True'",
])
def test_allowed_forms_pass(ok):
    assert not violations(ok), ok
