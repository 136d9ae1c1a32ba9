// The model dashboard: polls /api/models/status and updates the page in place; staff buttons call the API.
(function () {
  "use strict";

  var root = document.getElementById("model-dashboard");
  if (!root) return;
  var statusUrl = root.dataset.statusUrl;
  var chartUrl = root.dataset.chartUrl;
  var refreshMs = parseInt(root.dataset.refreshMs, 10) || 4000;
  var timer = null;
  var chartKey = null;

  // --- formatting: the same rules as depthsite.units.format_size and the template ---------------

  function formatSize(bytes) {
    if (bytes === null || bytes === undefined) return "-";
    var value = Number(bytes);
    var units = ["B", "KB", "MB", "GB"];
    var unit = "B";
    for (var i = 0; i < units.length; i++) {
      unit = units[i];
      if (Math.abs(value) < 1000 || unit === "GB") break;
      value /= 1000;
    }
    if (unit === "B") return Math.trunc(value) + " B";
    if (unit === "GB" && Math.abs(value) >= 1000) return (value / 1000).toFixed(2) + " TB";
    return unit === "GB" ? value.toFixed(2) + " GB" : value.toFixed(1) + " " + unit;
  }

  function when(iso) {
    return iso ? iso.slice(0, 16).replace("T", " ") + " UTC" : "never";
  }

  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = text;
    return node;
  }

  // One line per problem, the whole text under a toggle: views.problem_summary does the same.
  function problem(text) {
    var lines = String(text).split(/\r?\n/).map(function (line) { return line.trim(); })
      .filter(function (line) { return line; });
    var first = lines.length ? lines[0] : "";
    if (first.length > 120) first = first.slice(0, 119) + "\u2026";
    var details = el("details", "reason");
    details.appendChild(el("summary", null, first));
    details.appendChild(el("pre", null, text));
    return details;
  }

  function csrfToken() {
    var match = document.cookie.match(/(?:^|;\s*)csrftoken=([^;]+)/);
    return match ? decodeURIComponent(match[1]) : "";
  }

  // --- rendering of the cells that change --------------------------------------------------------

  // A cell is redrawn only when its data changed, so an opened details toggle stays open between polls.
  function unchanged(cell, data) {
    var key = JSON.stringify(data);
    if (cell.dataset.key === key) return true;
    cell.dataset.key = key;
    return false;
  }

  function renderFiles(cell, files) {
    if (unchanged(cell, files)) return;
    cell.replaceChildren();
    if (!files.length) {
      cell.appendChild(el("span", "muted", "not cached"));
      return;
    }
    files.forEach(function (file) {
      var row = el("div", "wf");
      row.dataset.format = file.format;
      row.appendChild(el("span", "fmt mono", file.format));
      row.appendChild(document.createTextNode(" "));
      row.appendChild(el("span", "size", file.size_human));
      row.appendChild(document.createTextNode(" "));
      row.appendChild(el("span", "badge " + file.health, file.health));
      if (file.health_reason) row.appendChild(problem(file.health_reason));
      row.appendChild(el("div", "muted small", "last used " + when(file.last_used_at)));
      cell.appendChild(row);
    });
  }

  function renderDownload(cell, download) {
    if (unchanged(cell, download)) return;
    cell.replaceChildren();
    if (!download) {
      cell.appendChild(el("span", "muted", "-"));
      return;
    }
    cell.appendChild(el("span", "badge " + download.status, download.status));
    if (download.active) {
      var percent = Math.round(1000 * (download.progress || 0)) / 10;
      var bar = el("div", "progress");
      bar.setAttribute("role", "progressbar");
      bar.setAttribute("aria-valuemin", "0");
      bar.setAttribute("aria-valuemax", "100");
      bar.setAttribute("aria-valuenow", String(percent));
      var fill = el("span");
      fill.style.width = percent + "%";
      bar.appendChild(fill);
      cell.appendChild(bar);
    }
    var text = formatSize(download.bytes_done) + (download.bytes_total ? " of " + formatSize(download.bytes_total) : "");
    cell.appendChild(el("div", "muted small", text));
    if (download.error) cell.appendChild(problem(download.error));
  }

  function renderWarm(cell, warm) {
    cell.replaceChildren();
    if (!warm.length) {
      cell.appendChild(el("span", "muted", "-"));
      return;
    }
    warm.forEach(function (load) {
      var line = el("div", "mono small" + (load.alive === false ? " gone" : ""), load.worker + " ");
      line.appendChild(el("span", "muted", load.device + "/" + load.dtype + (load.bytes ? " \u00b7 " + formatSize(load.bytes) : "")));
      if (load.alive === false) {
        line.appendChild(document.createTextNode(" "));
        var badge = el("span", "badge gone", "gone");
        badge.title = "no heartbeat since " + when(load.last_used_at);
        line.appendChild(badge);
      }
      cell.appendChild(line);
    });
  }

  function renderWarmWorkers(models) {
    var list = document.getElementById("warm-workers");
    if (!list) return;
    var workers = {};
    var order = [];
    models.forEach(function (model) {
      model.warm.forEach(function (load) {
        if (!workers[load.worker]) { workers[load.worker] = { bytes: 0, models: [] }; order.push(load.worker); }
        workers[load.worker].bytes += load.bytes || 0;
        workers[load.worker].models.push(model.name + " (" + (load.bytes ? formatSize(load.bytes) : "size unknown") + ")");
      });
    });
    list.replaceChildren();
    if (!order.length) {
      list.appendChild(el("li", "muted", "none: no worker holds a network loaded"));
      return;
    }
    order.forEach(function (name) {
      var item = el("li", "", "");
      item.appendChild(el("span", "mono", name));
      item.appendChild(document.createTextNode(": " + formatSize(workers[name].bytes) + " in " + workers[name].models.join(", ")));
      list.appendChild(item);
    });
  }

  function renderPin(cell, sha256) {
    cell.title = sha256 || "";
    cell.textContent = sha256 ? sha256.slice(0, 16) + "\u2026" : "-";
  }

  function setText(id, text) {
    var node = document.getElementById(id);
    if (node && node.textContent !== text) node.textContent = text;
  }

  function update(status) {
    var totals = status.totals;
    setText("total-files", String(totals.files));
    setText("total-bytes", formatSize(totals.bytes));
    setText("total-limit", totals.max_bytes ? formatSize(totals.max_bytes) : "none");
    setText("disk-free", formatSize(totals.disk_free));
    setText("downloads-active", totals.downloads_active + " running");
    setText("cache-health", status.health);
    var health = document.getElementById("cache-health");
    if (health) health.className = status.health === "good" ? "good" : "bad";
    setText("dash-updated", "updated " + status.generated_at.slice(11, 19) + " UTC");

    renderWarmWorkers(status.models);
    status.models.forEach(function (model) {
      var row = root.querySelector('tr[data-model="' + CSS.escape(model.name) + '"]');
      if (!row) return;
      renderFiles(row.querySelector("td.files"), model.formats);
      renderDownload(row.querySelector("td.download"), model.download);
      renderWarm(row.querySelector("td.warm"), model.warm);
      renderPin(row.querySelector("td.pin"), model.expected_sha256);
      var size = row.querySelector(".model-size");
      if (size) size.textContent = model.bytes ? formatSize(model.bytes) : "";
    });

    // The chart is drawn by the server; fetch it again only when what it shows has changed.
    var key = status.models.map(function (model) {
      return model.name + ":" + model.formats.map(function (f) { return f.format + "=" + f.size + "/" + f.health; }).join(",");
    }).join(";");
    if (key !== chartKey) refreshChart();
    chartKey = key;
  }

  function refreshChart() {
    fetch(chartUrl, { credentials: "same-origin" })
      .then(function (response) { return response.ok ? response.text() : null; })
      .then(function (svg) {
        if (svg) document.getElementById("cache-chart").innerHTML = svg;  // our own server's markup
      })
      .catch(function () {});
  }

  function poll() {
    clearTimeout(timer);
    fetch(statusUrl, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (response) {
        return response.json().then(function (body) { return { ok: response.ok, body: body }; });
      })
      .then(function (result) {
        if (result.ok) {
          update(result.body);
          root.classList.remove("stale");
        } else {
          root.classList.add("stale");
          setText("dash-updated", result.body.message || "could not refresh");
        }
      })
      .catch(function () {
        root.classList.add("stale");
        setText("dash-updated", "could not reach the server; retrying");
      })
      .finally(function () {
        timer = setTimeout(poll, document.hidden ? refreshMs * 5 : refreshMs);
      });
  }

  // --- staff actions -----------------------------------------------------------------------------

  function call(method, url, body) {
    return fetch(url, {
      method: method,
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", Accept: "application/json", "X-CSRFToken": csrfToken() },
      body: body === undefined ? undefined : JSON.stringify(body),
    }).then(function (response) {
      return response.json().catch(function () { return { message: response.statusText }; })
        .then(function (data) { return { ok: response.ok, status: response.status, data: data }; });
    });
  }

  // A 202 answer is a background run (verify, convert, optimize): poll its URL until it has finished, then
  // resolve as the synchronous call would have answered (ok with its result, or its error message).
  function settle(response) {
    if (response.status !== 202 || !response.data || !response.data.url) {
      return Promise.resolve(response);
    }
    var url = response.data.url;
    return new Promise(function (resolve) {
      function check() {
        call("GET", url).then(function (polled) {
          var run = polled.data;
          if (!polled.ok) return resolve(polled);
          if (run.active) return setTimeout(check, 1000);
          if (run.status === "succeeded") return resolve({ ok: true, status: 200, data: run.result });
          resolve({ ok: false, status: run.error_status || 500, data: { message: run.error } });
        }).catch(function () { setTimeout(check, 3000); });
      }
      check();
    });
  }

  function show(target, ok, message) {
    target.classList.remove("ok", "error");
    target.classList.add(ok ? "ok" : "error");
    target.textContent = message;
  }

  function successMessage(action, data, model) {
    switch (action) {
      case "download": return "download " + data.id + " " + data.status + "; progress shows below";
      case "verify": return data.message;
      case "convert": return data.format + " cached (" + data.size_human + ")";
      case "clear": return "cleared " + model + ": " + data.files + " file(s), " + formatSize(data.bytes) + " freed";
      default: return "done";
    }
  }

  function rowAction(button, action) {
    var row = button.closest("tr");
    var model = row.dataset.model;
    var result = row.querySelector(".result");
    var select = row.querySelector("select[name=format]");
    var format = select ? select.value : "";
    var request;
    if (action === "download") request = call("POST", row.dataset.downloadUrl, {});
    else if (action === "verify") request = call("POST", row.dataset.verifyUrl, {});
    else if (action === "convert") request = call("POST", row.dataset.convertUrl, { format: format });
    else if (action === "clear") {
      if (!window.confirm("Delete every cached file of " + model + " on " + root.dataset.node + "?")) return;
      request = call("POST", root.dataset.clearUrl, { confirm: true, model: model });
    } else return;
    button.disabled = true;
    show(result, true, action + "\u2026");
    request
      .then(function (response) { return action === "download" ? response : settle(response); })
      .then(function (response) {
        // A verify that ran but found a damaged file is an error to the reader, not a success.
        var healthy = response.ok && !(action === "verify" && response.data.ok === false);
        show(result, healthy, response.ok ? successMessage(action, response.data, model) : response.data.message);
      })
      .catch(function (error) { show(result, false, String(error)); })
      .finally(function () {
        button.disabled = false;
        poll();
      });
  }

  function optimize(button, run) {
    var result = document.getElementById("global-result");
    if (run && !window.confirm("Delete corrupt, orphan and stale files (and evict to the size limit) on " + root.dataset.node + "?")) return;
    button.disabled = true;
    call("POST", root.dataset.optimizeUrl, { dry_run: !run })
      .then(settle)
      .then(function (response) {
        var plan = response.data;
        if (!response.ok) return show(result, false, plan.message);
        var text = plan.items.length === 0 ? "nothing to do" :
          (plan.executed ? "freed " + formatSize(plan.freed_bytes) : "would free " + formatSize(plan.bytes_to_free)) +
          " in " + plan.items.length + " item(s): " + plan.items.map(function (item) {
            return item.kind + " " + (item.model ? item.model + " [" + item.format + "]" : item.path);
          }).join(", ");
        show(result, plan.errors.length === 0, text + (plan.errors.length ? " (" + plan.errors.join("; ") + ")" : ""));
      })
      .catch(function (error) { show(result, false, String(error)); })
      .finally(function () {
        button.disabled = false;
        poll();
      });
  }

  root.addEventListener("click", function (event) {
    var button = event.target.closest("button[data-action]");
    if (!button || !root.contains(button)) return;
    var action = button.dataset.action;
    if (action === "optimize-plan") optimize(button, false);
    else if (action === "optimize-run") optimize(button, true);
    else rowAction(button, action);
  });

  root.addEventListener("change", function (event) {
    if (event.target.name !== "format") return;
    var row = event.target.closest("tr");
    var link = row.querySelector("a[data-action=export]");
    if (!link) return;  // no export permission: no link to point at the format
    link.href = row.dataset.exportUrl + "?format=" + encodeURIComponent(event.target.value);
  });

  document.addEventListener("visibilitychange", function () {
    if (!document.hidden) poll();
  });

  timer = setTimeout(poll, refreshMs);
})();
