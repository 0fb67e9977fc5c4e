"""``diskspec explain --html``: one self-contained page, a hex view beside the structure tree.

Hovering a field highlights its bytes. No network, no external files: the CSS and the script
are inline. Opened with ``#selftest`` the page hovers some fields itself and writes what it
saw into ``<pre id="selftest-result">`` (JSON), so a headless browser can check it.
"""

from __future__ import annotations

import json
from html import escape

from .tree import Item, Read, show

__all__ = ["HEX_CAP", "render_html"]

HEX_CAP = 1024  # bytes of hex shown per structure
_ROW = 16

_CSS = """
body { font: 13px/1.4 sans-serif; margin: 0; display: flex; height: 100vh; color: #1b2631; }
#hex, #tree { overflow: auto; padding: 8px 12px; }
#hex { font: 12px/1.5 monospace; background: #fbfcfc; border-right: 1px solid #d5d8dc;
       flex: 0 0 auto; }
#tree { flex: 1 1 auto; }
.region { margin-bottom: 10px; }
.region h3 { font: bold 12px sans-serif; margin: 6px 0 2px; }
.off { color: #909497; margin-right: 8px; }
.b { padding: 0 1px; }
.b.hl { background: #ffd54f; outline: 1px solid #f39c12; }
ul { list-style: none; padding-left: 16px; margin: 0; }
li > .f { cursor: pointer; font-family: monospace; }
li > .f:hover { background: #fff3c4; }
.val { color: #1f618d; }
.note { color: #196f3d; margin-left: 6px; }
.doc { color: #7f8c8d; margin-left: 6px; font-size: 12px; }
h2 { font-size: 15px; margin: 12px 0 4px; }
#selftest-result { display: none; }
"""

_JS = """
(function () {
  var lit = [];
  function clear() { lit.forEach(function (b) { b.classList.remove('hl'); }); lit = []; }
  function light(el) {
    clear();
    var s = +el.dataset.s, e = +el.dataset.e;
    for (var o = s; o < e; o++) {
      var b = document.getElementById('b' + o);
      if (b) { b.classList.add('hl'); lit.push(b); }
    }
    if (lit.length) { lit[0].scrollIntoView({block: 'nearest'}); }
    return lit.length;
  }
  document.querySelectorAll('.f').forEach(function (el) {
    el.addEventListener('mouseover', function () { light(el); });
  });
  function selftest() {
    var fields = document.querySelectorAll('.f');
    var checked = 0, failures = [], lastColor = '', plain = '';
    var any = document.querySelector('.b');
    if (any) { plain = getComputedStyle(any).backgroundColor; }
    fields.forEach(function (el) {
      if (checked >= 12 || !document.getElementById('b' + el.dataset.s)) { return; }
      var want = 0;
      for (var o = +el.dataset.s; o < +el.dataset.e; o++) {
        if (document.getElementById('b' + o)) { want++; }
      }
      el.dispatchEvent(new MouseEvent('mouseover', {bubbles: true}));
      var got = document.querySelectorAll('.b.hl').length;
      lastColor = got ? getComputedStyle(document.querySelector('.b.hl')).backgroundColor : '';
      if (got !== want || got === 0 || lastColor === plain) {
        failures.push(el.dataset.name + ': ' + got + ' of ' + want);
      }
      checked++;
    });
    var out = document.getElementById('selftest-result');
    out.textContent = JSON.stringify({
      fields: fields.length, hexBytes: document.querySelectorAll('.b').length,
      checked: checked, failures: failures, highlight: lastColor, plain: plain,
      ok: checked > 0 && failures.length === 0
    });
    out.style.display = 'block';
  }
  if (location.hash === '#selftest') { selftest(); }
})();
"""


def _regions(sections: list[Item]) -> list[tuple[int, int, str]]:
    spans = sorted((s.offset, s.offset + min(s.size, HEX_CAP), s.name) for s in sections
                   if s.size > 0)
    merged: list[tuple[int, int, str]] = []
    for start, end, name in spans:
        if merged and start <= merged[-1][1]:
            a, b, n = merged[-1]
            merged[-1] = (a, max(b, end), n)
        else:
            merged.append((start, end, name))
    return merged


def _hex_view(regions: list[tuple[int, int, str]], data: dict[int, bytes]) -> list[str]:
    out = []
    for start, end, name in regions:
        out.append(f'<div class="region"><h3>{escape(name)} @ {start:#x}</h3>')
        raw = data[start]
        row = start - start % _ROW
        while row < end:
            cells = []
            for o in range(row, row + _ROW):
                if start <= o < end and o - start < len(raw):
                    cells.append(f'<span class="b" id="b{o}">{raw[o - start]:02x}</span>')
                else:
                    cells.append('<span class="b">  </span>')
            out.append(f'<div><span class="off">{row:08x}</span>{" ".join(cells)}</div>')
            row += _ROW
        out.append("</div>")
    return out


def _tree(item: Item) -> list[str]:
    end = item.offset + item.size
    label = escape(item.name)
    if not item.children:
        label += f' = <span class="val">{escape(show(item.value))}</span>'
    title = escape(item.attr or item.spec_path, quote=True)
    line = (f'<li><span class="f" data-name="{escape(item.name, quote=True)}" '
            f'data-s="{item.offset}" data-e="{end}" title="{title}">{label}</span>')
    if item.note:
        line += f'<span class="note">&rArr; {escape(item.note)}</span>'
    if item.doc:
        line += f'<span class="doc">{escape(item.doc)}</span>'
    out = [line]
    if item.children:
        out.append("<ul>")
        for child in item.children:
            out.extend(_tree(child))
        out.append("</ul>")
    out.append("</li>")
    return out


def render_html(title: str, sections: list[Item], read: Read) -> str:
    """The page; ``read(offset, n)`` gives the bytes shown in the hex view."""
    regions = _regions(sections)
    data = {start: read(start, end - start) for start, end, _ in regions}
    body = ['<div id="hex">', *_hex_view(regions, data), "</div>", '<div id="tree">',
            f"<h2>{escape(title)}</h2>", '<pre id="selftest-result"></pre>']
    for section in sections:
        body.append("<ul>")
        body.extend(_tree(section))
        body.append("</ul>")
    body.append("</div>")
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        *body,
        f"<script>{_JS}</script>",
        f"<!-- {escape(json.dumps({'sections': [s.name for s in sections]}))} -->",
        "</body></html>",
        "",
    ])
