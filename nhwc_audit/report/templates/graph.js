// The layered graph and the module tree. Ops group under the modules they ran in; the graph opens
// with the top-level blocks collapsed, dagre lays out what is shown (data flows down, long edges
// routed around the blocks between), and a click opens a block or, on its frame's title, closes it.
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("graph-data").textContent);
  var mods = data.modules, nodes = data.nodes;
  var svg = document.getElementById("graph"), box = document.getElementById("graph-box");
  var info = document.getElementById("graph-info");
  var NS = svg.namespaceURI;
  var NODE_W = 132, NODE_H = 34, MOD_W = 196, MOD_H = 50;
  var flat = new Set();
  mods.forEach(function (m, j) { if (m.flat) flat.add(j); });
  function openSet(list) { var s = new Set(list); flat.forEach(function (j) { s.add(j); }); return s; }
  var open = openSet(data.open);
  var byName = {};
  nodes.forEach(function (n, i) { byName[n.name] = i; });
  var byPath = {};
  mods.forEach(function (m, j) { byPath[m.path] = j; });
  // the modules above each module, top-down, the root left out
  var chain = mods.map(function (m, j) {
    var c = [];
    for (var k = j; k > 0; k = mods[k].parent) c.unshift(k);
    return c;
  });
  function itemOfNode(i) {
    var c = chain[nodes[i].module];
    for (var k = 0; k < c.length; k++) if (!open.has(c[k])) return "m" + c[k];
    return "n" + i;
  }
  function itemOfModule(j) {
    var c = chain[j];
    for (var k = 0; k < c.length; k++) if (!open.has(c[k])) return "m" + c[k];
    return "c" + j;
  }
  function el(tag, attrs, parent) {
    var e = document.createElementNS(NS, tag);
    for (var a in attrs) e.setAttribute(a, attrs[a]);
    if (parent) parent.appendChild(e);
    return e;
  }
  function fit(text, n) { return text.length > n ? text.slice(0, n - 1) + "…" : text; }
  function mix(a, b, t) { return Math.round(a + (b - a) * t); }
  function shareFill(share) {  // NCHW red to channels_last green, light enough to read text on
    if (share === null) return "#e6eef7";
    return "rgb(" + mix(246, 211, share) + "," + mix(213, 237, share) + "," + mix(212, 221, share) + ")";
  }

  var layout = null, full = { x: 0, y: 0, w: 1, h: 1 }, vb = { x: 0, y: 0, w: 1, h: 1 };
  function shown() { return layout ? layout.nodes().filter(function (id) { return id[0] !== "c"; }).length : 0; }

  function build() {
    var g = new dagre.graphlib.Graph({ compound: true });
    g.setGraph({ rankdir: "TB", nodesep: 18, ranksep: 30, edgesep: 10, marginx: 16, marginy: 16 });
    g.setDefaultEdgeLabel(function () { return {}; });
    function cluster(j) {  // the frame of an open module, inside its own open parent's frame
      while (flat.has(j)) j = mods[j].parent;
      if (j <= 0 || g.hasNode("c" + j)) return;
      g.setNode("c" + j, {});
      var p = mods[j].parent;
      if (p > 0) { cluster(p); g.setParent("c" + j, "c" + p); }
    }
    nodes.forEach(function (n, i) {
      var id = itemOfNode(i);
      if (g.hasNode(id)) return;
      var j = id[0] === "m" ? +id.slice(1) : -1;
      g.setNode(id, j >= 0 ? { width: MOD_W, height: MOD_H } : { width: NODE_W, height: NODE_H });
      var p = j >= 0 ? mods[j].parent : n.module;
      while (flat.has(p)) p = mods[p].parent;
      if (p > 0) { cluster(p); g.setParent(id, "c" + p); }
    });
    data.edges.forEach(function (e) {
      var a = itemOfNode(e[0]), b = itemOfNode(e[1]);
      if (a === b) return;
      var label = g.edge(a, b);
      if (label) { label.heavy = label.heavy || e[2]; label.count += 1; }
      else g.setEdge(a, b, { heavy: e[2], count: 1 });
    });
    dagre.layout(g);
    return g;
  }

  function draw() {
    layout = build();
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    var frames = el("g", { "class": "clusters" }, svg), lines = el("g", { "class": "edges" }, svg);
    var items = el("g", { "class": "items" }, svg);
    var ids = layout.nodes();
    ids.filter(function (id) { return id[0] === "c"; })
      .sort(function (a, b) { return chain[+a.slice(1)].length - chain[+b.slice(1)].length; })
      .forEach(function (id) {
        var j = +id.slice(1), m = mods[j], v = layout.node(id);
        var gr = el("g", { "class": "cluster", "data-module": m.path, "data-x": v.x, "data-y": v.y }, frames);
        el("rect", { x: v.x - v.width / 2, y: v.y - v.height / 2, width: v.width, height: v.height, rx: 6 }, gr);
        var t = el("text", { x: v.x - v.width / 2 + 6, y: v.y - v.height / 2 + 12 }, gr);
        t.textContent = "▾ " + fit(m.path + (m.type ? " (" + m.type + ")" : ""), 60);
        el("title", {}, t).textContent = m.tip + "\nclick to close";
      });
    layout.edges().forEach(function (e) {
      var label = layout.edge(e), pts = label.points;
      var d = "M" + pts.map(function (p) { return p.x.toFixed(1) + "," + p.y.toFixed(1); }).join(" L");
      var path = el("path", { d: d, "class": "edge" + (label.heavy ? " heavy" : "") }, lines);
      el("title", {}, path).textContent = (label.heavy ? "carries a layout change\n" : "") + label.count + " tensor" + (label.count > 1 ? "s" : "");
    });
    ids.forEach(function (id) {
      if (id[0] === "c") return;
      var v = layout.node(id), x = v.x - v.width / 2, y = v.y - v.height / 2, gr;
      if (id[0] === "m") {
        var j = +id.slice(1), m = mods[j];
        gr = el("g", { "class": "block" + m.kinds.map(function (k) { return " f-" + k; }).join(""), "data-module": m.path, "data-x": v.x, "data-y": v.y }, items);
        el("rect", { x: x, y: y, width: v.width, height: v.height, rx: 5, fill: shareFill(m.share) }, gr);
        el("text", { x: x + 8, y: y + 15 }, gr).textContent = "▸ " + fit(m.name + (m.type ? " (" + m.type + ")" : ""), 28);
        el("text", { x: x + 8, y: y + 29, "class": "sub" }, gr).textContent = m.ops + " ops" + (m.share === null ? "" : " · " + Math.round(100 * m.share) + "% channels_last");
        el("text", { x: x + 8, y: y + 42, "class": "sub" }, gr).textContent = m.findings ? m.findings + " finding" + (m.findings > 1 ? "s" : "") + ": " + m.kinds.join(", ") : "no findings";
        el("title", {}, gr).textContent = m.tip + "\nclick to open";
      } else {
        var n = nodes[+id.slice(1)];
        gr = el("g", { "class": "node l-" + n.layout + n.kinds.map(function (k) { return " f-" + k; }).join(""), "data-node": n.name, "data-x": v.x, "data-y": v.y }, items);
        el("rect", { x: x, y: y, width: v.width, height: v.height, rx: 4 }, gr);
        el("text", { x: x + 6, y: y + 14 }, gr).textContent = fit((flat.has(n.module) ? mods[n.module].name + " · " : "") + n.op, 22);
        el("text", { x: x + 6, y: y + 27, "class": "sub" }, gr).textContent = fit(n.shape, 24);
        el("title", {}, gr).textContent = n.tip;
      }
    });
    var gg = layout.graph();
    full = { x: 0, y: 0, w: Math.max(gg.width || 1, 1), h: Math.max(gg.height || 1, 1) };
    svg.setAttribute("data-items", shown());
  }

  // the view box always has the box's aspect, so screen and graph units map one to one
  function setVB() { svg.setAttribute("viewBox", vb.x + " " + vb.y + " " + vb.w + " " + vb.h); }
  function aspect() {  // a box not laid out yet (a closed notebook control) takes the graph's own
    return box.clientWidth && box.clientHeight ? box.clientWidth / box.clientHeight : full.w / full.h;
  }
  function fitAll() {
    var a = aspect(), w = full.w, h = full.h;
    if (w / h < a) w = h * a; else h = w / a;
    vb = { x: full.x - (w - full.w) / 2, y: full.y - (h - full.h) / 2, w: w, h: h };
    setVB();
  }
  function centre(x, y, scale) {  // scale: screen pixels per graph unit
    var w = (box.clientWidth || full.w) / scale, h = (box.clientHeight || full.h) / scale;
    vb = { x: x - w / 2, y: y - h / 2, w: w, h: h };
    setVB();
  }
  function scale() { return (box.clientWidth || full.w) / vb.w; }
  function start() {  // the whole graph when it is readable, else its top at a readable size
    fitAll();
    if (scale() < 0.5) centre(full.w / 2, box.clientHeight / 1.6, 0.8);
  }

  box.addEventListener("wheel", function (e) {
    e.preventDefault();
    var r = box.getBoundingClientRect();
    var mx = vb.x + (e.clientX - r.left) / r.width * vb.w, my = vb.y + (e.clientY - r.top) / r.height * vb.h;
    var k = e.deltaY > 0 ? 1.2 : 1 / 1.2;
    vb = { x: mx - (mx - vb.x) * k, y: my - (my - vb.y) * k, w: vb.w * k, h: vb.h * k };
    setVB();
  }, { passive: false });
  var drag = null;
  box.addEventListener("mousedown", function (e) { drag = { x: e.clientX, y: e.clientY, vx: vb.x, vy: vb.y, moved: false }; });
  window.addEventListener("mouseup", function () { setTimeout(function () { drag = null; }, 0); });
  window.addEventListener("mousemove", function (e) {
    if (!drag || e.buttons !== 1) return;
    var r = box.getBoundingClientRect();
    if (Math.abs(e.clientX - drag.x) + Math.abs(e.clientY - drag.y) > 3) drag.moved = true;
    vb.x = drag.vx - (e.clientX - drag.x) / r.width * vb.w;
    vb.y = drag.vy - (e.clientY - drag.y) / r.height * vb.h;
    setVB();
  });

  // selection: one op or one module, in the graph, the tree, the node table and the facts panel
  var tree = document.getElementById("module-tree");
  var treeBox = tree.parentNode;
  var treeRows = Array.prototype.slice.call(tree.querySelectorAll("tbody tr"));
  var treeOpen = new Set([0]);
  function treeRefresh() {
    treeRows.forEach(function (tr, j) {
      var c = chain[j], ok = true;
      for (var k = 0; k < c.length - 1 && ok; k++) ok = treeOpen.has(c[k]);
      if (j > 0 && !treeOpen.has(mods[j].parent)) ok = false;
      tr.classList.toggle("hidden", !ok);
      var tw = tr.querySelector("button.tw");
      if (tw) tw.textContent = treeOpen.has(j) ? "▾" : "▸";
    });
  }
  function clearSel() { document.querySelectorAll(".sel").forEach(function (x) { x.classList.remove("sel"); }); }
  function graphItem(sel) { return svg.querySelector(sel); }
  function centreOn(g) {
    if (!g) return;
    centre(parseFloat(g.getAttribute("data-x")), parseFloat(g.getAttribute("data-y")), Math.max(scale(), 0.8));
  }
  function selectModule(j, move) {
    clearSel();
    var id = itemOfModule(j);
    var g = id === "c0" ? null : graphItem('[data-module="' + CSS.escape(mods[+id.slice(1)].path) + '"]');
    if (!g && id === "c" + j && flat.has(j)) {  // a one-op leaf module: its op
      var i = nodes.findIndex(function (n) { return n.module === j; });
      if (i >= 0) g = graphItem('[data-node="' + CSS.escape(nodes[i].name) + '"]');
    }
    if (g) { g.classList.add("sel"); if (move) centreOn(g); }
    var row = j;
    while (row >= data.tree) row = mods[row].parent;  // a function's block: its module's row
    chain[row].slice(0, -1).forEach(function (k) { treeOpen.add(k); });
    treeRefresh();
    var tr = treeRows[row];
    tr.classList.add("sel");
    treeBox.scrollTop = tr.offsetTop - treeBox.clientHeight / 2;
    info.textContent = mods[j].tip;
  }
  function reveal(j) {  // open every module above j; true when the graph changed
    var changed = false;
    chain[j].slice(0, -1).forEach(function (k) { if (!open.has(k)) { open.add(k); changed = true; } });
    return changed;
  }
  function focusNode(name, move) {
    var i = byName[name];
    if (i === undefined) return false;
    var m = nodes[i].module;
    if (reveal(m) || (m > 0 && !open.has(m))) { open.add(m); draw(); }
    clearSel();
    var g = graphItem('[data-node="' + CSS.escape(name) + '"]');
    if (g) { g.classList.add("sel"); if (move) centreOn(g); }
    info.textContent = nodes[i].tip;
    return true;
  }
  window.nhwcFocus = focusNode;  // the tables' and the strip's links (report.js)

  svg.addEventListener("click", function (e) {
    if (drag && drag.moved) return;
    var t = e.target.closest("[data-node], [data-module]");
    if (!t) return;
    if (t.hasAttribute("data-node")) {
      var name = t.getAttribute("data-node");
      focusNode(name, false);
      if (window.nhwcSelectRow) window.nhwcSelectRow(name);
      return;
    }
    var j = byPath[t.getAttribute("data-module")];
    if (t.classList.contains("block")) open.add(j); else open.delete(j);
    draw();
    selectModule(j, true);
  });
  treeRows.forEach(function (tr, j) {
    tr.addEventListener("click", function (e) {
      if (e.target.closest("button.tw")) {
        if (treeOpen.has(j)) treeOpen.delete(j); else treeOpen.add(j);
        treeRefresh();
        return;
      }
      if (j > 0 && reveal(j)) draw();
      selectModule(j, true);
    });
  });
  document.getElementById("graph-fit").addEventListener("click", fitAll);
  document.getElementById("graph-top").addEventListener("click", function () {
    open = openSet(data.open); draw(); start();
  });
  // dagre's time grows faster than the ops shown (800 ops: ~2 s here), so the graph opens a level
  // at a time and only while it shows at most LIMIT blocks and ops
  var LIMIT = 300;
  function count(set) {
    var seen = new Set(), saved = open;
    open = set;
    nodes.forEach(function (n, i) { seen.add(itemOfNode(i)); });
    open = saved;
    return seen.size;
  }
  document.getElementById("graph-more").addEventListener("click", function () {
    var closed = [];
    layout.nodes().forEach(function (id) { if (id[0] === "m") closed.push(+id.slice(1)); });
    if (!closed.length) { info.textContent = "Every module is open."; return; }
    var next = new Set(open);
    closed.forEach(function (j) { next.add(j); });
    var n = count(next);
    if (n > LIMIT) {
      info.textContent = "Opening every block would draw " + n + " blocks and ops (at most " + LIMIT +
        " are laid out at once): click the blocks to open, or a row of the module tree.";
      return;
    }
    open = next; draw(); fitAll();
  });
  treeRefresh();
  draw();
  start();
  if (window.ResizeObserver) {  // first laid out later (inside a notebook's control): start again then
    var sized = box.clientWidth > 0;
    new ResizeObserver(function () {
      if (!sized && box.clientWidth > 0) { sized = true; start(); }
    }).observe(box);
  }
})();
