// Small helpers shared by the pages: token handling, JSON fetch, formatting.
"use strict";

const SAE = (() => {
  const params = new URLSearchParams(location.search);
  if (params.get("token")) {
    localStorage.setItem("sae-token", params.get("token"));
    // keep the token out of the address bar, the history and bookmarks
    params.delete("token");
    const rest = params.toString();
    history.replaceState(null, "", location.pathname + (rest ? "?" + rest : "") + location.hash);
  }
  const token = () => localStorage.getItem("sae-token") || "";

  async function api(path, options = {}) {
    const headers = Object.assign({}, options.headers || {});
    if (token()) headers["Authorization"] = "Bearer " + token();
    const r = await fetch(path, Object.assign({}, options, { headers }));
    if (r.status === 401) throw new Error("401: set the service token (?token=...)");
    if (!r.ok) {
      const e = new Error(r.status + ": " + (await r.text()));
      e.status = r.status;
      throw e;
    }
    return r.status === 204 ? null : r.json();
  }

  // URL of a picture or download, with the token as a query parameter (img tags send no headers).
  function asset(path, bust) {
    const q = new URLSearchParams();
    if (token()) q.set("token", token());
    if (bust) q.set("t", String(bust));
    const s = q.toString();
    return s ? path + "?" + s : path;
  }

  function fmt(x, digits = 4) {
    if (x === null || x === undefined) return "–";
    if (typeof x !== "number") return String(x);
    return Math.abs(x) >= 1e4 || (x !== 0 && Math.abs(x) < 1e-3) ? x.toExponential(digits - 1) : x.toPrecision(digits);
  }

  function duration(s) {
    if (s === null || s === undefined) return "–";
    s = Math.round(s);
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
    return (h ? h + "h " : "") + (h || m ? m + "m " : "") + sec + "s";
  }

  function when(t) {
    return t ? new Date(t * 1000).toISOString().replace("T", " ").slice(0, 19) + "Z" : "–";
  }

  function el(tag, attrs = {}, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "class") e.className = v; else e.setAttribute(k, v);
    }
    for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return e;
  }

  function progressBar(p) {
    const bar = el("div", { class: "bar" });
    const fill = el("div", { class: "fill" });
    fill.style.width = (100 * (p || 0)).toFixed(1) + "%";
    bar.append(fill);
    return bar;
  }

  return { api, asset, fmt, duration, when, el, progressBar, token };
})();
