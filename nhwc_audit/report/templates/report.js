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

  // Select a node's row in the node table (without moving the page) and show it in the graph.
  function selectRow(name) {
    document.querySelectorAll("#node-table tr.sel").forEach(function (el) { el.classList.remove("sel"); });
    var tr = document.querySelector('#node-table tr[data-node="' + CSS.escape(name) + '"]');
    if (tr) { tr.classList.remove("hidden"); tr.classList.add("sel"); }
  }
  window.nhwcSelectRow = selectRow;
  function focus(name) {  // links in the tables and marks on the layout strip
    var box = document.getElementById("graph-box");
    if (window.nhwcFocus) window.nhwcFocus(name, true);
    selectRow(name);
    box.scrollIntoView({ block: "center" });
  }
  document.getElementById("strip").addEventListener("click", function (e) {
    var m = e.target.closest("[data-node]");
    if (m) focus(m.getAttribute("data-node"));
  });
  document.querySelectorAll("a.goto").forEach(function (a) {
    a.addEventListener("click", function (e) {
      e.preventDefault();
      focus(a.getAttribute("data-node"));
    });
  });
})();
