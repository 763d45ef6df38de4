"""surgery data mo: parallel sentences from gettext catalogs, on a .mo written here and on the machine's own."""

import gettext
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import run_cli
from probe_helpers import write_mo

from surgery.probing.mo_data import catalog_files, clean, strip_mnemonics

ENTRIES = {
    "_Open the selected file": "Ausgewählte Datei _öffnen",                 # GTK accelerators
    "E_xecute the command": "Befehl aus_führen",
    "Save &As another file": "Speichern &unter einem anderen Namen",          # Qt accelerators
    "Cannot open %s for reading": "%s kann nicht zum Lesen geöffnet werden",  # printf
    "Copied %1$d of %2$lu files": "%1$d von %2$lu Dateien kopiert",
    "Hello {name}, welcome back": "Hallo {name}, willkommen zurück",          # brace format
    "<b>Bold</b> words &amp; more": "<b>Fette</b> Wörter &amp; mehr",         # markup, entity
    "menu\x04Quit the program now": "Programm jetzt beenden",                  # context
    ("One file was deleted", "%d files were deleted"): ["Eine Datei wurde gelöscht", "%d Dateien wurden gelöscht"],
    "Line one of a text\nand line two": "Zeile eins eines Textes\nund Zeile zwei",
    "  -v, --verbose     print more": "  -v, --verbose     mehr ausgeben",        # help table: dropped
    "Quit": "Beenden",                                                         # short: dropped
    "Untranslated entry here": "",                                             # untranslated: dropped
    "Same text in both languages": "Same text in both languages",             # untranslated: dropped
    "Cannot open %s for reading.": "%s kann nicht zum Lesen geöffnet werden.",  # not a duplicate (period)
    "Cannot open %d for reading": "%d kann nicht zum Lesen geöffnet werden",  # duplicate after stripping
}
WANT = [  # (en, de) in msgid byte order, which is the order of a .mo file
    ("Bold words & more", "Fette Wörter & mehr"),
    ("Cannot open for reading", "kann nicht zum Lesen geöffnet werden"),
    ("Cannot open for reading.", "kann nicht zum Lesen geöffnet werden."),
    ("Copied of files", "von Dateien kopiert"),
    ("Execute the command", "Befehl ausführen"),
    ("Hello, welcome back", "Hallo, willkommen zurück"),
    ("Line one of a text and line two", "Zeile eins eines Textes und Zeile zwei"),
    ("One file was deleted", "Eine Datei wurde gelöscht"),
    ("Save As another file", "Speichern unter einem anderen Namen"),
    ("Open the selected file", "Ausgewählte Datei öffnen"),
    ("Quit the program now", "Programm jetzt beenden"),
]


def invoke(*args):
    r = run_cli(*args)
    return SimpleNamespace(exit_code=r.returncode, output=r.stdout + r.stderr, stdout=r.stdout)


def test_a_mo_file_with_known_entries(tmp_path):
    mo = write_mo(tmp_path / "de.mo", ENTRIES)
    with open(mo, "rb") as fp:  # the file is what gettext itself reads
        assert gettext.GNUTranslations(fp).gettext("Quit") == "Beenden"
    out = invoke("data", "mo", "--mo", f"de={mo}", "-o", tmp_path / "data", "--json")
    assert out.exit_code == 0, out.output
    res = json.loads(out.stdout)
    assert res["languages"]["de"] == {"files": 1, "entries": 16, "pairs": 11, "unreadable": [],
                                      "dropped": {"duplicate": 1, "help table": 1, "short": 1, "untranslated": 2}}
    lines = (tmp_path / "data" / "en-de.jsonl").read_text(encoding="utf-8").splitlines()
    assert [tuple(json.loads(x).values()) for x in lines] == WANT
    assert (tmp_path / "data" / "de.txt").read_text(encoding="utf-8") == "".join(d + "\n" for _, d in WANT)
    assert (tmp_path / "data" / "en.txt").read_text(encoding="utf-8") == "".join(e + "\n" for e, _ in WANT)
    assert res["files"] == ["en.txt", "de.txt", "en-de.jsonl"]


def test_a_latin1_catalog_and_the_limit(tmp_path):
    mo = write_mo(tmp_path / "fr.mo", {"Open the file now": "Ouvrir le fichier maintenant, très vite"}, "ISO-8859-1")
    out = invoke("data", "mo", "--mo", f"fr={mo}", "-o", tmp_path, "--limit", 1)
    assert out.exit_code == 0, out.output
    assert (tmp_path / "fr.txt").read_text(encoding="utf-8") == "Ouvrir le fichier maintenant, très vite\n"
    assert "fr: 1 pairs from 1 entries in 1 .mo files" in out.output


