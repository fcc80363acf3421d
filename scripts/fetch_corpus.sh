#!/usr/bin/env bash
# fetch_corpus.sh [OUT_DIR] — the training corpus of monet's small default model.
#
# Eight public-domain English books (Project Gutenberg texts), taken from
# Debian 12 packages with `apt-get download` (no root needed):
#   r-cran-janeaustenr  Jane Austen's six novels (R data; the package is MIT)
#   r-cran-tokenizers   Herman Melville, Moby Dick (R data; the package is MIT)
#   golang-1.19-src     Isaac Newton, Opticks (Go test data; Go is BSD-3-Clause)
# The Debian version is whatever apt offers and is recorded; the data files
# read from each package are pinned by SHA-256, so the corpus is the same
# byte for byte or the script stops. Cleaning: Project Gutenberg header,
# footer, licence and producer/transcriber notes removed, CRLF -> LF,
# paragraphs unwrapped (indented verse/tables kept line by line), _italic_
# marks dropped, files that do not look like English prose skipped.
# Output: OUT_DIR/<author>-<title>.txt (UTF-8, one book each) and
# OUT_DIR/SOURCES.tsv. Downloads are cached in $CORPUS_CACHE (default
# data/cache/debs); re-running gives the same files.
set -euo pipefail

OUT=${1:-data/corpus}
CACHE=${CORPUS_CACHE:-data/cache/debs}
PY=${PYTHON:-python3}
mkdir -p "$OUT" "$CACHE"

# package | file inside the .deb | sha256 of that file
DATA="
r-cran-janeaustenr|usr/lib/R/site-library/janeaustenr/data/Rdata.rdx|cab8cbe4ce965d3b42b35c03383bafccc0eb78151f70e4748ead45270470c22f
r-cran-janeaustenr|usr/lib/R/site-library/janeaustenr/data/Rdata.rdb|8fb5198960d0da724b1562f96e4221e5c1b41ff455000280b02c55980c3d8f21
r-cran-tokenizers|usr/lib/R/site-library/tokenizers/data/Rdata.rdx|597c9d0f30a6fd0f70a87130d5b424e6cf690894efd8ac283e75cd44d58847cd
r-cran-tokenizers|usr/lib/R/site-library/tokenizers/data/Rdata.rdb|2a7581d1d9c2f49fd8c8493e556f984f4a5cdc071eeb6248b0fa719be6b088fe
golang-1.19-src|usr/share/go-1.19/src/testdata/Isaac.Newton-Opticks.txt|d4a9ac22462b35e7821a4f2706c211093da678620a8f9997989ee7cf8d507bbd
"

: > "$CACHE/versions.tsv"
while IFS='|' read -r pkg path sum; do
  [ -n "$pkg" ] || continue
  deb=$(ls "$CACHE/${pkg}"_*.deb 2>/dev/null | head -n1 || true)
  if [ -z "$deb" ]; then
    if [ -z "$(apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/ {print $2}' | grep -v '(none)')" ]; then
      echo "error: Debian package $pkg not found in the apt lists (Debian 12 'bookworm' main; run 'apt-get update')" >&2
      exit 1
    fi
    echo "downloading $pkg"
    (cd "$CACHE" && apt-get download -q -o APT::Sandbox::User="$(id -un)" "$pkg") ||
      { echo "error: apt-get download $pkg failed" >&2; exit 1; }
    deb=$(ls "$CACHE/${pkg}"_*.deb | head -n1)
  fi
  ver=$(dpkg-deb -f "$deb" Version)
  dest="$CACHE/$pkg/$path"
  if [ ! -f "$dest" ]; then
    mkdir -p "$CACHE/$pkg"
    dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$CACHE/$pkg" "./$path" ||
      { echo "error: cannot extract $path from $deb ($pkg $ver); delete that file to download it again" >&2; exit 1; }
  fi
  if [ "$(sha256sum "$dest" | cut -d' ' -f1)" != "$sum" ]; then
    echo "error: $pkg $ver ships a different $path (sha256 mismatch): check the text, then update the pinned sum" >&2
    exit 1
  fi
  printf '%s\t%s\n' "$pkg" "$ver" >> "$CACHE/versions.tsv"
done <<< "$DATA"

"$PY" - "$CACHE" "$OUT" <<'EOF'
import gzip, hashlib, os, re, struct, sys, zlib
cache, out = sys.argv[1], sys.argv[2]
versions = dict(l.split('\t') for l in open(os.path.join(cache, 'versions.tsv')).read().split('\n') if l)
R_LIB = 'usr/lib/R/site-library'

class RData:
    """The subset of R's XDR serialization that character vectors and lazy-load indexes use."""
    def __init__(self, b): self.b, self.p, self.refs = b, 0, []
    def int(self):
        self.p += 4
        return struct.unpack_from('>i', self.b, self.p - 4)[0]
    def parse(self):
        assert self.b[:2] == b'X\n', 'not an XDR R serialization'
        self.p = 2
        version = self.int(); self.int(); self.int()
        if version == 3: n = self.int(); self.p += n  # skip the native encoding name
        return self.obj()
    def obj(self):
        flags = self.int()
        kind, attr, tag = flags & 0xff, flags & 512, flags & 1024
        if kind == 254: return None                       # NULL
        if kind == 255: return self.refs[(flags >> 8) - 1]  # reference to a symbol
        if kind == 1:                                     # symbol
            self.refs.append(self.obj()); return self.refs[-1]
        if kind == 2:                                     # pairlist -> [(tag, value)]
            if attr: self.obj()
            key = self.obj() if tag else None
            return [(key, self.obj())] + (self.obj() or [])
        if kind == 9:                                     # CHARSXP
            n = self.int()
            self.p += max(n, 0)
            return None if n < 0 else self.b[self.p - n:self.p].decode('latin-1' if flags & (4 << 12) else 'utf-8')
        n = self.int()
        if kind in (10, 13): v = list(struct.unpack_from('>%di' % n, self.b, self.p)); self.p += 4 * n
        elif kind in (16, 19): v = [self.obj() for _ in range(n)]
        else: raise ValueError('unsupported R type %d' % kind)
        return dict(self.obj(), value=v) if attr else v

