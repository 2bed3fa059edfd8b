/* Shared helpers of the dashboard pages: formatting, the live status feed, confirmations. */
"use strict";

window.Dashboard = (function () {
  const POLL_INTERVAL = 2000;

  function bytes(n) {
    if (n === null || n === undefined) return "-";
    const units = ["B", "kB", "MB", "GB", "TB"];
    let i = 0;
    while (n >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
    return (i === 0 ? n.toFixed(0) : n.toFixed(1)) + " " + units[i];
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "-";
    let s = Math.round(seconds);
    const d = Math.floor(s / 86400); s -= d * 86400;
    const h = Math.floor(s / 3600); s -= h * 3600;
    const m = Math.floor(s / 60); s -= m * 60;
    if (d) return d + "d " + h + "h " + m + "m";
    if (h) return h + "h " + m + "m " + s + "s";
    if (m) return m + "m " + s + "s";
    return s + "s";
  }

  function number(n, digits) {
    if (n === null || n === undefined) return "-";
    return Number(n).toLocaleString(undefined, {maximumFractionDigits: digits === undefined ? 1 : digits});
  }

  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") node.textContent = v;
      else if (k === "className") node.className = v;
      else node.setAttribute(k, v);
    }
    for (const child of children || []) {
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function progressBar(percent) {
    const bar = el("div", {className: "dash-progress", role: "progressbar", "aria-valuemin": "0",
                           "aria-valuemax": "100"});
    const fill = el("div", {className: "dash-progress-fill"});
    bar.append(fill);
    setProgress(bar, percent);
    return bar;
  }

  function setProgress(bar, percent) {
    const fill = bar.querySelector(".dash-progress-fill");
    const known = percent !== null && percent !== undefined;
    fill.style.width = (known ? percent : 0) + "%";
    bar.setAttribute("aria-valuenow", known ? percent.toFixed(1) : "0");
    bar.dataset.percent = known ? percent.toFixed(1) : "";
    bar.title = known ? percent.toFixed(1) + "%" : "size not known yet";
  }

  /* The status snapshot, pushed every second over the websocket; polled from the JSON view when
     the websocket cannot connect or drops. `onData(snapshot)`; `onTransport(name)`. */
  function liveStatus(options) {
    const {wsPath, pollUrl, onData, onTransport} = options;
    let previous = null;
    let pollTimer = null;

    function deliver(data) {
      if (data.tokens_per_second === null && previous && data.time > previous.time) {
        data.tokens_per_second =
          Math.max(0, data.tokens_generated - previous.tokens_generated) / (data.time - previous.time);
      }
      previous = data;
      onData(data);
    }

    async function poll() {
      try {
        const response = await fetch(pollUrl, {credentials: "same-origin", headers: {Accept: "application/json"}});
        const type = response.headers.get("Content-Type") || "";
        if (!response.ok || !type.includes("application/json")) {
          onTransport("logged out? reload the page");
          return;
        }
        deliver(await response.json());
        onTransport("polling");
      } catch (err) {
        onTransport("offline");
      }
      pollTimer = setTimeout(poll, POLL_INTERVAL);
    }

    function startPolling() {
      if (pollTimer === null) { pollTimer = setTimeout(poll, 0); }
    }

    if (!("WebSocket" in window)) {
      startPolling();
      return;
    }
    const scheme = location.protocol === "https:" ? "wss://" : "ws://";
    let socket;
    try {
      socket = new WebSocket(scheme + location.host + wsPath);
    } catch (err) {
      startPolling();
      return;
    }
    socket.onopen = () => onTransport("websocket");
    socket.onmessage = (event) => deliver(JSON.parse(event.data));
    socket.onclose = () => startPolling();
  }

  // <form data-confirm="Really?">: ask first.
  document.addEventListener("submit", (event) => {
    const message = event.target.dataset && event.target.dataset.confirm;
    if (message && !window.confirm(message)) event.preventDefault();
  });

  return {bytes, duration, number, el, progressBar, setProgress, liveStatus};
})();
