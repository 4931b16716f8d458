// Feature card rendering, shared by the served viewer and the static dashboards (no libraries).
"use strict";
const SF = {};

SF.el = function (tag, attrs, children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "text") e.textContent = v; else if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v); else e.setAttribute(k, v);
  }
  for (const c of children || []) e.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
  return e;
};

SF.fmt = (x) => (x === null || x === undefined ? "–" : Math.abs(x) >= 0.01 || x === 0 ? Number(x).toFixed(3) : Number(x).toExponential(2));

// Bars as SVG rects: counts [n], x axis labelled from lo to hi.
SF.barsSVG = function (counts, lo, hi, cls, xlabel) {
  const W = 360, H = 120, pad = 20, n = counts.length, top = Math.max(1, ...counts);
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("width", W); svg.setAttribute("height", H + pad); svg.setAttribute("class", "histogram");
  counts.forEach((c, i) => {
    const r = document.createElementNS(ns, "rect");
    const h = (c / top) * H;
    r.setAttribute("x", (i * W) / n); r.setAttribute("y", H - h);
    r.setAttribute("width", Math.max(1, W / n - 1)); r.setAttribute("height", h);
    r.setAttribute("class", cls);
    const t = document.createElementNS(ns, "title"); t.textContent = String(c); r.appendChild(t);
    svg.appendChild(r);
  });
  for (const [x, s, anchor] of [[0, lo, "start"], [W, hi, "end"], [W / 2, xlabel, "middle"]]) {
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", x); t.setAttribute("y", H + 14); t.setAttribute("text-anchor", anchor);
    t.textContent = typeof s === "number" ? SF.fmt(s) : s; svg.appendChild(t);
  }
  return svg;
};

SF.showHover = function (text) {
  let h = document.getElementById("hover");
  if (!h) { h = SF.el("div", { id: "hover" }); document.body.appendChild(h); }
  h.textContent = text;
};

// One context: tokens with background by activation / scale; activation on hover.
SF.sampleLine = function (tokens, acts, scale, centre) {
  const line = SF.el("div", { class: "sample" });
  tokens.forEach((t, i) => {
    const a = acts[i] || 0, alpha = scale > 0 ? Math.min(1, a / scale) : 0;
    const span = SF.el("span", { class: "tok" + (a > 0 ? " active" : "") + (i === centre ? " centre" : ""),
      title: "activation " + SF.fmt(a), "data-act": String(a), text: t });
    if (a > 0) span.style.background = `rgba(255,120,0,${alpha.toFixed(3)})`;
    span.addEventListener("mouseover", () => SF.showHover(JSON.stringify(t) + "  " + SF.fmt(a)));
    line.appendChild(span);
  });
  return line;
};

SF.logitTable = function (rows, cls) {
  return SF.el("table", { class: "logits " + cls }, rows.map(([tok, v]) =>
    SF.el("tr", {}, [SF.el("td", { text: JSON.stringify(tok) }), SF.el("td", { text: SF.fmt(v) })])));
};

SF.groupSamples = function (doc) {
  const groups = new Map();
  for (const s of doc.samples) {
    const key = s.kind === "bin" ? `bin${s.bin}` : s.kind;
    if (!groups.has(key)) groups.set(key, []);
    groups.get(key).push(s);
  }
  const order = ["top", ...[...groups.keys()].filter((k) => k.startsWith("bin")).sort().reverse(), "nonact"];
  return order.filter((k) => groups.has(k)).map((k) => {
    const g = groups.get(k), s = g[0];
    const title = k === "top" ? "Top activations" : k === "nonact" ? "Non-activating" :
      `Interval ${SF.fmt(s.bin_min)} – ${SF.fmt(s.bin_max)} (contains ${(100 * s.bin_contains).toFixed(1)}% of activations)`;
    return [title, g];
  });
};

// The full feature card; onLatent(i) is called when a neighbour link is clicked.
SF.renderFeature = function (root, sae, doc, onLatent) {
  root.innerHTML = "";
  const interp = (doc.interpretations || [])[0];
  const stats = SF.el("div", { class: "stats" }, [
    SF.el("span", { text: `frequency ${SF.fmt(doc.freq)}` }), SF.el("span", { text: `count ${doc.count}` }),
    SF.el("span", { text: `max ${SF.fmt(doc.max)}` }), SF.el("span", { text: `mean ${SF.fmt(doc.mean)}` }),
    SF.el("span", { text: `decoder norm ${SF.fmt(doc.decoder_norm)}` })]);
  const interpBox = SF.el("div", { class: "interp", id: "interpretation" }, interp ?
    [SF.el("b", { text: interp.text }), ` (${interp.source}` +
      Object.entries(interp.score || {}).map(([k, v]) => `, ${k} ${SF.fmt(v)}`).join("") + ")"] :
    ["No interpretation yet."]);
  const near = SF.el("div", { class: "latent-list" }, ["Nearest by decoder cosine: ",
    ...doc.neighbours.map(([i, c]) => SF.el("a", { href: "#", text: `#${i} (${SF.fmt(c)})`,
      onclick: (e) => { e.preventDefault(); if (onLatent) onLatent(i); } }))]);
  const hist = SF.el("div", { class: "col", id: "act-hist" }, [SF.el("h4", { text: "Activation histogram" }),
    SF.barsSVG(doc.hist.counts, 0, doc.hist.max, "hist-bar", "activation")]);
  const logits = SF.el("div", { class: "col" }, [SF.el("h4", { text: "Top logits (W_dec · W_U)" }),
    SF.el("div", { class: "row" }, [SF.logitTable(doc.logits.pos, "pos"), SF.logitTable(doc.logits.neg, "neg")])]);
  const samples = SF.el("div", { id: "samples" }, SF.groupSamples(doc).map(([title, g]) =>
    SF.el("div", { class: "group" }, [SF.el("h4", { text: title }),
      ...g.map((s) => SF.sampleLine(s.tokens, s.acts, doc.max, s.centre))])));
  root.appendChild(SF.el("div", { class: "card feature-card", "data-index": String(doc.index) }, [
    SF.el("h2", { text: `${sae} / latent ${doc.index}` }), stats, interpBox, near,
    SF.el("div", { class: "row" }, [hist, logits]), samples]));
};

// Dictionary overview: histogram of log10 firing frequency over latents.
SF.freqHistogram = function (freqs, nBins) {
  const logs = freqs.filter((f) => f > 0).map((f) => Math.log10(f));
  const lo = Math.min(...logs, -6), hi = 0, counts = new Array(nBins).fill(0);
  for (const v of logs) counts[Math.min(nBins - 1, Math.floor(((v - lo) / (hi - lo)) * nBins))] += 1;
  return SF.barsSVG(counts, lo, hi, "freq-bar", "log10 frequency");
};

// Arrow keys / j k move between latents; r asks for a random one.
SF.keyNav = function (move, random) {
  document.addEventListener("keydown", (e) => {
    if (["INPUT", "TEXTAREA", "SELECT"].includes(document.activeElement.tagName)) return;
    if (e.key === "ArrowRight" || e.key === "j") move(1);
    else if (e.key === "ArrowLeft" || e.key === "k") move(-1);
    else if (e.key === "r" && random) random();
  });
};
