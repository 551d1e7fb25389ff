/**
 * The dashboard page: one self-contained HTML document (no build step, no library, no
 * network but its own scheduler), kept as a string so the compiled binary carries it.
 * It listens to /events (Server-Sent Events) and redraws: workers, progress per task
 * kind, the task stream per worker thread with transfers, each worker's memory now (in
 * memory, the rest of its process, on disk, against its limit) and over time.
 *
 * @module
 */

/** The dashboard's HTML. */
export const DASHBOARD_PAGE = `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dist dashboard</title>
<meta name="viewport" content="width=device-width,initial-scale=1">
<style>
:root{--fg:#1d2330;--muted:#6b7385;--line:#e3e6ee;--bg:#f7f8fb;--ok:#2f9e62;--bad:#d0443a;--wait:#c9cfdb}
*{box-sizing:border-box}body{margin:0;font:14px/1.4 system-ui,-apple-system,Segoe UI,sans-serif;color:var(--fg);background:var(--bg)}
header{display:flex;gap:24px;align-items:baseline;padding:14px 22px;background:#1d2330;color:#fff;flex-wrap:wrap}
header h1{margin:0;font-size:20px}header .stat{color:#c9d1e4}header .stat b{color:#fff}
#live{margin-left:auto;font-size:12px}#live.on::before{content:"● ";color:#4cd18a}#live.off::before{content:"● ";color:#e06a5e}
main{display:grid;grid-template-columns:minmax(420px,1fr) minmax(420px,1fr);gap:16px;padding:16px 22px}
section{background:#fff;border:1px solid var(--line);border-radius:8px;padding:12px 14px;min-width:0}
section.wide{grid-column:1/-1}h2{margin:0 0 8px;font-size:15px}
.scroll{overflow-x:auto}
@media (max-width:920px){main{grid-template-columns:minmax(0,1fr)}th,td{padding:3px 5px}td .muted{display:block}}
table{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums}
th,td{text-align:right;padding:4px 8px;border-bottom:1px solid var(--line);white-space:nowrap}
th:first-child,td:first-child{text-align:left}th{color:var(--muted);font-weight:600;font-size:12px}
.bar{display:flex;height:16px;border-radius:4px;overflow:hidden;background:var(--wait);margin:3px 0 8px}
.bar span{display:block;height:100%}.done{background:var(--ok)}.erred{background:var(--bad)}.proc{background:#5b8def}
.row{display:flex;justify-content:space-between;font-size:13px}.muted{color:var(--muted)}
svg{width:100%;display:block}.legend{font-size:12px;color:var(--muted);margin-top:4px}
.legend i{display:inline-block;width:10px;height:10px;margin:0 4px 0 10px;border-radius:2px;vertical-align:-1px}
.problem{color:var(--bad);margin:6px 0 0;font-size:13px}.managed{background:#5b8def;fill:#5b8def}.unmanaged{background:#a9bde8;fill:#a9bde8}.spilled{background:#c9cfdb;fill:#c9cfdb}
</style></head><body>
<header><h1>dist</h1><span class="stat">scheduler <b id="address">…</b></span>
<span class="stat">workers <b id="nworkers">0</b></span><span class="stat">threads <b id="nthreads">0</b></span>
<span class="stat">tasks done <b id="ncompleted">0</b></span><span class="stat">failed <b id="nfailed">0</b></span>
<span class="stat">event-loop lag <b id="lag">0</b> ms</span><span id="live" class="off">connecting</span></header>
<main>
<section class="wide"><h2>Workers</h2><div class="scroll"><table id="workers"><thead><tr><th>worker</th><th>threads</th><th>keys</th>
<th>memory held</th><th>tasks running</th><th>CPU</th><th>RSS</th><th>in</th><th>out</th><th>last heartbeat</th></tr></thead>
<tbody></tbody></table></div><div id="problems"></div></section>
<section><h2>Progress <span class="muted">(tasks held now)</span></h2><div id="overall" data-percent="0"><div class="row"><b>all tasks</b><span id="overall-text" class="muted"></span></div>
<div class="bar"><span class="done" id="overall-bar" style="width:0"></span></div></div><div id="progress"></div>
<div class="legend"><i class="done"></i>done<i class="proc"></i>on workers (running or queued there)<i style="background:var(--wait)"></i>waiting<i class="erred"></i>erred</div></section>
<section><h2>Memory per worker <span class="muted">(now; the line is its limit)</span></h2><svg id="memory-now" viewBox="0 0 600 40"></svg>
<div class="legend"><i class="managed"></i>values in memory<i class="unmanaged"></i>rest of the process<i class="spilled"></i>values on disk</div>
<h2 style="margin-top:14px">Values held <span class="muted">(last 2 minutes)</span></h2><svg id="memory" viewBox="0 0 600 160" preserveAspectRatio="none"></svg>
<div class="legend" id="memory-legend"></div></section>
<section class="wide"><h2>Task stream <span class="muted">(last 20 s; a row per worker thread, transfers in red)</span></h2>
<svg id="stream" viewBox="0 0 1200 200" preserveAspectRatio="none"></svg><div class="legend" id="stream-legend"></div></section>
</main>
<script>
"use strict";
const WINDOW_MS = 20000, MEMORY_MS = 120000;
const tasks = [], transfers = [], memory = [];
const $ = (id) => document.getElementById(id);
const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);
const bytes = (n) => { const u = ["B","kB","MB","GB","TB"]; let i = 0; while (n >= 1000 && i < u.length - 1) { n /= 1000; i++; } return (i ? n.toFixed(1) : n) + " " + u[i]; };
// A well-mixed hash: names one character apart get far-apart colours.
const colorOf = (s) => { let h = 0x811c9dc5; for (const c of s) { h ^= c.charCodeAt(0); h = Math.imul(h, 0x01000193); }
  h ^= h >>> 15; h = Math.imul(h, 0x2c1b3c6d); h ^= h >>> 12; h = Math.imul(h, 0x297a2d39); h ^= h >>> 15;
  return "hsl(" + ((h >>> 0) % 360) + "," + (55 + ((h >>> 9) % 20)) + "%," + (42 + ((h >>> 17) % 16)) + "%)"; };
function render(s) {
  $("address").textContent = s.scheduler.address;
  $("nworkers").textContent = s.workers.length;
  $("nthreads").textContent = s.workers.reduce((n, w) => n + w.nthreads, 0);
  $("ncompleted").textContent = s.totals.completed;
  $("nfailed").textContent = s.totals.failed;
  $("lag").textContent = (s.scheduler.lag * 1000).toFixed(1);
  $("workers").tBodies[0].innerHTML = s.workers.map((w) => '<tr data-worker="' + esc(w.address) + '"><td>' + esc(w.name) +
    (w.name !== w.address ? ' <span class="muted">' + esc(w.address) + '</span>' : "") + "</td><td>" + w.nthreads + "</td><td>" + w.nkeys +
    "</td><td>" + bytes(w.managed) + (w.spilled ? " + " + bytes(w.spilled) + " on disk" : "") +
    (w.memoryLimit ? ' <span class="muted">of ' + bytes(w.memoryLimit) + "</span>" : "") + (w.paused ? " <b>paused</b>" : "") +
    (w.problems.length ? ' <b class="problem">spilling fails</b>' : "") +
    // Running: what its executors run (its heartbeat); the rest sent to it waits in its queue.
    "</td><td>" + w.executing + (w.processing > w.executing ? ' <span class="muted">+ ' + (w.processing - w.executing) + " queued</span>" : "") +
    "</td><td>" + Math.round(w.cpu * 100) + " %</td><td>" + bytes(w.rss) +
    "</td><td>" + bytes(w.bytesIn) + "</td><td>" + bytes(w.bytesOut) + "</td><td>" + w.lastSeen.toFixed(1) + " s ago</td></tr>").join("");
  // What the scheduler says is wrong with the queue (tasks no worker may run), then what
  // workers say is wrong on them, word for word (a spill that fails, and why).
  $("problems").innerHTML = (s.problems || []).map((p) =>
    '<p class="problem" data-scheduler><b>queue:</b> ' + esc(p) + "</p>").join("") +
    s.workers.flatMap((w) => w.problems.map((p) =>
    '<p class="problem" data-worker="' + esc(w.address) + '"><b>' + esc(w.name) + ":</b> " + esc(p) + "</p>")).join("");
  let done = 0, total = 0;
  const rows = Object.entries(s.progress).sort((a, b) => a[0].localeCompare(b[0])).map(([prefix, c]) => {
    const d = c.done, e = c.erred, p = c.processing;
    const t = d + e + p + c.waiting;
    done += d + e; total += t;
    const pct = (n) => (t ? (100 * n) / t : 0).toFixed(2) + "%";
    return '<div class="task-kind" data-prefix="' + esc(prefix) + '" data-done="' + d + '" data-erred="' + e + '" data-total="' + t + '">' +
      '<div class="row"><b>' + esc(prefix) + '</b><span class="muted">' + d + " / " + t + (e ? ", " + e + " erred" : "") + "</span></div>" +
      '<div class="bar"><span class="done" style="width:' + pct(d) + '"></span><span class="proc" style="width:' + pct(p) +
      '"></span><span class="erred" style="width:' + pct(e) + '"></span></div></div>';
  });
  $("progress").innerHTML = rows.join("") || '<p class="muted">No tasks held: a kind of task shows here until its last result is released.</p>';
  const percent = total ? Math.round((100 * done) / total) : 0;
  $("overall").dataset.percent = String(percent);
  $("overall-text").textContent = done + " / " + total + " (" + percent + " %)";
  $("overall-bar").style.width = percent + "%";
  drawStream(s); drawMemoryNow(s); drawMemory(s);
}
// Each worker's memory now, one bar each: values in memory, the rest of its process (its
// RSS less those), then values on disk; a line at its limit; a paused worker marked.
function drawMemoryNow(s) {
  const svg = $("memory-now"), W = 600, left = 120, right = 8, row = 26;
  const H = Math.max(1, s.workers.length) * row + 8; svg.setAttribute("viewBox", "0 0 " + W + " " + H); svg.style.height = H + "px";
  const parts = (w) => { const managed = Math.min(w.managed, w.rss || w.managed); return { managed, unmanaged: Math.max(0, w.rss - managed), spilled: w.spilled }; };
  const max = Math.max(1, ...s.workers.map((w) => { const p = parts(w); return Math.max(w.memoryLimit, p.managed + p.unmanaged + p.spilled); }));
  const x = (v) => left + (v / max) * (W - left - right);
  let out = "";
  s.workers.forEach((w, i) => {
    const y = i * row + 4, p = parts(w);
    out += '<g data-worker="' + esc(w.address) + '"' + (w.paused ? ' class="paused"' : "") + '><text x="4" y="' + (y + 15) + '" font-size="11" fill="' +
      (w.paused ? "#d0443a" : "#6b7385") + '">' + esc(w.name.length > 16 ? w.name.slice(0, 15) + "…" : w.name) + (w.paused ? " (paused)" : "") + "</text>";
    let at = 0;
    for (const kind of ["managed", "unmanaged", "spilled"]) {
      const v = p[kind];
      if (v > 0) out += '<rect class="' + kind + '" x="' + x(at).toFixed(1) + '" y="' + y + '" width="' + Math.max(1, x(at + v) - x(at)).toFixed(1) + '" height="18"><title>' +
        esc(w.name) + ": " + bytes(v) + " " + ({ managed: "of values in memory", unmanaged: "more in the process", spilled: "of values on disk" })[kind] + "</title></rect>";
      at += v;
    }
    if (w.memoryLimit > 0) out += '<line class="limit" x1="' + x(w.memoryLimit).toFixed(1) + '" x2="' + x(w.memoryLimit).toFixed(1) + '" y1="' + (y - 2) + '" y2="' + (y + 20) +
      '" stroke="#1d2330" stroke-width="2"><title>limit ' + bytes(w.memoryLimit) + "</title></line>";
    if (w.paused) out += '<rect x="' + left + '" y="' + (y - 1) + '" width="' + (W - left - right) + '" height="20" fill="none" stroke="#d0443a" stroke-dasharray="4 3"/>';
    out += "</g>";
  });
  svg.innerHTML = out || '<text x="4" y="20" font-size="12" fill="#6b7385">No workers.</text>';
}
function drawStream(s) {
  const svg = $("stream"), now = s.now, from = now - WINDOW_MS, W = 1200, lanes = [];
  for (const w of s.workers) { for (let t = 0; t < w.nthreads; t++) lanes.push({ key: w.address + "#" + t, label: w.name + " #" + t }); lanes.push({ key: w.address + "#in", label: w.name + " in" }); }
  const index = new Map(lanes.map((l, i) => [l.key, i]));
  const H = Math.max(1, lanes.length) * 22 + 20; svg.setAttribute("viewBox", "0 0 " + W + " " + H); svg.style.height = H + "px";
  const x = (t) => 140 + ((t - from) / WINDOW_MS) * (W - 150);
  let out = lanes.map((l, i) => '<text x="4" y="' + (i * 22 + 15) + '" font-size="11" fill="#6b7385">' + esc(l.label) + "</text>").join("");
  const seen = new Set();
  for (const t of tasks) {
    if (t.stop < from) continue;
    const lane = index.get(t.worker + "#" + t.thread); if (lane === undefined) continue;
    seen.add(t.prefix);
    const x0 = x(Math.max(t.start, from)), w = Math.max(1.5, x(t.stop) - x0);
    out += '<rect class="task" x="' + x0.toFixed(1) + '" y="' + (lane * 22 + 3) + '" width="' + w.toFixed(1) + '" height="16" fill="' +
      (t.status === "erred" ? "#d0443a" : colorOf(t.prefix)) + '"><title>' + esc(t.key) + " (" + (t.stop - t.start).toFixed(1) + " ms)</title></rect>";
  }
  for (const t of transfers) {
    if (t.stop < from) continue;
    const lane = index.get(t.to + "#in"); if (lane === undefined) continue;
    const x0 = x(Math.max(t.start, from)), w = Math.max(1.5, x(t.stop) - x0);
    out += '<rect class="transfer" x="' + x0.toFixed(1) + '" y="' + (lane * 22 + 3) + '" width="' + w.toFixed(1) + '" height="16" fill="#e0453a" opacity="0.7"><title>' +
      bytes(t.nbytes) + " from " + esc(t.from) + "</title></rect>";
  }
  svg.innerHTML = out;
  $("stream-legend").innerHTML = [...seen].sort().map((p) => '<i style="background:' + colorOf(p) + '"></i>' + esc(p)).join("");
}
function drawMemory(s) {
  const svg = $("memory"), now = s.now, from = now - MEMORY_MS, pts = memory.filter((m) => m.t >= from);
  const addresses = s.workers.map((w) => w.address), names = new Map(s.workers.map((w) => [w.address, w.name]));
  const max = Math.max(1, ...pts.flatMap((m) => Object.values(m.workers)));
  const x = (t) => ((t - from) / MEMORY_MS) * 600, y = (v) => 140 - (v / max) * 126;
  // Axes: the largest value held, half of it and zero; the time back from now.
  let out = '<text class="y-axis" x="4" y="12" font-size="11" fill="#6b7385">' + bytes(max) + "</text>";
  for (const v of [max, max / 2, 0]) {
    out += '<line x1="0" x2="600" y1="' + y(v).toFixed(1) + '" y2="' + y(v).toFixed(1) + '" stroke="#e3e6ee"/>';
    if (v !== max) out += '<text class="y-axis" x="4" y="' + (y(v) - 2).toFixed(1) + '" font-size="10" fill="#6b7385">' + bytes(v) + "</text>";
  }
  for (const back of [120, 90, 60, 30, 0]) {
    const at = x(now - back * 1000);
    out += '<text class="x-axis" x="' + Math.min(596, Math.max(4, at)).toFixed(1) + '" y="156" font-size="10" fill="#6b7385" text-anchor="' +
      (back === 120 ? "start" : back === 0 ? "end" : "middle") + '">' + (back === 0 ? "now" : "-" + back + " s") + "</text>";
  }
  for (const a of addresses) {
    const line = pts.filter((m) => a in m.workers).map((m) => x(m.t).toFixed(1) + "," + y(m.workers[a]).toFixed(1)).join(" ");
    if (line) out += '<polyline fill="none" stroke-width="2" stroke="' + colorOf(a) + '" points="' + line + '"/>';
  }
  svg.innerHTML = out;
  $("memory-legend").innerHTML = addresses.map((a) => '<i style="background:' + colorOf(a) + '"></i>' + esc(names.get(a))).join("");
}
function connect() {
  const source = new EventSource("/events");
  source.addEventListener("snapshot", (e) => {
    const s = JSON.parse(e.data);
    tasks.push(...s.tasks); transfers.push(...s.transfers); memory.push(...s.memory);
    const cut = s.now - Math.max(WINDOW_MS, MEMORY_MS);
    while (tasks.length && (tasks.length > 20000 || tasks[0].stop < cut)) tasks.shift();
    while (transfers.length && (transfers.length > 5000 || transfers[0].stop < cut)) transfers.shift();
    while (memory.length && memory[0].t < cut) memory.shift();
    $("live").className = "on"; $("live").textContent = "live";
    render(s);
  });
  source.onerror = () => { $("live").className = "off"; $("live").textContent = "reconnecting"; };
}
connect();
</script></body></html>
`;
