/* depthsite batches: the batch page polls its status JSON and updates progress, rows and thumbnails in place. */
(function () {
  "use strict";

  function $(id) { return document.getElementById(id); }

  function cell(row, selector) { return row ? row.querySelector(selector) : null; }

  function thumb(container, url, alt) {
    if (!container || !url || container.querySelector("img")) { return; }
    var image = document.createElement("img");
    image.src = url; image.alt = alt; image.width = 64; image.height = 48; image.loading = "lazy";
    container.textContent = "";
    container.appendChild(image);
  }

  function render(state) {
    var progress = $("batch-progress");
    if (progress) { progress.max = state.total; progress.value = state.done; }
    var text = $("batch-progress-text");
    if (text) { text.textContent = state.done + " of " + state.total + " done"; }
    var counts = $("batch-counts");
    if (counts) {
      counts.textContent = "(" + state.counts.succeeded + " succeeded, " + state.counts.failed + " failed, " +
        state.counts.running + " running, " + state.counts.queued + " queued)";
    }
    var archive = $("batch-archive");
    if (archive && state.complete) { archive.textContent = "Download all outputs (zip)"; }
    state.jobs.forEach(function (job) {
      var row = document.querySelector('#batch-jobs tr[data-job="' + job.id + '"]');
      var status = cell(row, "td.status");
      if (status) {
        status.textContent = "";
        var badge = document.createElement("span");
        badge.className = "badge " + job.status;
        badge.textContent = job.status;
        status.appendChild(badge);
        if (job.error) {
          var error = document.createElement("span");
          error.className = "error";
          error.textContent = " " + job.error.slice(0, 160);
          status.appendChild(error);
        }
      }
      thumb(cell(row, "td.thumb:not(.depth)"), job.input_url, "photo " + job.name);
      thumb(cell(row, "td.thumb.depth"), job.depth_url, "depth of " + job.name);
    });
  }

  function poll(url, delay) {
    fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" }, cache: "no-store" })
      .then(function (response) {
        if (!response.ok) { throw new Error("status " + response.status); }
        return response.json();
      })
      .then(function (state) {
        render(state);
        if (!state.complete) { window.setTimeout(function () { poll(url, Math.min(delay * 1.3, 3000)); }, delay); }
      })
      .catch(function () {
        window.setTimeout(function () { poll(url, Math.min(delay * 2, 10000)); }, delay * 2);
      });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var root = $("batch");
    var element = $("batch-state");
    var state = element ? JSON.parse(element.textContent) : null;
    if (root && state && !state.complete) { poll(root.getAttribute("data-status-url"), 700); }
  });
})();
