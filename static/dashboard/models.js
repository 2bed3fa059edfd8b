/* Models page: loaded state and download progress, live from the status feed. */
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const D = window.Dashboard;
  const root = document.getElementById("models-page");
  const badge = document.getElementById("live-transport");
  const known = new Set([...document.querySelectorAll("tr[data-download]")].map((tr) => Number(tr.dataset.download)));

  function renderModels(s) {
    const memory = new Map(s.loaded_models.map((m) => [m.name, m.memory_bytes]));
    for (const tr of document.querySelectorAll("#registry tr[data-model]")) {
      const name = tr.dataset.model;
      const cell = tr.querySelector(".loaded-cell");
      const loaded = memory.has(name);
      const error = cell.querySelector(".errornote-inline");
      cell.dataset.loaded = loaded ? "yes" : "no";
      cell.firstChild.textContent = loaded ? `yes (${D.bytes(memory.get(name))}) `
        : (s.loading_models.includes(name) ? "loading… " : "no ");
      if (error && loaded) error.remove();
      const load = tr.querySelector(".load-form");
      const unload = tr.querySelector(".unload-form");
      if (load) load.hidden = loaded;
      if (unload) unload.hidden = !loaded;
    }
  }

  function renderDownloads(s) {
    let unknown = false;
    for (const d of s.downloads) {
      const tr = document.querySelector(`tr[data-download="${d.id}"]`);
      if (!tr) {
        if (!known.has(d.id)) unknown = true;
        continue;
      }
      if (tr.dataset.status !== "completed" && d.status === "completed") {
        document.getElementById("models-changed").hidden = false;
      }
      tr.dataset.status = d.status;
      const status = tr.querySelector(".dl-status");
      status.firstChild.textContent = d.status + (d.cancel_requested && d.status === "running" ? " (cancelling)" : "");
      D.setProgress(tr.querySelector(".dash-progress"), d.percent);
      tr.querySelector(".dl-percent").textContent = d.percent === null ? "-" : d.percent.toFixed(1) + "%";
      const running = d.status === "running";
      tr.querySelector(".dl-rate").textContent = running ? D.bytes(d.rate) + "/s" : "-";
      tr.querySelector(".dl-eta").textContent = running ? D.duration(d.eta_seconds) : "-";
      tr.querySelector(".dl-files").textContent = `${d.files_done}/${d.files_total}`;
      const active = d.status === "queued" || d.status === "running";
      const cancel = tr.querySelector(".cancel-form");
      const retry = tr.querySelector(".retry-form");
      if (cancel) cancel.hidden = !active;
      if (retry) retry.hidden = !(d.status === "failed" || d.status === "cancelled");
    }
    document.getElementById("downloads-changed").hidden = !unknown;
  }

  function render(s) {
    renderModels(s);
    renderDownloads(s);
  }

  render(JSON.parse(document.getElementById("status-initial").textContent));
  D.liveStatus({
    wsPath: root.dataset.ws,
    pollUrl: root.dataset.poll,
    onData: render,
    onTransport: (name) => { badge.textContent = name; badge.dataset.transport = name; },
  });
});
