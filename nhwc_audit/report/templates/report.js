(function () {
  "use strict";
  // Node table: text filter and "findings only" toggle.
  var filter = document.getElementById("node-filter");
  var only = document.getElementById("findings-only");
  var rows = Array.prototype.slice.call(document.querySelectorAll("#node-table tbody tr"));
  var count = document.getElementById("node-count");
  function apply() {
    var q = (filter.value || "").toLowerCase();
    var shown = 0;
    rows.forEach(function (tr) {
      var ok = (!q || tr.textContent.toLowerCase().indexOf(q) >= 0) && (!only.checked || tr.dataset.finding === "1");
      tr.classList.toggle("hidden", !ok);
      if (ok) shown++;
    });
    count.textContent = shown + " of " + rows.length + " nodes";
  }
  filter.addEventListener("input", apply);
  only.addEventListener("change", apply);
  apply();

  // Graph: wheel zoom, drag pan, click a node to select its table row.
  var box = document.getElementById("graph-box");
  var svg = document.getElementById("graph");
  // a copy: viewBox.baseVal is live and would follow every zoom, so "fit all" restored the zoom
  var base = svg.viewBox.baseVal;
  var full = { x: base.x, y: base.y, width: base.width, height: base.height };
  var vb = { x: full.x, y: full.y, w: Math.min(full.width, 1400), h: full.height };
  function setVB() { svg.setAttribute("viewBox", vb.x + " " + vb.y + " " + vb.w + " " + vb.h); }
  setVB();
  box.addEventListener("wheel", function (e) {
    e.preventDefault();
    var r = svg.getBoundingClientRect();
    var mx = vb.x + (e.clientX - r.left) / r.width * vb.w, my = vb.y + (e.clientY - r.top) / r.height * vb.h;
    var k = e.deltaY > 0 ? 1.2 : 1 / 1.2;
    vb.w *= k; vb.h *= k; vb.x = mx - (mx - vb.x) * k; vb.y = my - (my - vb.y) * k;
    setVB();
  }, { passive: false });
  var drag = null;
  box.addEventListener("mousedown", function (e) { drag = { x: e.clientX, y: e.clientY, vx: vb.x, vy: vb.y }; });
  window.addEventListener("mouseup", function () { drag = null; });
  window.addEventListener("mousemove", function (e) {
    if (!drag) return;
    var r = svg.getBoundingClientRect();
    vb.x = drag.vx - (e.clientX - drag.x) / r.width * vb.w;
    vb.y = drag.vy - (e.clientY - drag.y) / r.height * vb.h;
    setVB();
  });
  document.getElementById("graph-fit").addEventListener("click", function () {
    vb = { x: full.x, y: full.y, w: full.width, h: full.height }; setVB();
  });
  function select(name) {
    document.querySelectorAll(".sel").forEach(function (el) { el.classList.remove("sel"); });
    var g = svg.querySelector('[data-node="' + CSS.escape(name) + '"]');
    var tr = document.querySelector('#node-table tr[data-node="' + CSS.escape(name) + '"]');
    if (g) g.classList.add("sel");
    if (tr) { tr.classList.remove("hidden"); tr.classList.add("sel"); tr.scrollIntoView({ block: "center" }); }
  }
  // centre the graph on a node and select it (links in the tables, marks on the layout strip)
  function focus(name) {
    var g = svg.querySelector('[data-node="' + CSS.escape(name) + '"]');
    if (g) {
      var x = parseFloat(g.getAttribute("data-x")), y = parseFloat(g.getAttribute("data-y"));
      vb.x = x - vb.w / 2; vb.y = Math.max(full.y, y - vb.h / 2); setVB();
    }
    select(name);
  }
  document.getElementById("strip").addEventListener("click", function (e) {
    var m = e.target.closest("[data-node]");
    if (m) focus(m.getAttribute("data-node"));
  });
  svg.addEventListener("click", function (e) {
    var g = e.target.closest("[data-node]");
    if (g) select(g.getAttribute("data-node"));
  });
  document.querySelectorAll("a.goto").forEach(function (a) {
    a.addEventListener("click", function (e) {
      e.preventDefault();
      focus(a.getAttribute("data-node"));
    });
  });
})();
