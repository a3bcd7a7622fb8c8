"""The annotation page served by `frugalseg annotate`: one self-contained HTML file, no external assets.

Left: the queries (best first; answered ones ticked). Right: the current query's neighbourhood, scaled
up, with the queried region outlined and its labels shown as a translucent colour; painting only ever
changes pixels inside the region. Tools: a class palette (click, or keys 1-9; 0 = void "cannot tell"),
a brush size, "fill region" (most regions are one class: one click), "reset" (back to the model's
prediction) and "save" (Enter), which posts the region's labels and moves to the next query.
"""

from __future__ import annotations

import html
import json

from frugalseg.data.labels import LabelSpec

__all__ = ["annotate_page"]


def annotate_page(doc: dict, labels: LabelSpec) -> str:
    classes = [{"id": k, "name": n, "rgb": list(c)} for k, (n, c) in enumerate(zip(labels.names, labels.palette))]
    classes.append({"id": labels.ignore_index, "name": "void (cannot tell)", "rgb": [40, 40, 40]})
    config = json.dumps({"classes": classes})
    title = f"frugalseg annotate: {html.escape(str(doc.get('data', '')))} ({len(doc['queries'])} queries)"
    return _TEMPLATE.replace("__TITLE__", title).replace("__CONFIG__", config).replace(
        "__STRATEGY__", html.escape(str(doc.get("strategy", ""))))


