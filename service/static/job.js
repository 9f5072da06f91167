"use strict";
// One job: polls GET /jobs/{id} and its history, refreshes the filter picture, shows the
// final model's metrics and feature-density picture once they are written.
(() => {
  const { api, asset, fmt, duration, when, el, progressBar } = SAE;
  const id = location.pathname.split("/").filter(Boolean).pop();
  const $ = (s) => document.getElementById(s);
  $("job-id").textContent = id;
  $("model").href = asset("/jobs/" + id + "/model.npz");
  $("history").href = asset("/jobs/" + id + "/history");
  $("filters-link").href = asset("/jobs/" + id + "/filters.png");
  $("cost-link").href = asset("/jobs/" + id + "/cost.png");
  $("metrics-link").href = asset("/jobs/" + id + "/metrics.json");
  $("density-link").href = asset("/jobs/" + id + "/density.png");
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

  // ---- the final model's metrics (metrics.json, in the job status) and density.png
  const pct = (x) => (typeof x === "number" ? (100 * x).toFixed(1) + "%" : "–");
  const METRICS = [
    ["examples", "examples", (m) => m.examples + (m.split ? " (" + m.split + " chunks)" : "")],
    ["mse", "MSE per element", (m) => fmt(m.mse, 4)],
    ["fvu", "fraction of variance unexplained", (m) => fmt(m.fvu, 4)],
    ["explained_variance", "explained variance", (m) => fmt(m.explained_variance, 4)],
    ["l0", "L0 (active latents per example)", (m) => fmt(m.l0, 4) + (m.latents ? " of " + m.latents : "")],
    ["dead", "dead latents", (m) => m.dead + " (" + pct(m.dead_fraction) + ")"],
    ["cosine", "cosine(x, x̂)", (m) => fmt(m.cosine, 4)],
    ["shrinkage", "shrinkage ‖x̂‖ / ‖x‖", (m) => fmt(m.shrinkage, 4)],
    ["active", "a latent counts as active when", (m) => m.active],
  ];
  const density = $("density");
  density.addEventListener("load", () => {
    density.dataset.naturalWidth = String(density.naturalWidth);
    $("density-figure").hidden = false;
  });
  density.addEventListener("error", () => { $("density-figure").hidden = true; });
  let metricsShown = null;
  function showMetrics(m) {
    const key = m ? JSON.stringify(m) : null;
    if (key === metricsShown) return;
    metricsShown = key;
    $("metrics").hidden = !m;
    $("metrics-none").hidden = Boolean(m);
    if (!m) { $("density-figure").hidden = true; return; }
    $("metrics").tBodies[0].replaceChildren(...METRICS.filter(([k]) => k in m).map(([k, label, show]) =>
      el("tr", { "data-metric": k }, el("th", {}, label), el("td", {}, m[k] === null ? "–" : show(m)))));
    density.src = asset("/jobs/" + id + "/density.png", Date.now());
  }

  // ---- plots (BokehJS, served by the service from the installed bokeh package)
  const COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"];
  const MAX_POINTS = 1000;  // at most this many points drawn per curve: every step-th entry
  // the axes' scale: log unless the address says ?scale=linear (the button switches it)
  let scale = new URLSearchParams(location.search).get("scale") === "linear" ? "linear" : "log";
  let rows = null, plotted = null, lastHistory = null;

  // The entries to draw, grouped by stage (a deep job's stages one after another on the x
  // axis), with the samples per second between consecutive drawn entries.
  function series(entries) {
    const n = entries.length, step = Math.ceil(n / MAX_POINTS);
    const keep = [];
    for (let i = 0; i < n; i++) {  // every step-th entry, and each stage's last
      const stageEnd = i === n - 1 || (entries[i + 1].stage ?? "") !== (entries[i].stage ?? "");
      if (i % step === 0 || stageEnd) keep.push(i);
    }
    const stages = [];
    let prev = null;
    const pos = (v) => (typeof v === "number" && (scale === "linear" || v > 0) ? v : NaN);
    // x is the iteration (a step for adam/sgd); a deep job's stages follow one another, each
    // starting where the one before ended
    const xs = new Array(n);
    let offset = 0, lastOf = 0, stageName = null;
    for (let i = 0; i < n; i++) {
      const e = entries[i], name = e.stage ?? "";
      if (stageName !== null && name !== stageName) offset += lastOf;
      stageName = name;
      const it = typeof e.iteration === "number" ? e.iteration : i;
      xs[i] = offset + it;
      lastOf = it;
    }
    const stageOf = (name) => {
      let st = stages[stages.length - 1];
      if (!st || st.name !== name) {
        st = { name, x: [], cost: [], grad: [], vx: [], val: [], sx: [], speed: [] };
        stages.push(st);
      }
      return st;
    };
    // validation points: every one while they are few, else every vstep-th and the last,
    // wherever the drawn ones fall (a held-out cost at every step would be a scatter of
    // hundreds of thousands of points)
    const vals = [];
    for (let i = 0; i < n; i++) if (typeof entries[i].val_cost === "number") vals.push(i);
    const vstep = Math.ceil(vals.length / MAX_POINTS);
    const vkeep = vals.filter((i, j) => j % vstep === 0 || j === vals.length - 1);
    let k = 0;
    for (const i of keep) {
      const e = entries[i], st = stageOf(e.stage ?? "");
      for (; k < vkeep.length && vkeep[k] <= i; k++) {
        const v = entries[vkeep[k]];
        if ((v.stage ?? "") === st.name) { st.vx.push(xs[vkeep[k]]); st.val.push(pos(v.val_cost)); }
      }
      st.x.push(xs[i]); st.cost.push(pos(e.cost)); st.grad.push(pos(e.grad_norm));
      const read = typeof e.samples === "number" && typeof prev?.samples === "number"
        ? e.samples - prev.samples  // minibatch steps count their rows
        : rows && typeof e.evaluations === "number" ? rows * (e.evaluations - prev?.evaluations) : null;
      if (prev && read !== null && typeof e.seconds === "number" && e.seconds > prev.seconds) {
        st.sx.push(xs[i]); st.speed.push(read / (e.seconds - prev.seconds));
      }
      prev = e;
    }
    return { n, drawn: keep.length, stages };
  }

  function figure(title, yLabel, yType, deep) {
    return Bokeh.Plotting.figure({
      title, width: 520, height: 260, y_axis_type: yType, y_axis_label: yLabel,
      x_axis_label: deep ? "iteration (all stages, in order)" : "iteration",
      tools: "pan,wheel_zoom,box_zoom,reset,save",
    });
  }

  function labelOf(st, stages) { return st.name || (stages.length > 1 ? "stage" : "training"); }

  async function drawPlots(history) {
    lastHistory = history;
    const entries = (Array.isArray(history) ? history : history.entries || [])
      .filter((e) => typeof e.cost === "number");
    const curve = $("curve");
    curve.dataset.points = String(entries.length);
    if (!entries.length) return;
    const last = entries[entries.length - 1];
    $("evaluations").textContent = last.evaluations ?? "–";
    $("elapsed").textContent = duration(last.seconds);
    const s = series(entries);
    const speeds = s.stages.flatMap((st) => st.speed);
    $("samples-per-second").textContent = speeds.length ? fmt(speeds[speeds.length - 1], 4) : "–";
    curve.dataset.drawn = String(s.drawn);
    curve.dataset.stages = s.stages.map((st) => labelOf(st, s.stages)).join("|");
    curve.dataset.lastIteration = String(last.iteration ?? s.n - 1);
    const lastStage = s.stages[s.stages.length - 1];
    curve.dataset.lastX = String(lastStage.x[lastStage.x.length - 1]);
    curve.dataset.validationPoints = String(s.stages.reduce((a, st) => a + st.vx.length, 0));
    const hasVal = s.stages.some((st) => st.val.some((v) => !Number.isNaN(v)));
    curve.dataset.validation = String(hasVal);
    const key = [scale, curve.dataset.stages, hasVal, Boolean(rows)].join(";");
    if (plotted && plotted.key === key) {  // live: new data into the same plots
      s.stages.forEach((st, k) => {
        plotted.cost[k].data = { x: st.x, y: st.cost };
        plotted.grad[k].data = { x: st.x, y: st.grad };
        if (plotted.val[k]) plotted.val[k].data = { x: st.vx, y: st.val };
        if (plotted.speed[k]) plotted.speed[k].data = { x: st.sx, y: st.speed };
      });
      return;
    }
    const deep = s.stages.length > 1;
    const fc = figure("Cost", "cost", scale, deep);
    const fg = figure("Gradient norm (2-norm)", "||grad||", scale, deep);
    const fs = rows ? figure("Samples per second", "examples / s", "linear", deep) : null;
    const src = (x, y) => new Bokeh.ColumnDataSource({ data: { x, y } });
    const p = { key, cost: [], grad: [], val: [], speed: [] };
    s.stages.forEach((st, k) => {
      const colour = COLOURS[k % COLOURS.length], label = labelOf(st, s.stages);
      // one stage: "training" and "validation" in two colours; stages: a colour each, the
      // validation dashed
      const trainLabel = hasVal ? (deep ? label + " (training)" : "training") : label;
      p.cost.push(src(st.x, st.cost));
      fc.line({ field: "x" }, { field: "y" }, { source: p.cost[k], line_color: colour, line_width: 2, legend_label: trainLabel });
      p.val.push(null);
      if (hasVal) {
        p.val[k] = src(st.vx, st.val);
        const vColour = deep ? colour : COLOURS[1], vLabel = deep ? label + " (validation)" : "validation";
        fc.line({ field: "x" }, { field: "y" }, { source: p.val[k], line_color: vColour, line_width: 2, line_dash: "dashed", legend_label: vLabel });
        fc.scatter({ field: "x" }, { field: "y" }, { source: p.val[k], fill_color: vColour, line_color: vColour, size: 5 });
      }
      p.grad.push(src(st.x, st.grad));
      fg.line({ field: "x" }, { field: "y" }, { source: p.grad[k], line_color: colour, line_width: 2, legend_label: label });
      p.speed.push(null);
      if (fs) {
        p.speed[k] = src(st.sx, st.speed);
        fs.line({ field: "x" }, { field: "y" }, { source: p.speed[k], line_color: colour, line_width: 2, legend_label: label });
      }
    });
    for (const f of [fc, fg, fs]) {
      if (!f) continue;
      f.legend.location = f === fs ? "bottom_right" : "top_right";  // away from the curves
      f.legend.background_fill_alpha = 0.5;
      f.legend.click_policy = "hide";  // a click on a stage hides its line
    }
    const targets = [curve, $("grad-plot"), $("speed-plot")];
    targets.forEach((t) => t.replaceChildren());
    plotted = p;
    await Promise.all([Bokeh.Plotting.show(fc, curve), Bokeh.Plotting.show(fg, targets[1]),
      ...(fs ? [Bokeh.Plotting.show(fs, targets[2])] : [])]);
    curve.dataset.rendered = "true";
    curve.dataset.scale = scale;
  }

  function showScale() {
    $("scale").dataset.scale = scale;
    $("scale").textContent = scale === "log" ? "log (switch to linear)" : "linear (switch to log)";
  }
  showScale();
  $("scale").addEventListener("click", () => {
    scale = scale === "log" ? "linear" : "log";
    showScale();
    plotted = null;
    if (lastHistory) drawPlots(lastHistory).catch((e) => { $("error").textContent = "plot: " + e; });
  });

  // ---- the spec: the fields given (or differing from their defaults) first; the others,
  // at their defaults, behind a button
  let defaults = null, specShown = null;
  api("/openapi.json").then((o) => {
    const props = o?.components?.schemas?.TrainSpec?.properties || {};
    defaults = Object.fromEntries(Object.entries(props).map(([k, v]) => [k, "default" in v ? v.default : null]));
    specShown = null;
  }).catch(() => { defaults = {}; });
  const ALWAYS = ["dataset", "kind", "hidden", "optimizer"];
  const same = (a, b) => JSON.stringify(a ?? null) === JSON.stringify(b ?? null);
  function showSpec(spec) {
    const key = JSON.stringify([spec, defaults !== null]);
    if (key === specShown) return;
    specShown = key;
    const isDefault = (k, v) => defaults !== null && k in defaults && !ALWAYS.includes(k) && same(v, defaults[k]);
    const entries = Object.entries(spec);
    const rows = [...entries.filter(([k, v]) => !isDefault(k, v)), ...entries.filter(([k, v]) => isDefault(k, v))];
    $("spec").tBodies[0].replaceChildren(...rows.map(([k, v]) =>
      el("tr", isDefault(k, v) ? { "data-field": k, class: "default" } : { "data-field": k },
        el("th", {}, k), el("td", {}, Array.isArray(v) ? v.join(", ") : v === null ? "–" : String(v)))));
    const hidden = rows.filter(([k, v]) => isDefault(k, v)).length;
    $("spec-all").hidden = hidden === 0;
    $("spec-all").textContent = $("spec").classList.contains("all")
      ? "hide the fields at their defaults" : "show the " + hidden + " fields at their defaults";
  }
  $("spec-all").addEventListener("click", () => {
    $("spec").classList.toggle("all");
    specShown = null;
    if (lastSpec) showSpec(lastSpec);
  });
  let lastSpec = null;

  async function refresh() {
    try {
      const j = await api("/jobs/" + id);
      $("status").textContent = j.status;
      $("status").className = "status " + j.status;
      document.body.dataset.status = j.status;
      $("stage").textContent = j.stage || "one stage";
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
      if (rows === null && j.spec.dataset) {  // examples per evaluation, for samples/s
        rows = false;
        api("/datasets/" + j.spec.dataset).then((d) => {
          rows = d.shape[0];
          if (lastHistory) drawPlots(lastHistory).catch(() => {});
        }).catch(() => {});
      }
      lastSpec = j.spec;
      showSpec(j.spec);
      $("job-error").textContent = j.error || "–";
      showMetrics(j.metrics || null);
      if (j.dashboard_url) { $("dashboard").href = j.dashboard_url; $("dashboard").textContent = j.dashboard_url; }
      $("cancel").disabled = !["queued", "running"].includes(j.status);
      if (j.iteration !== lastIteration || j.status !== "running") {
        lastIteration = j.iteration;
        if (j.started_at) {
          img.src = asset("/jobs/" + id + "/filters.png", Date.now());
          api("/jobs/" + id + "/history").then(drawPlots)
            .catch((e) => { $("error").textContent = "plot: " + String(e.message || e); });
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
