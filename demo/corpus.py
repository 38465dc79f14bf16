"""The demo's ZODB application: the Python standard library's own sources
as documents (one per module) and sections (one per top-level def or
class), a catalogue by dotted module name and a word -> section-ids
inverted index.

Every document keeps a checksum of its sections' texts, updated in the
same transaction as the sections, so a reader can tell a consistent
snapshot from a torn one.
"""

import ast
import os
import re
import sysconfig
import zlib
from collections import Counter

import persistent
from BTrees.IIBTree import IITreeSet
from BTrees.IOBTree import IOBTree
from BTrees.OOBTree import OOBTree
from persistent.list import PersistentList

WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]{2,}")
SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__", "turtledemo", "ensurepip"}


class Section(persistent.Persistent):
    """A top-level ``def`` or ``class`` of a module."""

    def __init__(self, sid, module, name, kind, text):
        self.sid = sid
        self.module = module
        self.name = name
        self.kind = kind
        self.text = text


class Document(persistent.Persistent):
    """A module: its path, its sections' ids, and their texts' checksum."""

    def __init__(self, module, path):
        self.module = module
        self.path = path
        self.section_ids = PersistentList()
        self.checksum = 0
        self.edits = 0


def checksum(texts):
    c = 0
    for t in texts:
        c = zlib.crc32(t.encode("utf-8", "surrogatepass"), c)
    return c


def words(text):
    return {w.lower() for w in WORD.findall(text)}


def stdlib_modules(limit=None):
    """``(dotted name, path)`` of the stdlib's pure-Python modules."""
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for f in sorted(filenames):
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                if rel.endswith(".__init__"):
                    rel = rel[: -len(".__init__")]
                out.append((rel, path))
    return out[:limit] if limit else out


def sections_of(path):
    """``(name, kind, text)`` of each top-level def/class of a module."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        source = f.read()
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.splitlines()
    out = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            end = getattr(node, "end_lineno", node.lineno)
            text = "\n".join(lines[node.lineno - 1:end])
            out.append((node.name, "class" if isinstance(node, ast.ClassDef) else "def", text))
    return out


def load(db, modules, progress=print, batch=40):
    """Loads ``modules`` into ``db``; returns the corpus's word frequencies."""
    freq = Counter()
    with db.transaction() as conn:
        root = conn.root()
        root["modules"] = OOBTree()
        root["sections"] = IOBTree()
        root["index"] = OOBTree()
    sid = 0
    for start in range(0, len(modules), batch):
        with db.transaction() as conn:
            root = conn.root()
            for name, path in modules[start:start + batch]:
                doc = Document(name, path)
                texts = []
                for sname, kind, text in sections_of(path):
                    sid += 1
                    root["sections"][sid] = Section(sid, name, sname, kind, text)
                    doc.section_ids.append(sid)
                    texts.append(text)
                    ws = words(text)
                    freq.update(WORD.findall(text.lower()))
                    for w in ws:
                        postings = root["index"].get(w)
                        if postings is None:
                            postings = root["index"][w] = IITreeSet()
                        postings.insert(sid)
                doc.checksum = checksum(texts)
                root["modules"][name] = doc
        progress("  loaded %d/%d modules, %d sections" % (min(start + batch, len(modules)), len(modules), sid))
    return freq
