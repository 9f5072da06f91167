"use strict";
// One job: polls GET /jobs/{id} and its history, refreshes the filter picture.
(() => {
  const { api, asset, fmt, duration, when, el, progressBar } = SAE;
  const id = location.pathname.split("/").filter(Boolean).pop();
  const $ = (s) => document.getElementById(s);
  $("job-id").textContent = id;
  $("model").href = asset("/jobs/" + id + "/model.npz");
  $("history").href = asset("/jobs/" + id + "/history");
  $("filters-link").href = asset("/jobs/" + id + "/filters.png");
  $("cost-link").href = asset("/jobs/" + id + "/cost.png");
  let lastIteration = null, done = false;

  const img = $("filters");
  img.addEventListener("load", () => {
    img.dataset.naturalWidth = String(img.naturalWidth);
    img.dataset.naturalHeight = String(img.naturalHeight);
    $("filters-size").textContent = img.naturalWidth + " × " + img.naturalHeight + " px";
    // small pictures are drawn at least 240 px wide, large ones scaled down to the page (CSS
    // max-width); a click shows the picture at its own size, another click fits it again
    img.style.width = Math.max(240, img.naturalWidth) + "px";
    img.dataset.shownWidth = String(Math.round(img.getBoundingClientRect().width));
  });
  img.addEventListener("click", () => {
    img.classList.toggle("zoomed");
    img.dataset.shownWidth = String(Math.round(img.getBoundingClientRect().width));
  });

  function drawCurve(history) {
    const entries = (Array.isArray(history) ? history : history.entries || history.history || [])
      .filter((e) => typeof (e.cost ?? e.J) === "number");
    const svg = $("curve");
    const W = 420, H = 260, pad = 40;
    svg.replaceChildren();
    svg.dataset.points = String(entries.length);
    if (entries.length < 1) return;
    const n = entries.length;
    // at most ~MAX points drawn: every step-th entry, plus the last one
    const MAX = 1000, step = Math.ceil(n / MAX);
    const keep = [];
    for (let i = 0; i < n; i += step) keep.push(i);
    if (keep[keep.length - 1] !== n - 1) keep.push(n - 1);
    svg.dataset.drawn = String(keep.length);
    // a loop, not Math.min(...ys): spreading a long history overflows the call stack
    const ys = new Array(n);
    let lo = Infinity, hi = -Infinity;
    for (let i = 0; i < n; i++) {
      const y = Math.log10(Math.max(entries[i].cost ?? entries[i].J, 1e-300));
      ys[i] = y;
      if (y < lo) lo = y;
      if (y > hi) hi = y;
    }
    const span = hi - lo || 1;
    const pts = ys.map((y, i) => [pad + (W - 2 * pad) * (n > 1 ? i / (n - 1) : 0), H - pad - (H - 2 * pad) * (y - lo) / span]);
    const ns = "http://www.w3.org/2000/svg";
    // one line per stage of a deep job (pretraining stages, fine-tuning)
    const colours = ["#4a90d9", "#d9822b", "#3a9d5d", "#a347ba", "#c0392b", "#7f8c8d"];
    const stages = [];
    keep.forEach((i) => {
      const name = entries[i].stage ?? "";
      if (!stages.length || stages[stages.length - 1].name !== name) stages.push({ name, idx: [] });
      stages[stages.length - 1].idx.push(i);
    });
    const lines = stages.map((st, k) => {
      const line = document.createElementNS(ns, "polyline");
      line.setAttribute("points", st.idx.map((i) => pts[i].map((v) => v.toFixed(1)).join(",")).join(" "));
      line.setAttribute("fill", "none"); line.setAttribute("stroke", colours[k % colours.length]); line.setAttribute("stroke-width", "2");
      if (st.name) line.setAttribute("data-stage", st.name);
      return line;
    });
    const axis = document.createElementNS(ns, "path");
    axis.setAttribute("d", `M${pad},${pad} V${H - pad} H${W - pad}`);
    axis.setAttribute("stroke", "#888"); axis.setAttribute("fill", "none");
    const label = (x, y, text) => { const t = document.createElementNS(ns, "text"); t.setAttribute("x", x); t.setAttribute("y", y); t.setAttribute("font-size", "11"); t.textContent = text; return t; };
    const first = entries[0].iteration ?? 0, last = entries[n - 1].iteration ?? n - 1;
    svg.dataset.lastIteration = String(last);
    svg.append(axis, ...lines, label(2, pad, fmt(10 ** hi, 3)), label(2, H - pad, fmt(10 ** lo, 3)),
      label(W / 2 - 40, H - 10, "iteration " + first + "–" + last));
  }

  async function refresh() {
    try {
      const j = await api("/jobs/" + id);
      $("status").textContent = j.status;
      $("status").className = "status " + j.status;
      document.body.dataset.status = j.status;
      $("stage").textContent = j.stage || "–";
      // a deep job's iteration counts within its stage; the progress is of the whole job
      $("iteration-label").textContent = j.stage ? "Iteration in this stage" : "Iteration";
      $("progress-label").textContent = j.stage ? "Progress of all stages" : "Progress";
      $("iteration").textContent = j.iteration;
      $("max-iter").textContent = j.max_iter;
      $("progress").textContent = (100 * j.progress).toFixed(1) + "%";
      $("progress-bar").replaceChildren(progressBar(j.progress));
      $("eta").textContent = j.status === "running" ? duration(j.eta_seconds) : "–";
      $("cost").textContent = fmt(j.cost, 6);
      $("grad-norm").textContent = fmt(j.grad_norm, 4);
      $("times").textContent = [j.created_at, j.started_at, j.finished_at].map(when).join(" / ");
      $("spec").tBodies[0].replaceChildren(...Object.entries(j.spec).map(([k, v]) =>
        el("tr", { "data-field": k }, el("th", {}, k), el("td", {}, Array.isArray(v) ? v.join(", ") : v === null ? "–" : String(v)))));
      $("job-error").textContent = j.error || "–";
      if (j.dashboard_url) { $("dashboard").href = j.dashboard_url; $("dashboard").textContent = j.dashboard_url; }
      $("cancel").disabled = !["queued", "running"].includes(j.status);
      if (j.iteration !== lastIteration || j.status !== "running") {
        lastIteration = j.iteration;
        if (j.started_at) {
          img.src = asset("/jobs/" + id + "/filters.png", Date.now());
          api("/jobs/" + id + "/history").then(drawCurve).catch(() => {});
        }
      }
      done = !["queued", "running"].includes(j.status);
      $("error").textContent = "";
    } catch (e) {
      if (e.status === 404) {  // deleted: nothing more to poll
        done = true;
        document.body.dataset.status = "gone";
        $("status").textContent = "gone";
        $("cancel").disabled = true;
        $("error").textContent = "This job is gone (deleted, or it never existed).";
      } else {
        $("error").textContent = String(e.message || e);
      }
    }
    if (!done) setTimeout(refresh, 1000);
  }
  $("cancel").addEventListener("click", () =>
    api("/jobs/" + id + "/cancel", { method: "POST" })
      .then(refresh)
      .catch((e) => { $("error").textContent = "Cancel failed: " + String(e.message || e); }));
  refresh();
})();