def r_datasets(prefix):
    """{name: object} of an R package's lazy-load data (Rdata.rdx index + Rdata.rdb)."""
    index = RData(gzip.decompress(open(prefix + '.rdx', 'rb').read())).parse()
    variables = index['value'][0]
    rdb = open(prefix + '.rdb', 'rb').read()
    return {name: RData(zlib.decompress(rdb[o + 4:o + n])).parse()
            for name, (o, n) in zip(variables['names'], variables['value'])}

austen = r_datasets(f'{cache}/r-cran-janeaustenr/{R_LIB}/janeaustenr/data/Rdata')
moby = r_datasets(f'{cache}/r-cran-tokenizers/{R_LIB}/tokenizers/data/Rdata')['mobydick']
opticks = open(f'{cache}/golang-1.19-src/usr/share/go-1.19/src/testdata/Isaac.Newton-Opticks.txt', encoding='utf-8').read()
BOOKS = [  # file, author, title, year, package, text
    ('austen-sense-and-sensibility', 'Jane Austen', 'Sense and Sensibility', 1811, 'r-cran-janeaustenr', '\n'.join(austen['sensesensibility'])),
    ('austen-pride-and-prejudice', 'Jane Austen', 'Pride and Prejudice', 1813, 'r-cran-janeaustenr', '\n'.join(austen['prideprejudice'])),
    ('austen-mansfield-park', 'Jane Austen', 'Mansfield Park', 1814, 'r-cran-janeaustenr', '\n'.join(austen['mansfieldpark'])),
    ('austen-emma', 'Jane Austen', 'Emma', 1815, 'r-cran-janeaustenr', '\n'.join(austen['emma'])),
    ('austen-northanger-abbey', 'Jane Austen', 'Northanger Abbey', 1817, 'r-cran-janeaustenr', '\n'.join(austen['northangerabbey'])),
    ('austen-persuasion', 'Jane Austen', 'Persuasion', 1817, 'r-cran-janeaustenr', '\n'.join(austen['persuasion'])),
    ('melville-moby-dick', 'Herman Melville', 'Moby Dick; or The Whale', 1851, 'r-cran-tokenizers', moby['value'][0]),
    ('newton-opticks', 'Isaac Newton', 'Opticks (4th edition)', 1730, 'golang-1.19-src', opticks),
]

START = re.compile(r'^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$', re.I | re.M)
END = re.compile(r'^(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg)', re.I | re.M)
NOTES = re.compile(r"^[^\n]*transcriber'?s notes?:[ \t]*\n.*?\n{4,}", re.I | re.M | re.S)  # a notes block
BOILERPLATE = re.compile(r"gutenberg|\betexts?\b|\A\s*produced by|transcriber'?s note|distributed proofread", re.I)
COMMON = set('the of and to a in that it was he i his her you with as for had is not but be at on by she my which all'.split())

def clean(text):
    text = text.lstrip('\ufeff').replace('\r\n', '\n').replace('\r', '\n')
    if m := START.search(text): text = text[m.end():]
    if m := END.search(text): text = text[:m.start()]
    text = NOTES.sub('\n\n', text)
    text = re.sub(r'^A NOTE ON THE TEXT$.*', '', text, flags=re.M | re.S)  # a modern editor's note
    text = re.sub(r'(\d+:)?https?://\S+', '', text)
    paras = []
    for p in re.split(r'\n[ \t]*\n', text):
        lines = [l.rstrip() for l in p.strip('\n').split('\n')]
        if not ''.join(lines).strip() or BOILERPLATE.search(p): continue
        if not any(l[:1].isspace() for l in lines):  # plain prose: one line per paragraph
            lines = [re.sub(r' {2,}', ' ', ' '.join(l.strip() for l in lines))]
        paras.append('\n'.join(re.sub(r'_([^_\n]+)_', r'\1', l) for l in lines))
    return '\n\n'.join(paras) + '\n'

total, rows = 0, ['file\tauthor\ttitle\tyear\tdebian_package\tversion\tbytes\tsha256']
for name, author, title, year, pkg, raw in BOOKS:
    text = clean(raw)
    words = re.findall(r'[a-z]+', text.lower())
    if len(text) < 20000 or sum(w in COMMON for w in words) < 0.2 * len(words):
        print(f'skipped {name}: not English prose', file=sys.stderr); continue
    data = text.encode('utf-8')
    path = os.path.join(out, name + '.txt')
    with open(path + '.tmp', 'wb') as f: f.write(data)
    os.replace(path + '.tmp', path)
    rows.append(f'{name}.txt\t{author}\t{title}\t{year}\t{pkg}\t{versions[pkg]}\t{len(data)}\t{hashlib.sha256(data).hexdigest()}')
    total += len(data)
with open(os.path.join(out, 'SOURCES.tsv'), 'w') as f: f.write('\n'.join(rows) + '\n')
print(f'{len(rows) - 1} books, {total} bytes ({total / 1e6:.2f} MB) in {out}')
EOF
