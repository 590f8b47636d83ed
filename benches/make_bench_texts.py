"""Writes real English paragraphs for the benchmark: the docstrings of Python's standard library,
split into paragraphs, deduplicated, in a fixed order. Uses only the standard library.

    python3 benches/make_bench_texts.py OUT.jsonl [N]
"""
import importlib
import inspect
import json
import pkgutil
import sys
import warnings

SKIP = ("test", "idlelib", "tkinter", "turtle", "antigravity", "this", "lib2to3", "ensurepip", "venv")


def paragraphs():
    warnings.simplefilter("ignore")
    for info in sorted(pkgutil.iter_modules(), key=lambda m: m.name):
        if info.name.startswith(("_",) + SKIP) or not info.ispkg and info.module_finder is None:
            continue
        try:
            mod = importlib.import_module(info.name)
        except Exception:
            continue
        objs = [mod] + [v for _, v in sorted(vars(mod).items()) if inspect.isclass(v) or inspect.isfunction(v)]
        for obj in objs:
            doc = inspect.getdoc(obj) or ""
            for para in doc.split("\n\n"):
                text = " ".join(para.split())
                if 40 <= len(text) <= 2000 and not text.startswith((">>>", "...")):
                    yield text


def main():
    out, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 4000
    seen, rows = set(), []
    for text in paragraphs():
        if text not in seen:
            seen.add(text)
            rows.append(text)
        if len(rows) >= n:
            break
    with open(out, "w") as f:
        for i, text in enumerate(rows):
            f.write(json.dumps({"id": i, "text": text}) + "\n")
    print(f"{len(rows)} texts", file=sys.stderr)


if __name__ == "__main__":
    main()
