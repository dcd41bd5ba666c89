"""The page at ``GET /``: drop a screenshot, type an instruction, see the route, the text and the click.

One self-contained HTML document (inline CSS and JavaScript, no CDN: servers run
offline). It calls ``GET /v1/models`` and ``POST /v1/act`` with the API key typed into
it, and shows the adapter that acted, every adapter's probability as a bar, the
generated text, the parsed action, and a marker where a parsed ``click(x=…, y=…)``
lands on the screenshot (pixel coordinates of the uploaded image).
"""

from __future__ import annotations

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>vlrouter</title>
<style>
  :root { --fg: #1d2330; --muted: #667085; --line: #d0d5dd; --accent: #2f6fed; --bad: #c4320a; }
  * { box-sizing: border-box; }
  body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg); margin: 0;
         background: #f6f7f9; }
  header { padding: 14px 24px; background: #fff; border-bottom: 1px solid var(--line); display: flex;
           align-items: baseline; gap: 16px; }
  header h1 { font-size: 18px; margin: 0; }
  header span { color: var(--muted); }
  main { display: grid; grid-template-columns: minmax(320px, 1.3fr) minmax(280px, 1fr); gap: 20px; padding: 20px 24px; }
  section { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 16px; }
  label { display: block; font-weight: 600; margin: 10px 0 4px; }
  input[type=text], input[type=password], select { width: 100%; padding: 8px 10px; border: 1px solid var(--line);
         border-radius: 6px; font: inherit; }
  button { margin-top: 12px; padding: 9px 18px; border: 0; border-radius: 6px; background: var(--accent);
           color: #fff; font: inherit; font-weight: 600; cursor: pointer; }
  button:disabled { opacity: .5; cursor: default; }
  #drop { border: 2px dashed var(--line); border-radius: 8px; padding: 18px; text-align: center; color: var(--muted);
          cursor: pointer; }
  #drop.over { border-color: var(--accent); color: var(--accent); }
  #stage { position: relative; display: inline-block; margin-top: 12px; max-width: 100%; }
  #shot { display: none; max-width: 100%; border: 1px solid var(--line); border-radius: 4px; }
  #marker { display: none; position: absolute; width: 22px; height: 22px; margin: -11px 0 0 -11px;
            border: 3px solid #e11d48; border-radius: 50%; box-shadow: 0 0 0 3px rgba(255,255,255,.8);
            pointer-events: none; }
  #marker::after { content: ""; position: absolute; left: 6px; top: 6px; width: 4px; height: 4px;
                   background: #e11d48; border-radius: 50%; }
  .kv { display: grid; grid-template-columns: 110px 1fr; gap: 4px 10px; margin: 8px 0 14px; }
  .kv div:nth-child(odd) { color: var(--muted); }
  #adapter { font-weight: 700; font-size: 17px; }
  .bar { display: grid; grid-template-columns: 130px 1fr 56px; gap: 8px; align-items: center; margin: 4px 0; }
  .bar .track { background: #eef0f3; border-radius: 4px; height: 14px; overflow: hidden; }
  .bar .fill { background: var(--accent); height: 100%; }
  .bar.top .fill { background: #12a150; }
  .bar .p { text-align: right; font-variant-numeric: tabular-nums; color: var(--muted); }
  pre { background: #f2f4f7; padding: 10px; border-radius: 6px; white-space: pre-wrap; word-break: break-word;
        margin: 4px 0 12px; }
  #error { color: var(--bad); font-weight: 600; white-space: pre-wrap; }
  .muted { color: var(--muted); }
</style>
</head>
<body>
<header><h1>vlrouter</h1><span>route a screenshot + instruction to its adapter, then act</span></header>
<main>
  <section>
    <div id="drop" tabindex="0">Drop a screenshot here, or click to choose one (PNG, JPEG, WebP)</div>
    <input id="file" type="file" accept="image/png,image/jpeg,image/webp" hidden>
    <div id="stage"><img id="shot" alt="screenshot"><div id="marker" title="parsed click"></div></div>
    <label for="prompt">Instruction</label>
    <input id="prompt" type="text" placeholder="Click March 29">
    <label for="model">Model</label>
    <select id="model"><option value="auto">auto (route)</option></select>
    <label for="key">API key <span class="muted">(only if the server was started with one)</span></label>
    <input id="key" type="password" autocomplete="off">
    <button id="go" disabled>Act</button>
    <div id="error"></div>
  </section>
  <section id="result">
    <div class="kv">
      <div>adapter</div><div id="adapter" class="muted">-</div>
      <div>routed</div><div id="routed">-</div>
      <div>confidence</div><div id="confidence">-</div>
      <div>action</div><div id="action">-</div>
      <div>timings</div><div id="timings">-</div>
    </div>
    <label>Probability of every adapter</label>
    <div id="probs" class="muted">-</div>
    <label>Generated text</label>
    <pre id="text">-</pre>
  </section>
</main>
<script>
(function () {
  const $ = (id) => document.getElementById(id);
  let imageB64 = null;
  const key = $("key");
  key.value = sessionStorage.getItem("vlrouter-key") || "";
  key.addEventListener("change", () => { sessionStorage.setItem("vlrouter-key", key.value); loadModels(); });

  function headers() {
    const h = {"Content-Type": "application/json"};
    if (key.value) h["Authorization"] = "Bearer " + key.value;
    return h;
  }
  function ready() { $("go").disabled = !(imageB64 && $("prompt").value.trim()); }
  function showError(msg) { $("error").textContent = msg || ""; }

  async function loadModels() {
    try {
      const r = await fetch("v1/models", {headers: headers()});
      if (!r.ok) return;
      const data = (await r.json()).data || [];
      const sel = $("model"), keep = sel.value;
      sel.innerHTML = "";
      for (const m of data) {
        const o = document.createElement("option");
        o.value = m.id;
        o.textContent = m.id === "auto" ? "auto (route)" : m.id === "base" ? "base (no adapter)" : m.id;
        sel.appendChild(o);
      }
      if ([...sel.options].some((o) => o.value === keep)) sel.value = keep;
    } catch (e) { /* the page still works with "auto" */ }
  }

  function takeFile(file) {
    if (!file) return;
    const reader = new FileReader();
    reader.onload = () => {
      const url = String(reader.result);
      imageB64 = url.slice(url.indexOf(",") + 1);
      const img = $("shot");
      img.src = url;
      img.style.display = "block";
      $("marker").style.display = "none";
      ready();
    };
    reader.readAsDataURL(file);
  }
  const drop = $("drop");
  drop.addEventListener("click", () => $("file").click());
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("file").click(); });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault(); drop.classList.remove("over"); takeFile(e.dataTransfer.files[0]);
  });
  $("file").addEventListener("change", (e) => takeFile(e.target.files[0]));
  $("prompt").addEventListener("input", ready);
  $("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && !$("go").disabled) act(); });
  $("go").addEventListener("click", act);

  function bars(probs, top) {
    const box = $("probs");
    box.innerHTML = "";
    box.classList.remove("muted");
    const names = Object.keys(probs);
    if (!names.length) { box.textContent = "(adapter chosen by the request: no routing)"; box.classList.add("muted"); }
    for (const name of names) {
      const p = probs[name];
      const row = document.createElement("div");
      row.className = "bar" + (name === top ? " top" : "");
      row.dataset.adapter = name;
      row.innerHTML = '<span class="name"></span><div class="track"><div class="fill"></div></div>' +
                      '<span class="p"></span>';
      row.querySelector(".name").textContent = name;
      row.querySelector(".fill").style.width = (100 * p).toFixed(1) + "%";
      row.querySelector(".p").textContent = p.toFixed(3);
      box.appendChild(row);
    }
  }

  function mark(action) {
    const m = $("marker"), img = $("shot");
    const a = action && action.args;
    if (!a || typeof a.x !== "number" || typeof a.y !== "number" || !img.naturalWidth) {
      m.style.display = "none"; return;
    }
    const sx = img.clientWidth / img.naturalWidth, sy = img.clientHeight / img.naturalHeight;
    m.style.left = (a.x * sx) + "px";
    m.style.top = (a.y * sy) + "px";
    m.dataset.x = a.x; m.dataset.y = a.y;
    m.style.display = "block";
  }

  async function act() {
    showError("");
    $("go").disabled = true;
    $("adapter").textContent = "…";
    try {
      const body = {image: imageB64, prompt: $("prompt").value, model: $("model").value, max_new_tokens: 64};
      const r = await fetch("v1/act", {method: "POST", headers: headers(), body: JSON.stringify(body)});
      const data = await r.json();
      if (!r.ok) {
        $("adapter").textContent = "-";
        showError((data.error && data.error.message) || ("HTTP " + r.status));
        return;
      }
      $("adapter").textContent = data.adapter;
      $("adapter").classList.remove("muted");
      $("routed").textContent = data.routed + (data.fallback ? " (below min_confidence: fallback)" : "");
      $("confidence").textContent = Number(data.confidence).toFixed(4);
      $("action").textContent = data.action ? data.action.call : "(the text did not parse)";
      const t = data.timings || {};
      $("timings").textContent = "route " + (t.route_ms || 0).toFixed(1) + " ms, generate " +
                                 (t.generate_ms || 0).toFixed(1) + " ms";
      $("text").textContent = data.text;
      bars(data.probs || {}, data.routed);
      mark(data.action);
    } catch (e) {
      $("adapter").textContent = "-";
      showError(String(e));
    } finally {
      ready();
    }
  }
  loadModels();
})();
</script>
</body>
</html>
"""
