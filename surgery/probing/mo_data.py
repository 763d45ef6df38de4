"""Parallel sentences from gettext catalogs: English msgid + translated msgstr, cleaned.

    from surgery.probing.mo_data import mo_pairs, write_mo_data
    pairs = mo_pairs("de")                    # [(english, german), ...] from /usr/share/locale/de
    counts = write_mo_data(["de", "fr"], "data/")   # data/de.txt, fr.txt, en.txt, en-de.jsonl, en-fr.jsonl

Every Linux machine has these catalogs (one .mo file per program and language); they are real,
human-made translations of short UI and help texts. Parsing is Python's own
``gettext.GNUTranslations``. Cleaning drops what is not running text: format specifiers
(``%s``, ``%(name)s``, ``{0}``), markup (``<b>``, entities), accelerators (``_File``, ``&File``,
``(_F)``), command-line help tables, untranslated entries, duplicates and strings shorter than
``min_words`` words or ``min_chars`` characters.
"""

from __future__ import annotations

import gettext
import html
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from surgery.errors import SurgeryError

LOCALE_DIR = "/usr/share/locale"

_PRINTF = re.compile(r"%(?:\d+\$)?(?:\([A-Za-z_][\w.]*\))?[-+#0']*(?:\d+|\*)?(?:\.(?:\d+|\*))?"
                     r"(?:hh|h|ll|l|L|q|j|z|Z|t|I64|I32|I)?[diouxXeEfFgGaAcCsSpnm%]")
_BRACES = re.compile(r"\{[\w.:!\[\]]*\}|\$\{\w+\}")
_TAG = re.compile(r"</?[A-Za-z][\w:-]*(?:\s[^<>]*)?/?>")
_ENTITY = re.compile(r"&(?:#\d+|#x[0-9A-Fa-f]+|[A-Za-z]+);")
_PAREN_ACCEL = re.compile(r"\s*\((?:_|&)\w\)")      # CJK style: ファイル(_F)
_UNDERSCORE_ACCEL = re.compile(r"(?<!\w)_(?=[^\W_])")  # _File, not file_name or __init
_MID_WORD = re.compile(r"(?<!\S)[^\W_]+_[^\W_]+(?!\S)")  # E_xecute, aus_führen, file_name
_AMP_ACCEL = re.compile(r"&(?=\w)")                   # &File (entities are handled first)
_TABLE = re.compile(r"\S {3,}\S")                     # column layout of --help tables
_OPTION_LINE = re.compile(r"^\s*(?:-{1,2}\w|\$ )", re.M)  # a line starting with an option or a shell prompt
_LETTER = re.compile(r"[^\W\d_]")
_LEFTOVER_FORMAT = re.compile(r"%[A-Za-z]")               # custom specifiers (binutils' %B, %H): not text


def strip_mnemonics(msgid: str, msgstr: str) -> tuple[str, str]:
    """Remove a mid-word GTK mnemonic (E_xecute / aus_führen) from each side.

    A word with one inner underscore is a mnemonic when it is the only such word of its string and
    the other string does not contain it; identifiers (file_name) stay untranslated, so they do.
    """
    out = []
    for text, other in ((msgid, msgstr), (msgstr, msgid)):
        words = _MID_WORD.findall(text)
        if len(words) == 1 and words[0] not in other.split():
            text = _MID_WORD.sub(lambda m: m.group().replace("_", ""), text)
        out.append(text)
    return out[0], out[1]


def clean(text: str) -> str:
    """A catalog string as plain running text ('' when nothing is left)."""
    for _ in range(2):  # twice: "%%s" in a format that is itself formatted is a specifier too
        text = _PRINTF.sub(lambda m: "%" if m.group() == "%%" else " ", text)
    text = _BRACES.sub(" ", text)
    text = _TAG.sub("", text)
    text = _PAREN_ACCEL.sub("", text)
    parts = _ENTITY.split(text)
    entities = _ENTITY.findall(text)
    out = []
    for i, part in enumerate(parts):
        part = _UNDERSCORE_ACCEL.sub("", _AMP_ACCEL.sub("", part.replace("&&", "\0"))).replace("\0", "&")
        out.append(part)
        if i < len(entities):
            out.append(html.unescape(entities[i]))
    text = " ".join("".join(out).split())
    text = re.sub(r"\s+([,.;:!?»”)\]])", r"\1", text)        # spaces left before punctuation
    text = re.sub(r"([(\[«“])\s+", r"\1", text)
    text = re.sub(r"\(\s*\)|\[\s*\]|[\"'`«»“”„‘’]\s*[\"'«»“”„‘’]", "", text)  # emptied by stripping
    return " ".join(text.split()).strip(" ,;:")


def _usable(raw: str) -> bool:
    """Not a --help table or an option list."""
    return not (_TABLE.search(raw.strip("\n")) or _OPTION_LINE.search(raw))


@dataclass
class MoStats:
    files: int = 0
    entries: int = 0
    kept: int = 0
    dropped: dict = field(default_factory=dict)
    skipped: list = field(default_factory=list)

    def drop(self, why: str) -> None:
        self.dropped[why] = self.dropped.get(why, 0) + 1


