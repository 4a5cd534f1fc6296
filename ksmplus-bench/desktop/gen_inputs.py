#!/usr/bin/env python3
"""Inputs of the desktop benchmark (`ksmplus-bench desktop`), generated locally and
deterministically with the Python standard library only (zlib): nothing is downloaded.

    gen_inputs.py OUTDIR

writes into OUTDIR:
  doc1.pdf .. doc4.pdf   multi-page PDFs (text in the standard Helvetica/Times fonts, and a
                         Flate-compressed RGB image on every page), each different
  img1.png .. img5.*     five images of different sizes; img2 and img4 become JPEG when
                         ImageMagick's `convert` is present (else they stay PNG)
  page1.html .. page4.html  local web pages with text, a table and images (pic*.png)
  letter.rtf             a short formatted document for the word processor
  VERSION                the generator version; an OUTDIR with the same VERSION is reused

Every byte depends only on the file name's seed, so runs are comparable.
"""
import os
import random
import shutil
import struct
import subprocess
import sys
import zlib

VERSION = "3"

WORDS = (
    "memory page kernel merge scan share copy write fault anonymous region process "
    "desktop program library heap arena allocator buffer image document reader browser "
    "editor window toolkit render font glyph cache texture pixel layout paragraph table "
    "chapter section figure result thesis experiment measure saving profit overhead"
).split()


def sentence(rng, n):
    w = [rng.choice(WORDS) for _ in range(n)]
    w[0] = w[0].capitalize()
    return " ".join(w) + "."


def paragraph(rng, sentences=5):
    return " ".join(sentence(rng, rng.randint(6, 14)) for _ in range(sentences))