@pytest.mark.parametrize("text, want", [
    ("_File", "File"), ("&Open", "Open"), ("Tom && Jerry", "Tom & Jerry"), ("ファイル(_F)", "ファイル"),
    ("Delete %s?", "Delete?"), ("%(count)d items", "items"), ("50%% done", "50% done"),
    ("Use ${HOME} here", "Use here"), ("file_name stays", "file_name stays"), ("a &lt;b&gt; c", "a <b> c"),
    ("__init stays", "__init stays"), ("Applying %%s now", "Applying now"), ("Mid_word stays", "Mid_word stays"),
    ("Cannot open '%s'", "Cannot open"), ("<a href=\"x\">link</a> text", "link text"),
])
def test_cleaning_rules(text, want):
    assert clean(text) == want


def test_mid_word_mnemonics_are_told_from_identifiers():
    assert strip_mnemonics("E_xecute it", "Aus_führen") == ("Execute it", "Ausführen")
    assert strip_mnemonics("Set file_name now", "file_name setzen") == ("Set file_name now", "file_name setzen")
    assert strip_mnemonics("a_b and c_d", "x_y") == ("a_b and c_d", "xy")   # two candidates: left alone


REAL = [lang for lang in ("de", "fr", "es") if catalog_files(lang)][:2]


@pytest.mark.slow
@pytest.mark.skipif(len(REAL) < 2, reason="needs the system's gettext catalogs in two of de, fr, es")
def test_the_machines_catalogs(tmp_path):
    out = invoke("data", "mo", "--langs", ",".join(REAL), "-o", tmp_path, "--json")
    assert out.exit_code == 0, out.output
    res = json.loads(out.stdout)
    for lang in REAL:
        c = res["languages"][lang]
        assert c["files"] + len(c["unreadable"]) == len(catalog_files(lang))
        assert c["pairs"] + sum(c["dropped"].values()) == c["entries"] and c["pairs"] > 100
        rows = [json.loads(x) for x in (tmp_path / f"en-{lang}.jsonl").read_text(encoding="utf-8").splitlines()]
        texts = (tmp_path / f"{lang}.txt").read_text(encoding="utf-8").splitlines()
        assert len(rows) == len(texts) == c["pairs"] and [r[lang] for r in rows] == texts
        ens = [r["en"] for r in rows]
        assert len(set(ens)) == len(ens) and len(set(texts)) == len(texts)
        for r in rows:
            for s in (r["en"], r[lang]):
                assert s == s.strip() and "\n" not in s and "  " not in s
                assert not re.search(r"%[-+#0-9.]*[sdiuxf]\b|</?(b|i|a|u|tt|big|small|span|br|p)\b[^>]*>"
                                     r"|&amp;|&quot;|\{\w*\}", s), s
                assert not re.search(r"(^|\s)_[^\W_]", s), s
            assert len(r["en"].split()) >= 2 and len(r["en"]) >= 10 and r["en"] != r[lang]
        # every pair comes from a real entry of the catalogs
        raw = set()
        for f in catalog_files(lang):
            try:
                with open(f, "rb") as fp:
                    catalog = gettext.GNUTranslations(fp)._catalog
            except (UnicodeDecodeError, OSError, ValueError):
                continue
            for k, v in catalog.items():
                k = (k if isinstance(k, str) else k[0]).split("\x04")[-1]
                raw.add(tuple(map(clean, strip_mnemonics(k, v))))
        assert {(r["en"], r[lang]) for r in rows} <= raw
    assert (tmp_path / "en.txt").read_text(encoding="utf-8").splitlines() == list(dict.fromkeys(
        json.loads(x)["en"] for lang in REAL
        for x in (tmp_path / f"en-{lang}.jsonl").read_text(encoding="utf-8").splitlines()))


def test_errors(tmp_path):
    (tmp_path / "broken.mo").write_bytes(b"not a mo file at all, no magic")
    cases = [(["--langs", "xx-nonexistent"], "no .mo files for language 'xx-nonexistent'"),
             (["--mo", f"de={tmp_path / 'broken.mo'}"], "broken.mo: not a readable gettext .mo file"),
             (["--mo", f"de={tmp_path / 'missing.mo'}"], "missing.mo: .mo file not found"),
             (["--langs", "en"], "'en' is the source side of every pair"),
             ([], "no languages given")]
    for args, message in cases:
        out = invoke("data", "mo", *args, "-o", tmp_path / "out")
        assert out.exit_code == 1 and out.output.count("\n") == 1 and message in out.output, out.output
    write_mo(tmp_path / "short.mo", {"Quit": "Beenden"})
    out = invoke("data", "mo", "--mo", f"de={tmp_path / 'short.mo'}", "-o", tmp_path / "out")
    assert out.exit_code == 1 and "de: no usable sentence pairs in 1 .mo files" in out.output
    assert not Path(tmp_path / "out").exists()