def read_catalog(path) -> dict:
    """msgid -> msgstr of one .mo file (singular forms; contexts removed; the header dropped)."""
    path = Path(path)
    try:
        with open(path, "rb") as fp:
            catalog = gettext.GNUTranslations(fp)._catalog
    except FileNotFoundError:
        raise SurgeryError(f"{path}: .mo file not found") from None
    except (OSError, UnicodeDecodeError, ValueError, IndexError, LookupError) as e:
        raise SurgeryError(f"{path}: not a readable gettext .mo file ({e})") from None
    out = {}
    for key, value in catalog.items():
        if isinstance(key, tuple):
            if key[1] != 0:
                continue
            key = key[0]
        if not key:
            continue
        out[key.split("\x04", 1)[-1]] = value
    return out


def catalog_files(lang: str, locale_dir=LOCALE_DIR) -> list[Path]:
    folder = Path(locale_dir) / lang / "LC_MESSAGES"
    return sorted(folder.glob("*.mo"))


def mo_pairs(lang: str, files=None, locale_dir=LOCALE_DIR, min_words: int = 2, min_chars: int = 10,
             stats: MoStats | None = None) -> list[tuple[str, str]]:
    """Cleaned (english, translation) pairs of one language, unique by English text, in file order."""
    explicit = files is not None
    files = [Path(f) for f in files] if explicit else catalog_files(lang, locale_dir)
    if not files:
        raise SurgeryError(f"{Path(locale_dir) / lang / 'LC_MESSAGES'}: no .mo files for language {lang!r}")
    stats = stats if stats is not None else MoStats()
    seen_en, seen_tr, pairs = set(), set(), []
    for f in files:
        try:
            catalog = read_catalog(f)
        except SurgeryError:
            if explicit:
                raise
            stats.skipped.append(f.name)  # a broken system catalog (e.g. a wrong charset header)
            continue
        stats.files += 1
        for msgid, msgstr in catalog.items():
            stats.entries += 1
            if not msgstr:
                stats.drop("untranslated")
                continue
            if not (_usable(msgid) and _usable(msgstr)):
                stats.drop("help table")
                continue
            msgid, msgstr = strip_mnemonics(msgid, msgstr)
            en, tr = clean(msgid), clean(msgstr)
            if _LEFTOVER_FORMAT.search(en) or _LEFTOVER_FORMAT.search(tr):
                stats.drop("format")
            elif len(en.split()) < min_words or len(en) < min_chars or not _LETTER.search(tr):
                stats.drop("short")
            elif en == tr:
                stats.drop("untranslated")
            elif en in seen_en or tr in seen_tr:
                stats.drop("duplicate")
            else:
                seen_en.add(en)
                seen_tr.add(tr)
                pairs.append((en, tr))
                stats.kept += 1
    return pairs


def write_mo_data(langs, out_dir, mo_files: dict | None = None, locale_dir=LOCALE_DIR, min_words: int = 2,
                  min_chars: int = 10, limit: int | None = None) -> dict:
    """Write <lang>.txt, en.txt and en-<lang>.jsonl for each language; returns counts per language.

    ``mo_files`` maps a language to explicit .mo files (instead of the locale directory).
    ``limit`` keeps at most that many pairs per language.
    """
    mo_files = mo_files or {}
    langs = list(dict.fromkeys(list(langs) + list(mo_files)))
    if not langs:
        raise SurgeryError("no languages given (--langs de,fr or --mo LANG=FILE)")
    if "en" in langs:
        raise SurgeryError("'en' is the source side of every pair; list only target languages")
    out = Path(out_dir)
    result, english = {}, {}
    per_lang = {}
    for lang in langs:
        stats = MoStats()
        pairs = mo_pairs(lang, mo_files.get(lang), locale_dir, min_words, min_chars, stats)[:limit]
        if not pairs:
            raise SurgeryError(f"{lang}: no usable sentence pairs in {stats.files} .mo files")
        per_lang[lang] = pairs
        result[lang] = {"files": stats.files, "entries": stats.entries, "pairs": len(pairs),
                        "dropped": dict(sorted(stats.dropped.items())),
                        "unreadable": stats.skipped}
    out.mkdir(parents=True, exist_ok=True)
    for lang, pairs in per_lang.items():
        (out / f"{lang}.txt").write_text("".join(tr + "\n" for _, tr in pairs), encoding="utf-8")
        with open(out / f"en-{lang}.jsonl", "w", encoding="utf-8") as fp:
            for en, tr in pairs:
                fp.write(json.dumps({"en": en, lang: tr}, ensure_ascii=False) + "\n")
                english.setdefault(en, None)
    (out / "en.txt").write_text("".join(en + "\n" for en in english), encoding="utf-8")
    files = ["en.txt"] + [f for x in per_lang for f in (f"{x}.txt", f"en-{x}.jsonl")]
    return {"output": str(out), "languages": result, "english": len(english), "files": files}
