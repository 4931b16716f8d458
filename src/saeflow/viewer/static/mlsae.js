// MLSAE views over /api/mlsaes: per-layer latent activations of a prompt, examples per
// (latent, layer), steering and the logits with the reconstruction spliced in.
"use strict";
const out = document.getElementById("out");
const $ = (id) => document.getElementById(id);
const M = { name: null, info: null };

async function mapi(path, body) {
  const opts = body === undefined ? {} : { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  const r = await fetch("/api/mlsaes" + path, opts);
  const data = await r.json();
  if (!r.ok) throw new Error(data.detail ? JSON.stringify(data.detail) : r.statusText);
  return data;
}
function show(nodes) { out.innerHTML = ""; for (const n of nodes) out.appendChild(n); }
function fail(e) { show([SF.el("div", { class: "error", text: String(e.message || e) })]); }
function shade(v, top) { return `background: rgba(230,81,0,${top > 0 ? Math.min(1, v / top) : 0})`; }

async function activations() {
  const latent = $("latent").value === "" ? null : Number($("latent").value);
  const res = await mapi(`/${M.name}/prompt/latent-activations`, { text: $("text").value, latent, top: 3 });
  const head = SF.el("tr", {}, [SF.el("th", { text: "layer" }), ...res.tokens.map((t) => SF.el("th", { text: t }))]);
  const top = latent === null ? 0 : Math.max(...res.latent_acts.flat());
  const rows = res.layers.map((layer, li) => SF.el("tr", {}, [SF.el("td", { text: String(layer) }),
    ...res.latents[li].map((cell, p) => SF.el("td", latent === null ? {} : { style: shade(res.latent_acts[li][p], top) },
      cell.map(([i, v]) => SF.el("span", { class: "lat", text: `${i}:${SF.fmt(v)}`, onclick: () => { $("latent").value = i; activations().catch(fail); } }))))]));
  show([SF.el("table", { class: "logits", id: "acts" }, [head, ...rows])]);
}

async function examples() {
  const rows = await mapi(`/${M.name}/features/${Number($("latent").value || 0)}/examples`);
  show(rows.map((r) => SF.el("div", { class: "sample" }, [`layer ${r.layer} #${r.rank} ${SF.fmt(r.act)}: `,
    ...r.tokens.map((t, j) => SF.el("span", { class: "tok", style: shade(r.acts[j], r.act), text: t }))])));
}

function changes(title, pos) {
  return SF.el("div", { class: "col" }, [SF.el("h4", { text: title }), SF.el("table", { class: "logits" },
    pos.map(([t, v]) => SF.el("tr", {}, [SF.el("td", { text: JSON.stringify(t) }), SF.el("td", { class: v >= 0 ? "pos" : "neg", text: SF.fmt(v) })])))]);
}

async function steer() {
  const res = await mapi(`/${M.name}/prompt/logits-steer`, { text: $("text").value, latent: Number($("latent").value || 0),
    layer: Number($("layer").value), factor: Number($("factor").value), top: 10 });
  const last = res.positions[res.positions.length - 1];
  show([SF.el("div", { class: "card", id: "steer" }, [SF.el("h3", { text: `last token ${JSON.stringify(res.tokens[res.tokens.length - 1])}: logit change` }),
    SF.el("div", { class: "row" }, [changes("increase", last.increase), changes("decrease", last.decrease)])])]);
}

async function recon() {
  const res = await mapi(`/${M.name}/prompt/logits-recon`, { text: $("text").value, layer: Number($("layer").value), top: 10 });
  const last = res.positions[res.positions.length - 1];
  show([SF.el("div", { class: "card", id: "recon" }, [SF.el("h3", { text: `KL(clean || spliced) at the last token: ${SF.fmt(res.kl[res.kl.length - 1])}` }),
    SF.el("div", { class: "row" }, [changes("clean", last.clean), changes("spliced", last.spliced)])])]);
}

async function init() {
  const list = await mapi("");
  if (!list.length) { fail(new Error("no MLSAE in the database (rule mlsae_examples loads them)")); return; }
  for (const m of list) $("mlsae").appendChild(SF.el("option", { value: m.name, text: m.name }));
  const pick = () => {
    M.name = $("mlsae").value; M.info = list.find((m) => m.name === M.name);
    $("layer").innerHTML = "";
    for (const l of M.info.layers) $("layer").appendChild(SF.el("option", { value: l, text: String(l) }));
  };
  $("mlsae").addEventListener("change", pick); pick();
  $("run-acts").addEventListener("click", () => activations().catch(fail));
  $("run-examples").addEventListener("click", () => examples().catch(fail));
  $("run-steer").addEventListener("click", () => steer().catch(fail));
  $("run-recon").addEventListener("click", () => recon().catch(fail));
}
init().catch(fail);
