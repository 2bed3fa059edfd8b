/* Status page: render the status snapshot, live. */
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const D = window.Dashboard;
  const root = document.getElementById("status-page");
  const badge = document.getElementById("live-transport");

  function set(field, text) {
    root.querySelector(`[data-field="${field}"]`).textContent = text;
  }

  function render(s) {
    set("version", s.version);
    set("uptime", D.duration(s.uptime_seconds));
    set("backend", s.backend + (s.engine === "idle" ? " (engine not started)" : ""));
    set("device", s.device);
    const dm = s.default_model;
    set("default_model", dm.name ? `${dm.name} — preload ${dm.preload}${dm.error ? ": " + dm.error : ""}` : "none");
    set("running", D.number(s.running, 0));
    set("queued", D.number(s.queued, 0));
    set("tokens_per_second", s.tokens_per_second === null ? "…" : D.number(s.tokens_per_second, 1));
    set("tokens_generated", D.number(s.tokens_generated, 0));

    const body = document.querySelector("#loaded-models tbody");
    const rows = s.loaded_models.map((m) => D.el("tr", {"data-model": m.name}, [
      D.el("td", {text: m.name}), D.el("td", {text: m.backend}), D.el("td", {text: D.bytes(m.memory_bytes)}),
      D.el("td", {text: m.running}), D.el("td", {text: m.waiting}),
      D.el("td", {text: m.pinned ? "yes" : "no"}), D.el("td", {text: D.duration(m.idle_seconds)}),
    ]));
    for (const name of s.loading_models) {
      rows.push(D.el("tr", {"data-model": name}, [
        D.el("td", {text: name}), D.el("td", {colspan: "6", text: "loading…"})]));
    }
    body.replaceChildren(...rows);
    document.querySelector("#loaded-models .empty-note").hidden = rows.length > 0;

    const active = s.downloads.filter((d) => d.status === "queued" || d.status === "running");
    document.getElementById("active-downloads").hidden = active.length === 0;
    document.querySelector("#active-downloads tbody").replaceChildren(...active.map((d) =>
      D.el("tr", {}, [
        D.el("td", {text: d.repo_id}), D.el("td", {text: d.name}),
        D.el("td", {}, [D.progressBar(d.percent), ` ${d.percent === null ? d.status : d.percent.toFixed(1) + "%"}`]),
        D.el("td", {text: d.status === "running" ? D.bytes(d.rate) + "/s" : "-"}),
        D.el("td", {text: D.duration(d.eta_seconds)}),
      ])));
  }

  render(JSON.parse(document.getElementById("status-initial").textContent));
  D.liveStatus({
    wsPath: root.dataset.ws,
    pollUrl: root.dataset.poll,
    onData: render,
    onTransport: (name) => { badge.textContent = name; badge.dataset.transport = name; },
  });
});
