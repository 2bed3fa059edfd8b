/* Settings page: copy a new key's secret. */
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const button = document.getElementById("copy-key");
  if (!button) return;
  button.addEventListener("click", async () => {
    const secret = document.getElementById("new-key-secret").textContent;
    try {
      await navigator.clipboard.writeText(secret);
      button.textContent = "Copied";
    } catch (err) {
      const range = document.createRange();
      range.selectNodeContents(document.getElementById("new-key-secret"));
      const selection = window.getSelection();
      selection.removeAllRanges();
      selection.addRange(range);
      button.textContent = "Selected: press Ctrl+C";
    }
  });
});
