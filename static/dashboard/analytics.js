/* Analytics page: Chart.js charts and tables from the analytics JSON view, refreshed every 10 s. */
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const D = window.Dashboard;
  const root = document.getElementById("analytics");
  const select = document.getElementById("window");
  const REFRESH = 10000;
  const charts = {};
  let timer = null;

  const COLORS = {
    blue: "#417690", green: "#5b9a68", orange: "#e0913b", red: "#ba2121", purple: "#7d5ba6", grey: "#999",
  };

  function label(iso, windowName) {
    const d = new Date(iso);
    const time = d.toLocaleTimeString([], {hour: "2-digit", minute: "2-digit"});
    return windowName === "week" ? d.toLocaleDateString([], {weekday: "short"}) + " " + time : time;
  }

  function chart(id, type, datasets, options) {
    const config = {
      type: type,
      data: {labels: [], datasets: datasets},
      options: Object.assign({
        animation: false,
        responsive: true,
        maintainAspectRatio: false,
        interaction: {mode: "index", intersect: false},
        plugins: {legend: {display: datasets.length > 1, labels: {boxWidth: 12}}},
        scales: {x: {ticks: {maxTicksLimit: 8, maxRotation: 0}}, y: {beginAtZero: true}},
      }, options || {}),
    };
    charts[id] = new window.Chart(document.getElementById(id), config);
  }

  // Sparse series (averages, percentiles: empty buckets are gaps) get points so one bucket shows.
  function line(labelText, color, sparse) {
    return {label: labelText, data: [], borderColor: color, backgroundColor: color, pointRadius: sparse ? 2 : 0,
            borderWidth: 2, spanGaps: true, tension: 0.2};
  }

  function bar(labelText, color, stack) {
    return {label: labelText, data: [], backgroundColor: color, stack: stack};
  }

  chart("chart-requests", "line", [line("requests/min", COLORS.blue)]);
  chart("chart-tokens", "bar", [bar("prompt", COLORS.blue, "t"), bar("completion", COLORS.green, "t")],
        {scales: {x: {stacked: true, ticks: {maxTicksLimit: 8, maxRotation: 0}}, y: {stacked: true, beginAtZero: true}}});
  chart("chart-tps", "line", [line("tok/s (avg)", COLORS.green, true)]);
  chart("chart-ttft", "line", [line("p50", COLORS.blue, true), line("p95", COLORS.orange, true)]);
  chart("chart-errors", "bar", [bar("errors", COLORS.red, "e"), bar("cancelled", COLORS.grey, "e")],
        {scales: {x: {stacked: true, ticks: {maxTicksLimit: 8, maxRotation: 0}}, y: {stacked: true, beginAtZero: true, ticks: {precision: 0}}}});

  const SERIES = {
    "chart-requests": ["requests_per_minute"],
    "chart-tokens": ["prompt_tokens", "completion_tokens"],
    "chart-tps": ["tokens_per_second"],
    "chart-ttft": ["ttft_p50_ms", "ttft_p95_ms"],
    "chart-errors": ["errors", "cancelled"],
  };

  function ms(v) { return v === null || v === undefined ? "-" : D.number(v, 0); }

  function breakdown(tableId, rows, empty) {
    document.querySelector(`#${tableId} tbody`).replaceChildren(...(rows.length ? rows.map((r) =>
      D.el("tr", {}, [
        D.el("td", {text: r.name || empty}), D.el("td", {text: D.number(r.requests, 0)}),
        D.el("td", {text: D.number(r.prompt_tokens, 0)}), D.el("td", {text: D.number(r.completion_tokens, 0)}),
        D.el("td", {text: D.number(r.errors, 0)}), D.el("td", {text: D.number(r.tokens_per_second, 1)}),
        D.el("td", {text: ms(r.ttft_p50_ms)}), D.el("td", {text: ms(r.ttft_p95_ms)}),
      ])) : [D.el("tr", {}, [D.el("td", {colspan: "8", text: "No requests in this window."})])]));
  }

  function render(data) {
    const labels = data.buckets.map((iso) => label(iso, data.window));
    for (const [id, keys] of Object.entries(SERIES)) {
      const c = charts[id];
      c.data.labels = labels;
      keys.forEach((key, i) => { c.data.datasets[i].data = data.series[key]; });
      c.update("none");
    }
    const t = data.totals;
    const set = (key, text) => { document.querySelector(`[data-total="${key}"]`).textContent = text; };
    set("requests", D.number(t.requests, 0));
    set("prompt_tokens", D.number(t.prompt_tokens, 0));
    set("completion_tokens", D.number(t.completion_tokens, 0));
    set("tokens_per_second", D.number(t.tokens_per_second, 1));
    set("ttft", t.ttft_p50_ms === null ? "-" : `${ms(t.ttft_p50_ms)} / ${ms(t.ttft_p95_ms)}`);
    set("errors", `${D.number(t.errors, 0)} / ${D.number(t.cancelled, 0)}`);
    breakdown("by-model", data.by_model, "(no model)");
    breakdown("by-key", data.by_key, "(no key)");
    document.querySelector("#recent tbody").replaceChildren(...(data.recent.length ? data.recent.map((r) =>
      D.el("tr", {className: r.outcome === "ok" ? "" : "outcome-" + r.outcome}, [
        D.el("td", {text: new Date(r.created_at).toLocaleString()}),
        D.el("td", {text: r.endpoint + (r.stream ? " (stream)" : "")}),
        D.el("td", {text: r.model || "-"}), D.el("td", {text: r.key_name || "-"}),
        D.el("td", {text: r.status_code}), D.el("td", {text: r.outcome + (r.finish_reason ? ` (${r.finish_reason})` : "")}),
        D.el("td", {text: r.prompt_tokens}), D.el("td", {text: r.completion_tokens}),
        D.el("td", {text: ms(r.ttft_ms)}), D.el("td", {text: ms(r.latency_ms)}),
        D.el("td", {text: D.number(r.tokens_per_second, 1)}),
      ])) : [D.el("tr", {}, [D.el("td", {colspan: "11", text: "No requests yet."})])]));
    document.getElementById("updated").textContent = "updated " + new Date(data.generated_at).toLocaleTimeString();
    root.dataset.loaded = data.generated_at;
  }

  async function load() {
    clearTimeout(timer);
    try {
      const url = `${root.dataset.url}?window=${encodeURIComponent(select.value)}`;
      const response = await fetch(url, {credentials: "same-origin", headers: {Accept: "application/json"}});
      if (!response.ok || !(response.headers.get("Content-Type") || "").includes("application/json")) {
        document.getElementById("updated").textContent = "could not load (logged out?)";
      } else {
        render(await response.json());
      }
    } catch (err) {
      document.getElementById("updated").textContent = "offline";
    }
    timer = setTimeout(load, REFRESH);
  }

  select.addEventListener("change", () => {
    history.replaceState(null, "", "?window=" + encodeURIComponent(select.value));
    load();
  });
  document.getElementById("refresh").addEventListener("click", load);
  load();
});