_TEMPLATE = r"""<!doctype html>
<html><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body{font-family:system-ui,sans-serif;margin:0;display:flex;height:100vh;color:#222}
#side{width:290px;overflow-y:auto;border-right:1px solid #ddd;padding:8px;box-sizing:border-box}
#side h2{font-size:15px;margin:4px 0 8px}
.q{display:block;width:100%;text-align:left;margin:2px 0;padding:5px;border:1px solid #ccc;background:#fafafa;
   cursor:pointer;font-size:12px}
.q.current{border-color:#1565c0;background:#e3f2fd}.q.done::after{content:" ✓";color:#2e7d32;font-weight:bold}
#main{flex:1;padding:12px;overflow:auto}
#tools button{margin:2px;padding:5px 9px;cursor:pointer}
.class-btn{border:2px solid transparent}.class-btn.active{border-color:#000}
.sw{display:inline-block;width:12px;height:12px;margin-right:5px;vertical-align:middle;border:1px solid #555}
canvas{border:1px solid #999;image-rendering:pixelated;cursor:crosshair;margin-top:8px}
#why{font-size:13px;color:#444;margin:6px 0}#status{margin-left:10px;font-size:13px}
</style></head><body>
<div id="side"><h2>Queries (__STRATEGY__)</h2><div id="query-list"></div></div>
<div id="main">
  <div id="title"></div><div id="why"></div>
  <div id="tools"><span id="classes"></span>
    brush <input id="brush" type="range" min="1" max="12" value="3">
    <button id="fill">fill region</button><button id="reset">reset</button>
    <button id="save">save (Enter)</button><span id="status"></span></div>
  <canvas id="canvas"></canvas>
</div>
<script>
const CONFIG = __CONFIG__;
let queries = [], current = null, task = null, labels = null, image = null, cls = CONFIG.classes[1] ? 1 : 0;
let scale = 4, painting = false;
const canvas = document.getElementById('canvas'), ctx = canvas.getContext('2d');
const colour = id => (CONFIG.classes.find(c => c.id === id) || {rgb: [255, 0, 255]}).rgb;

function setStatus(text) { document.getElementById('status').textContent = text; }

function buildClasses() {
  const box = document.getElementById('classes');
  CONFIG.classes.forEach((c, i) => {
    const b = document.createElement('button');
    b.className = 'class-btn'; b.dataset.class = c.id;
    b.innerHTML = `<span class="sw" style="background:rgb(${c.rgb})"></span>${i < 9 ? i + 1 : 0}: ${c.name}`;
    b.onclick = () => { cls = c.id; markClass(); };
    box.appendChild(b);
  });
  markClass();
}
function markClass() {
  document.querySelectorAll('.class-btn').forEach(b => b.classList.toggle('active', +b.dataset.class === cls));
}

async function loadQueries() {
  queries = await (await fetch('/api/queries')).json();
  const list = document.getElementById('query-list'); list.innerHTML = '';
  queries.forEach(q => {
    const b = document.createElement('button');
    b.className = 'q' + (q.answered ? ' done' : '') + (current && q.id === current.id ? ' current' : '');
    b.id = 'query-' + q.id; b.textContent = `${q.id} · ${q.sample} · ${q.pixels} px`;
    b.onclick = () => openQuery(q.id);
    list.appendChild(b);
  });
}

async function openQuery(id) {
  current = queries.find(q => q.id === id);
  task = await (await fetch('/api/task/' + id)).json();
  labels = Uint8Array.from(task.start);
  image = new Image();
  image.onload = () => {
    scale = Math.max(1, Math.floor(Math.min(640 / task.width, 520 / task.height)));
    canvas.width = task.width * scale; canvas.height = task.height * scale;
    draw();
  };
  image.src = '/api/image/' + id + '.png?' + Date.now();
  document.getElementById('title').innerHTML = `<b>${current.id}</b> · ${current.sample} · region ${current.region}`;
  document.getElementById('why').textContent = current.why;
  setStatus(task.answered ? 'answered before (showing the saved labels)' : '');
  document.querySelectorAll('.q').forEach(b => b.classList.toggle('current', b.id === 'query-' + id));
}

function draw() {
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(image, 0, 0, canvas.width, canvas.height);
  const w = task.width, h = task.height, over = ctx.getImageData(0, 0, canvas.width, canvas.height);
  for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) {
    const k = y * w + x;
    if (!task.region[k]) continue;
    const rgb = colour(labels[k]);
    const edge = x === 0 || y === 0 || x === w - 1 || y === h - 1 || !task.region[k - 1] || !task.region[k + 1]
      || !task.region[k - w] || !task.region[k + w];
    for (let dy = 0; dy < scale; dy++) for (let dx = 0; dx < scale; dx++) {
      const p = ((y * scale + dy) * canvas.width + x * scale + dx) * 4;
      if (edge && (dx === 0 || dy === 0)) {
        over.data[p] = 255; over.data[p + 1] = 230; over.data[p + 2] = 0; continue;
      }
      for (let c = 0; c < 3; c++) over.data[p + c] = 0.55 * over.data[p + c] + 0.45 * rgb[c];
    }
  }
  ctx.putImageData(over, 0, 0);
}

function paintAt(ev) {
  const r = canvas.getBoundingClientRect();
  const cx = Math.floor((ev.clientX - r.left) / scale), cy = Math.floor((ev.clientY - r.top) / scale);
  const rad = +document.getElementById('brush').value;
  for (let y = cy - rad; y <= cy + rad; y++) for (let x = cx - rad; x <= cx + rad; x++) {
    if (x < 0 || y < 0 || x >= task.width || y >= task.height) continue;
    if ((x - cx) ** 2 + (y - cy) ** 2 > rad * rad) continue;
    const k = y * task.width + x;
    if (task.region[k]) labels[k] = cls;
  }
  draw();
}
canvas.addEventListener('mousedown', e => { painting = true; paintAt(e); });
canvas.addEventListener('mousemove', e => { if (painting) paintAt(e); });
window.addEventListener('mouseup', () => { painting = false; });

document.getElementById('fill').onclick = () => {
  for (let k = 0; k < labels.length; k++) if (task.region[k]) labels[k] = cls;
  draw();
};
document.getElementById('reset').onclick = () => { labels = Uint8Array.from(task.start); draw(); };
document.getElementById('save').onclick = save;
window.addEventListener('keydown', e => {
  if (e.key === 'Enter') save();
  const n = parseInt(e.key, 10);
  if (!isNaN(n)) {
    const c = CONFIG.classes[n === 0 ? CONFIG.classes.length - 1 : n - 1];
    if (c) { cls = c.id; markClass(); }
  }
});

async function save() {
  if (!current) return;
  setStatus('saving…');
  const res = await fetch('/api/answer/' + current.id, {method: 'POST', headers: {'Content-Type': 'application/json'},
                                                        body: JSON.stringify({labels: Array.from(labels)})});
  const out = await res.json();
  if (!res.ok) { setStatus('not saved: ' + out.error); return; }
  setStatus('saved to ' + out.mask);
  const done = current.id;
  await loadQueries();
  const next = queries.find(q => !q.answered);
  if (next && next.id !== done) openQuery(next.id);
  else setStatus('saved to ' + out.mask + (next ? '' : ' · all queries answered'));
}

buildClasses();
loadQueries().then(() => { if (queries.length) openQuery((queries.find(q => !q.answered) || queries[0]).id); });
</script></body></html>
"""
