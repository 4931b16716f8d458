// The served viewer: routes #/{sae}/overview, #/{sae}/feature/{i}, #/{sae}/prompt.
"use strict";
const main = document.getElementById("main");
const state = { sae: null, index: 0, n: 0 };

async function api(path, opts) {
  const r = await fetch("/api" + path, opts);
  const body = await r.json();
  if (!r.ok) throw new Error(body.detail ? JSON.stringify(body.detail) : r.statusText);
  return body;
}
function fail(e) { main.innerHTML = ""; main.appendChild(SF.el("div", { class: "error", text: String(e.message || e) })); }
function go(view, arg) { location.hash = `#/${encodeURIComponent(state.sae)}/${view}` + (arg === undefined ? "" : `/${arg}`); }

async function showFeature(i) {
  state.index = i; document.getElementById("latent").value = i;
  const doc = await api(`/dictionaries/${state.sae}/features/${i}`);
  SF.renderFeature(main, state.sae, doc, (j) => go("feature", j));
  const card = main.querySelector(".feature-card");
  const form = SF.el("div", { class: "row" }, [
    SF.el("input", { id: "interp-text", placeholder: "your interpretation", style: "flex:1" }),
    SF.el("button", { id: "interp-save", text: "save", onclick: async () => {
      await api(`/dictionaries/${state.sae}/features/${i}/interpretation`, { method: "PUT",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ text: document.getElementById("interp-text").value }) });
      showFeature(i); } }),
    SF.el("button", { id: "bookmark", text: doc.bookmarked ? "unbookmark" : "bookmark", onclick: async () => {
      await api(`/dictionaries/${state.sae}/features/${i}/bookmark`, { method: doc.bookmarked ? "DELETE" : "POST",
        headers: { "Content-Type": "application/json" }, body: "{}" });
      showFeature(i); } })]);
  card.insertBefore(form, card.children[3]);
}

async function showOverview() {
  const [info, freqs] = await Promise.all([api(`/dictionaries/${state.sae}`), api(`/dictionaries/${state.sae}/frequencies`)]);
  main.innerHTML = "";
  const m = info.metrics || {};
  const dead = freqs.filter((f) => f[1] === 0).length;
  main.appendChild(SF.el("div", { class: "card", id: "overview" }, [
    SF.el("h2", { text: `${state.sae}: ${info.summary.d_sae} latents, ${info.summary.n_tokens} tokens analysed, ${dead} dead` }),
    SF.el("div", { class: "stats" }, Object.entries(m).filter(([, v]) => typeof v === "number")
      .map(([k, v]) => SF.el("span", { text: `${k} ${SF.fmt(v)}` }))),
    SF.el("h4", { text: "Latent firing frequency" }), SF.freqHistogram(freqs.map((f) => f[1]), 30)]));
}

async function showPrompt() {
  main.innerHTML = "";
  const out = SF.el("div", { id: "prompt-out" });
  const area = SF.el("textarea", { id: "prompt-text", rows: "4", placeholder: "type a text" });
  const run = async () => {
    out.textContent = "running…";
    try {
      const res = await api(`/dictionaries/${state.sae}/infer`, { method: "POST",
        headers: { "Content-Type": "application/json" }, body: JSON.stringify({ text: area.value }) });
      out.innerHTML = "";
      for (const t of res.tokens) {
        out.appendChild(SF.el("span", { class: "prompt-tok" }, [SF.el("b", { text: JSON.stringify(t.token) }),
          ...t.latents.map(([i, v]) => SF.el("span", { class: "lat", text: `#${i} ${SF.fmt(v)}`, onclick: () => go("feature", i) }))]));
      }
    } catch (e) { out.innerHTML = ""; out.appendChild(SF.el("div", { class: "error", text: String(e.message) })); }
  };
  main.appendChild(SF.el("div", { class: "card" }, [SF.el("h2", { text: "Prompt: active latents per token" }), area,
    SF.el("button", { id: "prompt-run", text: "run", onclick: run }), out]));
}

async function route() {
  const parts = location.hash.replace(/^#\//, "").split("/").map(decodeURIComponent);
  if (parts[0]) state.sae = parts[0];
  document.getElementById("sae").value = state.sae;
  state.n = (await api(`/dictionaries/${state.sae}/features/count`)).count;
  try {
    if (parts[1] === "feature") await showFeature(Number(parts[2]));
    else if (parts[1] === "prompt") await showPrompt();
    else await showOverview();
  } catch (e) { fail(e); }
}

async function start() {
  const saes = await api("/dictionaries");
  const sel = document.getElementById("sae");
  for (const s of saes) sel.appendChild(SF.el("option", { value: s.name, text: s.name }));
  if (!saes.length) { fail("the database holds no dictionary yet"); return; }
  state.sae = saes[0].name;
  sel.addEventListener("change", () => { state.sae = sel.value; go("overview"); });
  document.getElementById("nav-overview").onclick = (e) => { e.preventDefault(); go("overview"); };
  document.getElementById("nav-prompt").onclick = (e) => { e.preventDefault(); go("prompt"); };
  document.getElementById("latent").addEventListener("change", (e) => go("feature", e.target.value));
  const random = async () => { const d = await api(`/dictionaries/${state.sae}/features/random?min_freq=0.0000001`); go("feature", d.index); };
  document.getElementById("nav-random").onclick = (e) => { e.preventDefault(); random(); };
  SF.keyNav((d) => go("feature", (state.index + d + state.n) % state.n), random);
  window.addEventListener("hashchange", route);
  await route();
}
start().catch(fail);
