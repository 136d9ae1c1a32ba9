/* depthsite jobs: the job page polls its status JSON and updates in place; the before/after slider. No dependencies. */
(function () {
  "use strict";

  function $(id) { return document.getElementById(id); }

  function show(element, visible) {
    if (element) { element.hidden = !visible; }
  }

  function formatTime(iso) {
    if (!iso) { return "–"; }
    var date = new Date(iso);
    if (isNaN(date.getTime())) { return iso; }
    var pad = function (n) { return String(n).padStart(2, "0"); };
    return date.getUTCFullYear() + "-" + pad(date.getUTCMonth() + 1) + "-" + pad(date.getUTCDate()) + " " +
      pad(date.getUTCHours()) + ":" + pad(date.getUTCMinutes()) + ":" + pad(date.getUTCSeconds());
  }

  function setField(root, name, text) {
    var cells = root.querySelectorAll('[data-field="' + name + '"]');
    for (var i = 0; i < cells.length; i++) { cells[i].textContent = text; }
  }

  function milliseconds(value) { return value === null || value === undefined ? "–" : Math.round(value) + " ms"; }

  function setImage(element, url) {
    if (element && url && element.getAttribute("src") !== url) { element.setAttribute("src", url); }
  }

  var labels = {};  // output names for people, from the page's first state (the polled JSON does not repeat them)

  function render(state) {
    var page = document;
    var badge = $("job-status");
    if (badge) { badge.textContent = state.status; badge.className = "badge " + state.status; }
    $("job").setAttribute("data-status", state.status);
    setField(page, "attempts", String(state.attempts));
    setField(page, "started_at", formatTime(state.started_at));
    setField(page, "finished_at", formatTime(state.finished_at));
    setField(page, "load_ms", milliseconds(state.load_ms));
    setField(page, "inference_ms", milliseconds(state.inference_ms));
    setField(page, "error", state.error || "");
    setField(page, "semantics", state.semantics || "");
    if (state.depth_min !== null && state.depth_min !== undefined) {
      setField(page, "depth_range", state.depth_min.toFixed(4) + " … " + state.depth_max.toFixed(4));
    }
    show($("job-progress"), state.active);
    show($("job-waiting"), state.active);
    show($("job-error"), state.status === "failed");
    show($("job-reused"), Boolean(state.reused_from));

    if (state.status === "succeeded") {
      var preview = state.preview ? state.files[state.preview] : null;
      setImage($("input-image"), state.input_url);
      setImage($("depth-image"), preview);
      setImage($("compare-before"), state.input_url);
      setImage($("compare-after"), preview);
      show($("compare"), Boolean(preview));
      var list = $("downloads");
      if (list && !list.children.length) {
        Object.keys(state.downloads).forEach(function (fmt) {
          if (fmt === "ply_preview") { return; }  // the 3D view's own file, not a download for people
          var item = document.createElement("li");
          var link = document.createElement("a");
          link.href = state.downloads[fmt];
          link.setAttribute("download", "");
          link.setAttribute("data-format", fmt);
          link.textContent = labels[fmt] || fmt;
          item.appendChild(link);
          list.appendChild(item);
        });
      }
      show($("job-result"), true);
    }
    // Other parts of the page (the 3D view) follow the job without polling again.
    document.dispatchEvent(new CustomEvent("depthsite:job-state", { detail: state }));
  }

  function poll(url, delay) {
    fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" }, cache: "no-store" })
      .then(function (response) {
        if (!response.ok) { throw new Error("status " + response.status); }
        return response.json();
      })
      .then(function (state) {
        render(state);
        if (state.active) { window.setTimeout(function () { poll(url, Math.min(delay * 1.3, 3000)); }, delay); }
      })
      .catch(function () {
        // The server restarts or the network blips: keep trying, more slowly.
        window.setTimeout(function () { poll(url, Math.min(delay * 2, 10000)); }, delay * 2);
      });
  }

  function startJobPage() {
    var root = $("job");
    if (!root) { return; }
    var stateElement = $("job-state");
    var state = stateElement ? JSON.parse(stateElement.textContent) : null;
    labels = (state && state.labels) || {};
    if (state && state.active) { poll(root.getAttribute("data-status-url"), 700); }
    var slider = $("compare-slider");
    var after = $("compare-after");
    if (slider && after) {
      var update = function () { after.style.clipPath = "inset(0 " + (100 - Number(slider.value)) + "% 0 0)"; };
      slider.addEventListener("input", update);
      update();
    }
  }

  function startUploadPage() {
    var form = $("upload-form");
    if (!form) { return; }
    form.addEventListener("submit", function () {
      var button = $("submit-upload");
      if (button) { button.disabled = true; button.textContent = "Uploading…"; }
    });
  }

  startJobPage();
  startUploadPage();
})();
