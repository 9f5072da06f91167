"use strict";
// The job list: polls GET /jobs and GET /datasets.
(() => {
  const { api, el, fmt, when, progressBar } = SAE;

  async function refresh() {
    try {
      const page = await api("/jobs?limit=100");
      const body = document.querySelector("#jobs tbody");
      body.replaceChildren(...page.items.map((j) => el("tr", { "data-job": j.id, "data-status": j.status },
        el("td", {}, el("a", { href: "/ui/jobs/" + j.id }, j.id)),
        el("td", { class: "status " + j.status }, j.status),
        el("td", {}, j.spec.dataset),
        el("td", {}, JSON.stringify(j.spec.hidden)),
        el("td", {}, j.stage || ""),
        el("td", { class: "iteration" }, j.iteration + " / " + j.max_iter),
        el("td", { class: "progress" }, progressBar(j.progress), " " + Math.round(100 * j.progress) + "%"),
        el("td", {}, fmt(j.cost)),
        el("td", {}, when(j.created_at)))));
      const ds = await api("/datasets");
      document.querySelector("#datasets tbody").replaceChildren(...ds.map((d) => el("tr", {},
        el("td", {}, d.name), el("td", {}, d.shape.join(" × ")), el("td", {}, d.dtype),
        el("td", {}, d.sample_shape ? d.sample_shape.join(" × ") : "–"), el("td", {}, d.bytes))));
      // one clock on the page: UTC, as the job times
      document.getElementById("updated").textContent = page.total + " jobs · updated " + when(Date.now() / 1000);
      document.getElementById("error").textContent = "";
    } catch (e) {
      document.getElementById("error").textContent = String(e.message || e);
    }
  }
  refresh();
  setInterval(refresh, 2000);
})();