def rgb_image(w, h, seed):
    """Raw RGB rows (no filter byte): smooth gradients, a few discs and mild noise, so that
    it compresses like a photo rather than like a flat colour."""
    rng = random.Random(seed)
    a, b, c = rng.randint(1, 7), rng.randint(1, 7), rng.randint(1, 9)
    discs = [
        (rng.randrange(w), rng.randrange(h), rng.randint(h // 12 + 1, h // 4 + 2),
         bytes((rng.randrange(256), rng.randrange(256), rng.randrange(256))))
        for _ in range(6)
    ]
    noise = bytes(rng.randrange(24) for _ in range(4096))
    rows = []
    for y in range(h):
        gy = (y * 255) // max(1, h - 1)
        row = bytearray(w * 3)
        for x in range(w):
            gx = (x * 255) // max(1, w - 1)
            n = noise[(x * 7 + y * 13) & 4095]
            row[3 * x] = (gx * a // 7 + n) & 255
            row[3 * x + 1] = (gy * b // 7 + n) & 255
            row[3 * x + 2] = ((gx + gy) * c // 18 + 2 * n) & 255
        for (cx, cy, r, col) in discs:
            dy = y - cy
            if -r < dy < r:
                half = int((r * r - dy * dy) ** 0.5)
                x0, x1 = max(0, cx - half), min(w, cx + half)
                if x1 > x0:
                    row[3 * x0:3 * x1] = col * (x1 - x0)
        rows.append(bytes(row))
    return rows


def write_png(path, w, h, seed):
    rows = rgb_image(w, h, seed)
    raw = b"".join(b"\x00" + r for r in rows)

    def chunk(tag, data):
        c = tag + data
        return struct.pack(">I", len(data)) + c + struct.pack(">I", zlib.crc32(c) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n"
    png += chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 6))
    png += chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(png)


def pdf_escape(s):
    return s.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def write_pdf(path, pages, seed):
    rng = random.Random(seed)
    objs = []  # bytes of object i+1

    def add(body):
        objs.append(body)
        return len(objs)

    def stream(dict_extra, data):
        return (b"<< /Length %d %s >>\nstream\n" % (len(data), dict_extra)) + data + b"\nendstream"

    catalog = add(b"")  # filled below
    pages_id = add(b"")
    f1 = add(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    f2 = add(b"<< /Type /Font /Subtype /Type1 /BaseFont /Times-Roman >>")
    f3 = add(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica-Bold >>")
    kids = []
    for p in range(pages):
        iw, ih = 360, 240
        img = b"".join(rgb_image(iw, ih, seed * 1000 + p))
        im = add(stream(b"/Type /XObject /Subtype /Image /Width %d /Height %d "
                        b"/ColorSpace /DeviceRGB /BitsPerComponent 8 /Filter /FlateDecode" % (iw, ih),
                        zlib.compress(img, 6)))
        lines = []
        lines.append("BT /F3 16 Tf 72 760 Td (%s) Tj ET" % pdf_escape(
            "Chapter %d.%d  %s" % (seed, p + 1, sentence(rng, 4))))
        lines.append("q 1 0 0 1 0 0 cm 0.2 0.3 0.6 RG 72 748 m 540 748 l S Q")
        lines.append("BT /F1 10 Tf 13 TL 72 730 Td")
        y_lines = 0
        for _ in range(3):
            text = paragraph(rng)
            line = ""
            for word in text.split():
                if len(line) + len(word) > 92:
                    lines.append("(%s) '" % pdf_escape(line))
                    y_lines += 1
                    line = ""
                line += word + " "
            lines.append("(%s) '" % pdf_escape(line))
            lines.append("() '")
            y_lines += 2
        lines.append("ET")
        img_y = 730 - 13 * y_lines - 260
        lines.append("q %d 0 0 %d 126 %d cm /Im1 Do Q" % (iw, ih, img_y))
        lines.append("BT /F2 9 Tf 126 %d Td (Figure %d-%d: %s) Tj ET" % (
            img_y - 14, seed, p + 1, pdf_escape(sentence(rng, 7))))
        lines.append("BT /F2 11 Tf 13 TL 72 %d Td" % (img_y - 40))
        for _ in range(max(0, (img_y - 120) // 13)):
            lines.append("(%s) '" % pdf_escape(sentence(rng, 14)[:95]))
        lines.append("ET")
        lines.append("BT /F1 9 Tf 290 40 Td (%d) Tj ET" % (p + 1))
        content = "\n".join(lines).encode("latin-1")
        cs = add(stream(b"/Filter /FlateDecode", zlib.compress(content, 6)))
        page = add(b"<< /Type /Page /Parent %d 0 R /MediaBox [0 0 612 792] /Contents %d 0 R "
                   b"/Resources << /Font << /F1 %d 0 R /F2 %d 0 R /F3 %d 0 R >> "
                   b"/XObject << /Im1 %d 0 R >> >> >>" % (pages_id, cs, f1, f2, f3, im))
        kids.append(page)
    objs[catalog - 1] = b"<< /Type /Catalog /Pages %d 0 R >>" % pages_id
    objs[pages_id - 1] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (
        b" ".join(b"%d 0 R" % k for k in kids), len(kids))
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for i, body in enumerate(objs):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % (i + 1) + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    for off in offsets:
        out += b"%010d 00000 n \n" % off
    out += b"trailer\n<< /Size %d /Root %d 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objs) + 1, catalog, xref)
    with open(path, "wb") as f:
        f.write(out)


def write_html(path, n, rng, pics):
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>Local page %d</title>" % n,
             "<style>body{font-family:serif;max-width:60em;margin:2em auto;line-height:1.4}"
             "h1{color:#235}table{border-collapse:collapse}td,th{border:1px solid #999;padding:3px}"
             "img{max-width:100%%}.box{background:#eef;padding:1em;border-radius:8px}</style>",
             "</head><body><h1>Local page %d: %s</h1>" % (n, sentence(rng, 5))]
    for s in range(6):
        parts.append("<h2>Section %d.%d</h2><p>%s</p>" % (n, s + 1, paragraph(rng, 8)))
        if s % 2 == 0:
            pic = pics[(n + s) % len(pics)]
            parts.append("<figure><img src='%s' alt='figure'><figcaption>%s</figcaption></figure>" % (
                pic, sentence(rng, 8)))
        if s == 3:
            parts.append("<table><tr><th>approach</th><th>pages</th><th>saving</th></tr>")
            for r in range(12):
                parts.append("<tr><td>%s</td><td>%d</td><td>%.2f %%</td></tr>" % (
                    rng.choice(WORDS), rng.randint(10, 9000), rng.random() * 30))
            parts.append("</table>")
        parts.append("<div class='box'><ul>%s</ul></div>" % "".join(
            "<li>%s</li>" % sentence(rng, 9) for _ in range(5)))
    parts.append("</body></html>")
    with open(path, "w") as f:
        f.write("\n".join(parts))


def write_rtf(path, rng):
    parts = [r"{\rtf1\ansi\deff0{\fonttbl{\f0 Times New Roman;}{\f1 Arial;}}",
             r"\f1\fs36\b A letter about memory deduplication\b0\par\f0\fs24\par"]
    for i in range(20):
        parts.append(r"{\b %d.} %s\par\par" % (i + 1, paragraph(rng, 6)))
    parts.append("}")
    with open(path, "w") as f:
        f.write("\n".join(parts))


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    vfile = os.path.join(out, "VERSION")
    if os.path.exists(vfile) and open(vfile).read().strip() == VERSION:
        return
    for i in range(1, 5):
        write_pdf(os.path.join(out, "doc%d.pdf" % i), 12 + 2 * i, i)
    convert = shutil.which("convert")
    sizes = [(1024, 768), (1600, 1200), (800, 600), (2048, 1536), (1280, 960)]
    for i, (w, h) in enumerate(sizes, 1):
        png = os.path.join(out, "img%d.png" % i)
        write_png(png, w, h, 100 + i)
        if i in (2, 4) and convert:
            jpg = os.path.join(out, "img%d.jpg" % i)
            subprocess.run([convert, png, "-quality", "88", jpg], check=True)
            os.remove(png)
    pics = []
    for i, (w, h) in enumerate([(640, 400), (480, 320), (800, 500), (560, 360)], 1):
        name = "pic%d.png" % i
        write_png(os.path.join(out, name), w, h, 200 + i)
        pics.append(name)
    for i in range(1, 5):
        write_html(os.path.join(out, "page%d.html" % i), i, random.Random(300 + i), pics)
    write_rtf(os.path.join(out, "letter.rtf"), random.Random(400))
    with open(vfile, "w") as f:
        f.write(VERSION + "\n")


if __name__ == "__main__":
    main()
