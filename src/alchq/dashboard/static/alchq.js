/* alchq dashboard: confirmations, filters that apply on change, and a 2-second live refresh
   from the JSON API. Task values are only ever set with textContent, never as HTML. */
(function () {
  "use strict";

  var POLL_MS = 2000;
  var body = document.body;
  var live = document.getElementById("live");
  var charts = {};

  // -- small helpers -----------------------------------------------------------
  function $(sel, root) { return (root || document).querySelector(sel); }
  function $$(sel, root) { return Array.prototype.slice.call((root || document).querySelectorAll(sel)); }
  function esc(value) { return window.CSS && CSS.escape ? CSS.escape(value) : String(value).replace(/["\\]/g, "\\$&"); }
  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }
  function setText(node, text) { if (node && node.textContent !== String(text)) node.textContent = String(text); }
  function cssVar(name, fallback) {
    var v = getComputedStyle(document.documentElement).getPropertyValue(name).trim();
    return v || fallback;
  }
  function duration(s) {
    if (s === null || s === undefined) return "—";
    if (s < 1) return Math.round(s * 1000) + " ms";
    if (s < 120) return s.toFixed(1) + " s";
    if (s < 7200) return (s / 60).toFixed(1) + " min";
    return (s / 3600).toFixed(1) + " h";
  }
  function ago(iso) {
    if (!iso) return "—";
    var s = (Date.now() - Date.parse(iso)) / 1000;
    var a = Math.abs(s);
    if (a < 1) return s >= 0 ? "now" : "in <1s";
    var units = [["d", 86400], ["h", 3600], ["m", 60], ["s", 1]];
    for (var i = 0; i < units.length; i++) {
      if (a >= units[i][1]) {
        var n = Math.floor(a / units[i][1]) + units[i][0];
        return s >= 0 ? n + " ago" : "in " + n;
      }
    }
    return "now";
  }
  function utc(iso) {
    if (!iso) return "—";
    return new Date(Date.parse(iso)).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC").replace(/Z$/, " UTC");
  }
  function hhmm(ts) {
    var d = new Date(ts * 1000);
    return ("0" + d.getHours()).slice(-2) + ":" + ("0" + d.getMinutes()).slice(-2);
  }
  function url(path) { return body.getAttribute("data-prefix").replace(/\/$/, "") + path; }
  function taskUrl(model, key) { return url("/tasks/" + encodeURIComponent(model) + "/" + encodeURIComponent(key)); }
  function timeEl(iso) {
    var t = el("time", null, ago(iso));
    if (iso) { t.setAttribute("datetime", iso); t.title = utc(iso); }
    return t;
  }

  // -- confirmations and filters -------------------------------------------------
  document.addEventListener("submit", function (ev) {
    var form = ev.target;
    var submitter = ev.submitter || null;
    var text = (submitter && submitter.getAttribute("data-confirm")) || form.getAttribute("data-confirm");
    if (text && !window.confirm(text)) ev.preventDefault();
  });
  $$("select[data-autosubmit]").forEach(function (select) {
    select.addEventListener("change", function () { select.form.submit(); });
  });

  // -- progress and status ---------------------------------------------------------
  function setProgress(box, value, message) {
    if (!box) return;
    var bar = $("progress", box);
    if (value === null || value === undefined) {
      box.setAttribute("data-empty", "1");
      bar.value = 0;
      setText($("[data-field=progress-pct]", box), "—");
    } else {
      box.removeAttribute("data-empty");
      bar.value = value;
      setText($("[data-field=progress-pct]", box), Math.floor(value * 100) + "%");
    }
    setText($("[data-field=progress-msg]", box), message || "");
  }
  function progressEl(value, message) {
    var box = el("div", "progress progress-compact");
    box.setAttribute("data-field", "progress");
    var bar = el("progress");
    bar.max = 1;
    bar.setAttribute("aria-label", "progress");
    var pct = el("span", "progress-pct"); pct.setAttribute("data-field", "progress-pct");
    var msg = el("span", "progress-msg"); msg.setAttribute("data-field", "progress-msg");
    box.appendChild(bar); box.appendChild(pct); box.appendChild(msg);
    setProgress(box, value, message);
    return box;
  }
  function setStatus(root, status) {
    var badge = $("[data-field=status]", root);
    if (badge) { setText(badge, status); badge.className = "badge badge-" + String(status).toLowerCase(); }
    $$(".action[data-when]", root).forEach(function (a) {
      a.hidden = a.getAttribute("data-when").split(" ").indexOf(status) < 0;
    });
  }

  // -- overview --------------------------------------------------------------------
  function drawChart(model, node, throughput) {
    var xs = [], ok = [], failed = [];
    (throughput || []).forEach(function (m) {
      xs.push(Date.parse(m.minute) / 1000); ok.push(m.processed); failed.push(m.failed);
    });
    var data = [xs, ok, failed];
    var width = Math.max(200, node.clientWidth);
    if (charts[model]) {
      charts[model].setData(data);
      return;
    }
    if (typeof uPlot === "undefined") return;
    var green = cssVar("--processed", "#16a34a"), red = cssVar("--error", "#dc2626");
    var grid = cssVar("--line", "#e3e6ec"), muted = cssVar("--muted", "#6b7385");
    var axis = { stroke: muted, grid: { stroke: grid, width: 1 }, ticks: { stroke: grid, width: 1 }, font: "11px system-ui, sans-serif" };
    var steps = uPlot.paths && uPlot.paths.stepped ? uPlot.paths.stepped({ align: 1 }) : undefined;
    charts[model] = new uPlot({
      width: width,
      height: 170,
      legend: { show: false },
      cursor: { drag: { x: false, y: false } },
      scales: { x: { time: true }, y: { range: function (u, min, max) { return [0, Math.max(4, Math.ceil(max * 1.15))]; } } },
      axes: [
        Object.assign({ space: 70, values: function (u, splits) { return splits.map(hhmm); } }, axis),
        // Tasks are counted whole: no 2.5 on the axis.
        Object.assign({ size: 40, incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 1e4, 2e4, 5e4, 1e5, 1e6] }, axis)
      ],
      series: [
        {},
        { label: "processed", stroke: green, width: 2, fill: green + "33", paths: steps, points: { show: false } },
        { label: "failed", stroke: red, width: 2, fill: red + "33", paths: steps, points: { show: false } }
      ]
    }, data, node);
    node.setAttribute("data-drawn", "1");
  }
  window.addEventListener("resize", function () {
    Object.keys(charts).forEach(function (name) {
      var node = $('[data-chart="' + esc(name) + '"]');
      if (node) charts[name].setSize({ width: Math.max(200, node.clientWidth), height: 170 });
    });
  });

  function runningRows(tbody, model, running) {
    tbody.textContent = "";
    if (!running.length) {
      var tr = el("tr", "empty-row"), td = el("td", null, "Nothing running.");
      td.colSpan = 4; tr.appendChild(td); tbody.appendChild(tr);
      return;
    }
    running.forEach(function (r) {
      var tr = el("tr"); tr.setAttribute("data-key", r.key);
      var a = el("a", "mono", r.key); a.href = taskUrl(model, r.key);
      var c1 = el("td"); c1.appendChild(a);
      var c2 = el("td", "mono ellipsis", r.worker || "—"); c2.title = r.worker || "";
      var c3 = el("td"); c3.appendChild(timeEl(r.started_at));
      var c4 = el("td"); c4.appendChild(progressEl(r.progress, r.message));
      [c1, c2, c3, c4].forEach(function (c) { tr.appendChild(c); });
      tbody.appendChild(tr);
    });
  }
  function errorRows(tbody, model, errors) {
    tbody.textContent = "";
    if (!errors.length) {
      var tr = el("tr", "empty-row"), td = el("td", null, "No errors.");
      td.colSpan = 3; tr.appendChild(td); tbody.appendChild(tr);
      return;
    }
    errors.forEach(function (e) {
      var tr = el("tr");
      var a = el("a", "mono", e.key); a.href = taskUrl(model, e.key);
      var c1 = el("td"); c1.appendChild(a);
      var c2 = el("td", "ellipsis"); c2.title = e.message || "";
      c2.appendChild(el("strong", null, e.error_type || "Error"));
      c2.appendChild(document.createTextNode(" " + (e.message || "")));
      var c3 = el("td"); c3.appendChild(timeEl(e.finished_at));
      [c1, c2, c3].forEach(function (c) { tr.appendChild(c); });
      tbody.appendChild(tr);
    });
  }
  function updateOverview(data) {
    var totals = { ready: 0, scheduled: 0, PROCESSING: 0, ERROR: 0 };
    (data.models || []).forEach(function (m) {
      if (m.error) return;
      totals.ready += m.ready; totals.scheduled += m.scheduled;
      totals.PROCESSING += m.counts.PROCESSING || 0; totals.ERROR += m.counts.ERROR || 0;
      var section = $('section.model[data-model="' + esc(m.name) + '"]');
      if (!section) return;
      $$("[data-count]", section).forEach(function (n) { setText(n, m.counts[n.getAttribute("data-count")] || 0); });
      setText($("[data-field=ready]", section), m.ready);
      setText($("[data-field=scheduled]", section), m.scheduled);
      setText($("[data-field=oldest_ready_age]", section), duration(m.oldest_ready_age));
      setText($("[data-field=run_time_mean]", section), duration(m.run_time_mean));
      setText($("[data-field=run_time_p95]", section), duration(m.run_time_p95));
      setText($("[data-field=running-count]", section), m.running.length);
      drawChart(m.name, $("[data-chart]", section), m.throughput);
      runningRows($("[data-list=running]", section), m.name, m.running || []);
      errorRows($("[data-list=errors]", section), m.name, m.recent_errors || []);
    });
    Object.keys(totals).forEach(function (k) { setText($('[data-total="' + k + '"]'), totals[k]); });
    var w = $('[data-total="workers"] a');
    if (w && data.workers) setText(w, data.workers.alive);
  }

  // -- task list ---------------------------------------------------------------------
  function updateTasks(data) {
    setText($("[data-field=total]"), data.total);
    (data.items || []).forEach(function (t) {
      var row = $('tr[data-key="' + esc(t.key) + '"]');
      if (!row) return;
      setStatus(row, t.status);
      var attempts = $("[data-field=attempts]", row);
      if (attempts) {
        attempts.textContent = String(t.attempts);
        if (t.failures) attempts.appendChild(el("span", "muted", " (" + t.failures + " failed)"));
      }
      var box = $("[data-field=progress]", row);
      if (box) setProgress(box, t.progress, t.message);
    });
  }

  // -- one task ----------------------------------------------------------------------
  function updateTask(t) {
    setStatus(document, t.status);
    var progressSection = $("#progress-section");
    if (progressSection && (t.progress !== null || t.message || t.status === "PROCESSING")) progressSection.hidden = false;
    setProgress($("[data-field=progress]"), t.progress, t.message);
    setText($("[data-field=attempts]"), t.attempts);
    setText($("[data-field=failures]"), t.failures);
    setText($("[data-field=worker]"), t.worker || "—");
    setText($("[data-field=started_at]"), utc(t.started_at));
    setText($("[data-field=finished_at]"), utc(t.finished_at));
    setText($("[data-field=lease_until]"), utc(t.lease_until));
    if (t.started_at && t.finished_at) {
      setText($("[data-field=run_time]"), duration((Date.parse(t.finished_at) - Date.parse(t.started_at)) / 1000));
    }
    Object.keys(t.columns || {}).forEach(function (name) {
      var cell = $('[data-column="' + esc(name) + '"]');
      var v = t.columns[name];
      if (cell) setText(cell, v === null ? "NULL" : typeof v === "string" ? v : JSON.stringify(v));
    });
    var section = $("#error-section");
    if (section) {
      section.hidden = !(t.error_type || t.traceback);
      setText($("[data-field=error_type]"), t.error_type || "");
      setText($("[data-field=error_message]"), t.error_message || "");
      setText($("[data-field=traceback]"), t.traceback || "");
    }
  }

  // -- workers -----------------------------------------------------------------------
  function updateWorkers(data) {
    var workers = data.workers || [];
    var tbody = $("[data-list=workers]");
    setText($("[data-field=alive]"), workers.filter(function (w) { return w.alive; }).length);
    setText($("[data-field=total]"), workers.length);
    if (!tbody || !workers.length) return;
    tbody.textContent = "";
    workers.forEach(function (w) {
      var tr = el("tr");
      var c = el("td"); c.appendChild(el("span", "badge " + (w.alive ? "badge-alive" : "badge-gone"), w.alive ? "alive" : "gone")); tr.appendChild(c);
      var id = el("td", "mono ellipsis", w.id); id.title = w.id;
      if (w.supervisor) { id.appendChild(el("br")); id.appendChild(el("span", "muted", "under " + w.supervisor)); }
      tr.appendChild(id);
      tr.appendChild(el("td", null, w.host));
      tr.appendChild(el("td", "num mono", w.pid));
      tr.appendChild(el("td", null, (w.models || []).join(", ")));
      tr.appendChild(el("td", "num", w.in_hand));
      var hb = el("td"); hb.appendChild(timeEl(w.heartbeat_at)); tr.appendChild(hb);
      var st = el("td", "hide-sm"); st.appendChild(timeEl(w.started_at)); tr.appendChild(st);
      tr.appendChild(el("td", "hide-sm mono", w.version));
      tbody.appendChild(tr);
    });
  }

  // -- polling -----------------------------------------------------------------------
  var updaters = { overview: updateOverview, tasks: updateTasks, task: updateTask, workers: updateWorkers };
  var pollUrl = body.getAttribute("data-poll");
  var page = body.getAttribute("data-page");
  if ($("[data-task]")) page = "task";
  var update = updaters[page];
  var timer = null;

  function state(ok) {
    if (!live) return;
    live.classList.toggle("on", ok);
    live.classList.toggle("off", !ok);
  }
  function poll() {
    clearTimeout(timer);
    if (document.hidden) { timer = setTimeout(poll, POLL_MS); return; }
    fetch(pollUrl, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) {
        if (!r.ok) throw new Error("HTTP " + r.status);
        // A fresh CSRF token: actions keep working on a page left open for hours.
        var token = r.headers.get("X-CSRFToken");
        if (token) {
          document.querySelectorAll("input[name=csrf_token]").forEach(function (i) { i.value = token; });
          var meta = $("meta[name=csrf-token]");
          if (meta) meta.setAttribute("content", token);
        }
        return r.json();
      })
      .then(function (data) { update(data); state(true); body.setAttribute("data-updated", String(Date.now())); })
      .catch(function () { state(false); })
      .then(function () { timer = setTimeout(poll, POLL_MS); });
  }
  if (pollUrl && update) {
    poll();
    document.addEventListener("visibilitychange", function () { if (!document.hidden) poll(); });
  }
})();
