/* Playground: a streamed chat through /v1/chat/completions (fetch + ReadableStream SSE parsing). */
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const D = window.Dashboard;
  const apiUrl = document.getElementById("playground").dataset.api;
  const apiKey = JSON.parse(document.getElementById("playground-key").textContent);
  const $ = (id) => document.getElementById(id);
  const log = $("chat-log");
  const sendButton = $("pg-send");
  const stopButton = $("pg-stop-button");
  const stats = $("pg-stats");
  const errorBox = $("pg-error");
  let history = [];
  let controller = null;

  function bubble(role, text) {
    const node = D.el("div", {className: "chat-msg chat-" + role}, [
      D.el("div", {className: "chat-role", text: role}), D.el("div", {className: "chat-text", text: text}),
    ]);
    log.append(node);
    log.scrollTop = log.scrollHeight;
    return node.querySelector(".chat-text");
  }

  function showError(message) {
    errorBox.textContent = message;
    errorBox.hidden = !message;
  }

  function requestBody() {
    const body = {
      model: $("pg-model").value,
      messages: [],
      stream: true,
      stream_options: {include_usage: true},
    };
    const system = $("pg-system").value.trim();
    if (system) body.messages.push({role: "system", content: system});
    body.messages.push(...history);
    const temperature = $("pg-temperature").value;
    if (temperature !== "") body.temperature = Number(temperature);
    const maxTokens = $("pg-max-tokens").value;
    if (maxTokens !== "") body.max_tokens = Number(maxTokens);
    const stop = $("pg-stop").value.split(",").map((s) => s.trim()).filter(Boolean);
    if (stop.length) body.stop = stop.slice(0, 4);
    const extra = $("pg-extra").value.trim();
    if (extra) Object.assign(body, JSON.parse(extra));  // a SyntaxError is reported by send()
    return body;
  }

  /* Yields the `data:` payloads of an SSE response body as they arrive. */
  async function* sseData(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of event.split("\n")) {
          if (line.startsWith("data:")) yield line.slice(5).trimStart();
        }
      }
    }
  }

  async function apiError(response) {
    try {
      const body = await response.json();
      return `${response.status}: ${body.error.message}`;
    } catch (err) {
      return `HTTP ${response.status}`;
    }
  }

  function showStats(t) {
    const parts = [];
    if (t.first !== null) parts.push(`TTFT ${Math.round(t.first - t.start)} ms`);
    if (t.tokens > 1 && t.last > t.first) {
      parts.push(`${((t.tokens - 1) * 1000 / (t.last - t.first)).toFixed(1)} tok/s`);
    }
    parts.push(`${t.tokens} tokens`);
    if (t.finish) parts.push(t.finish);
    stats.textContent = parts.join(" · ");
  }

  async function send(event) {
    event.preventDefault();
    const text = $("pg-message").value.trim();
    if (!text || controller) return;
    showError("");
    let body;
    history.push({role: "user", content: text});
    try {
      body = requestBody();
    } catch (err) {
      history.pop();
      showError("Extra parameters: " + err.message);
      return;
    }
    bubble("user", text);
    $("pg-message").value = "";
    const output = bubble("assistant", "");
    output.parentNode.classList.add("streaming");
    const t = {start: performance.now(), first: null, last: null, tokens: 0, finish: ""};
    controller = new AbortController();
    sendButton.disabled = true;
    stopButton.disabled = false;
    stats.textContent = "waiting for the first token…";
    let reply = "";
    try {
      const response = await fetch(apiUrl, {
        method: "POST",
        headers: {"Content-Type": "application/json", Authorization: "Bearer " + apiKey},
        body: JSON.stringify(body),
        signal: controller.signal,
      });
      if (!response.ok) throw new Error(await apiError(response));
      for await (const data of sseData(response)) {
        if (data === "[DONE]") break;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) t.tokens = chunk.usage.completion_tokens;
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) continue;
        const piece = choice.delta && choice.delta.content;
        if (piece) {
          const now = performance.now();
          if (t.first === null) t.first = now;
          t.last = now;
          t.tokens += 1;
          reply += piece;
          output.textContent = reply;
          output.parentNode.dataset.chunks = String(Number(output.parentNode.dataset.chunks || 0) + 1);
          log.scrollTop = log.scrollHeight;
        }
        if (choice.finish_reason) t.finish = "finish: " + choice.finish_reason;
        showStats(t);
      }
    } catch (err) {
      if (err.name === "AbortError") {
        t.finish = "stopped";
      } else {
        showError(err.message + (err.message.startsWith("401") ?
          " (the playground key was replaced in another tab or expired: reload the page)" : ""));
        t.finish = "error";
      }
    } finally {
      showStats(t);
      output.parentNode.classList.remove("streaming");
      output.parentNode.dataset.done = t.finish || "done";
      if (reply) history.push({role: "assistant", content: reply});
      else history.pop();
      controller = null;
      sendButton.disabled = false;
      stopButton.disabled = true;
    }
  }

  $("send-form").addEventListener("submit", send);
  $("pg-message").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) send(event);
  });
  stopButton.addEventListener("click", () => { if (controller) controller.abort(); });
  $("pg-clear").addEventListener("click", () => {
    if (controller) controller.abort();
    history = [];
    log.replaceChildren();
    stats.textContent = "";
    showError("");
  });
});
