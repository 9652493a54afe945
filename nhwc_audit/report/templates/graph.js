// The layered graph and the module tree. Ops group under the modules they ran in; the graph opens
// with the top-level blocks collapsed, dagre lays out what is shown (data flows down, long edges
// routed around the blocks between), and a click opens a block or, on its frame's title, closes it.
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("graph-data").textContent);
  var mods = data.modules, nodes = data.nodes;
  var svg = document.getElementById("graph"), box = document.getElementById("graph-box");
  var info = document.getElementById("graph-info"), status = document.getElementById("graph-status");
  var NS = svg.namespaceURI;
  var NODE_W = 132, NODE_H = 34, MOD_W = 196, MOD_H = 50, CHAR_W = 6.2;
  var LIMIT = 300;  // dagre's time grows faster than what it lays out (800 ops: ~2 s here)
  var flat = new Set();
  mods.forEach(function (m, j) { if (m.flat) flat.add(j); });
  function openSet(list) { var s = new Set(list); flat.forEach(function (j) { s.add(j); }); return s; }
  var open = openSet(data.open);
  var byName = {};
  nodes.forEach(function (n, i) { byName[n.name] = i; });
  var byPath = {};
  mods.forEach(function (m, j) { byPath[m.path] = j; });
  // the modules above each module and itself, top-down, the root left out
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
  function fit(text, width) {  // cut to what fits in width pixels of 11px text
    var n = Math.max(4, Math.floor(width / CHAR_W));
    return text.length > n ? text.slice(0, n - 1) + "…" : text;
  }
  function mix(a, b, t) { return Math.round(a + (b - a) * t); }
  function shareFill(share) {  // NCHW red to channels_last green, light enough to read text on
    if (share === null) return "#e6eef7";
    return "rgb(" + mix(246, 211, share) + "," + mix(213, 237, share) + "," + mix(212, 221, share) + ")";
  }
  function title(m) { return m.name + (m.type ? " (" + m.type + ")" : ""); }

  var layout = null, full = { x: 0, y: 0, w: 1, h: 1 }, vb = { x: 0, y: 0, w: 1, h: 1 };
  function count(set) {  // blocks and ops shown with these modules open
    var seen = new Set(), saved = open;
    open = set;
    nodes.forEach(function (n, i) { seen.add(itemOfNode(i)); });
    open = saved;
    return seen.size;
  }

  function build() {
    var g = new dagre.graphlib.Graph({ compound: true });
    g.setGraph({ rankdir: "TB", nodesep: 18, ranksep: 34, edgesep: 10, marginx: 16, marginy: 16 });
    g.setDefaultEdgeLabel(function () { return {}; });
    function frameOf(j) { while (flat.has(j)) j = mods[j].parent; return j; }
    function cluster(j) {  // the frame of an open module, inside its own open parent's frame
      j = frameOf(j);
      if (j <= 0 || g.hasNode("c" + j)) return j;
      g.setNode("c" + j, {});
      var p = frameOf(mods[j].parent);
      if (p > 0) { cluster(p); g.setParent("c" + j, "c" + p); }
      return j;
    }
    nodes.forEach(function (n, i) {
      var id = itemOfNode(i);
      if (g.hasNode(id)) return;
      var j = id[0] === "m" ? +id.slice(1) : -1;
      g.setNode(id, j >= 0 ? { width: MOD_W, height: MOD_H } : { width: NODE_W, height: NODE_H });
      var p = cluster(j >= 0 ? mods[j].parent : n.module);
      if (p > 0) g.setParent(id, "c" + p);
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
    var defs = el("defs", {}, svg);
    [["arrow", "#9aa3ad"], ["arrow-heavy", "var(--conversion)"]].forEach(function (a) {
      var mk = el("marker", { id: a[0], viewBox: "0 0 8 8", refX: 7, refY: 4, markerWidth: 7, markerHeight: 7, orient: "auto", markerUnits: "userSpaceOnUse" }, defs);
      el("path", { d: "M0,0 L8,4 L0,8 z", style: "fill: " + a[1] }, mk);
    });
    var frames = el("g", { "class": "clusters" }, svg), lines = el("g", { "class": "edges" }, svg);
    var items = el("g", { "class": "items" }, svg), titles = el("g", { "class": "titles" }, svg);
    var ids = layout.nodes();
    var tops = {};
    ids.filter(function (id) { return id[0] === "c"; })
      .sort(function (a, b) { return chain[+a.slice(1)].length - chain[+b.slice(1)].length; })
      .forEach(function (id) {
        var j = +id.slice(1), m = mods[j], v = layout.node(id);
        var x = v.x - v.width / 2, y = v.y - v.height / 2;
        tops[j] = y;
        el("rect", { x: x, y: y, width: v.width, height: v.height, rx: 6, "data-module": m.path }, frames);
        // a frame whose top meets its parent frame's top puts its title on the right
        var p = mods[j].parent, right = p > 0 && tops[p] !== undefined && Math.abs(tops[p] - y) < 14;
        var gr = el("g", { "class": "cluster", "data-module": m.path, "data-x": v.x, "data-y": y + 8 }, titles);
        var t = el("text", right ? { x: x + v.width - 6, y: y + 11, "text-anchor": "end" } : { x: x + 6, y: y + 11 }, gr);
        t.textContent = "▾ " + fit(title(m), (v.width - 28) * CHAR_W / 7.2);  // bold: ~7.2 px a character
        el("title", {}, t).textContent = m.tip + "\nclick to close";
      });
    layout.edges().forEach(function (e) {
      var label = layout.edge(e), pts = label.points;
      var d = "M" + pts.map(function (p) { return p.x.toFixed(1) + "," + p.y.toFixed(1); }).join(" L");
      var path = el("path", { d: d, "class": "edge" + (label.heavy ? " heavy" : ""), "marker-end": "url(#" + (label.heavy ? "arrow-heavy" : "arrow") + ")" }, lines);
      el("title", {}, path).textContent = (label.heavy ? "carries a layout change\n" : "") + label.count + " tensor" + (label.count > 1 ? "s" : "");
    });
    ids.forEach(function (id) {
      if (id[0] === "c") return;
      var v = layout.node(id), x = v.x - v.width / 2, y = v.y - v.height / 2, gr;
      if (id[0] === "m") {
        var j = +id.slice(1), m = mods[j];
        gr = el("g", { "class": "block" + m.kinds.map(function (k) { return " f-" + k; }).join(""), "data-module": m.path, "data-x": v.x, "data-y": v.y }, items);
        el("rect", { x: x, y: y, width: v.width, height: v.height, rx: 5, fill: shareFill(m.share) }, gr);
        el("text", { x: x + 8, y: y + 15 }, gr).textContent = "▸ " + fit(title(m), v.width - 26);
        el("text", { x: x + 8, y: y + 29, "class": "sub" }, gr).textContent = fit(m.ops + " ops" + (m.share === null ? "" : " · " + Math.round(100 * m.share) + "% channels_last"), v.width - 10);
        el("text", { x: x + 8, y: y + 42, "class": "sub" }, gr).textContent = fit(m.findings ? m.findings + " finding" + (m.findings > 1 ? "s" : "") + ": " + m.kinds.join(", ") : "no findings", v.width - 10);
        el("title", {}, gr).textContent = m.tip + "\nclick to open";
      } else {
        var n = nodes[+id.slice(1)];
        gr = el("g", { "class": "node l-" + n.layout + n.kinds.map(function (k) { return " f-" + k; }).join(""), "data-node": n.name, "data-x": v.x, "data-y": v.y }, items);
        el("rect", { x: x, y: y, width: v.width, height: v.height, rx: 4 }, gr);
        el("text", { x: x + 6, y: y + 14 }, gr).textContent = fit((flat.has(n.module) ? mods[n.module].name + " · " : "") + n.op, v.width - 10);
        el("text", { x: x + 6, y: y + 27, "class": "sub" }, gr).textContent = fit(n.shape, v.width - 10);
        el("title", {}, gr).textContent = n.tip;
      }
    });
    var gg = layout.graph();
    full = { x: 0, y: 0, w: Math.max(gg.width || 1, 1), h: Math.max(gg.height || 1, 1) };
    svg.setAttribute("data-items", ids.filter(function (id) { return id[0] !== "c"; }).length);
    highlight(false);
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
  function readable() {  // the whole graph when it is readable, else its top at a readable size
    fitAll();
    if (scale() < 0.5) centre(full.w / 2, (box.clientHeight || full.h) / 1.6, 0.8);
  }
  function show(g, top) {  // centre on an element; a frame taller than the box shows its title
    if (!g) return;
    var s = Math.max(scale(), 0.8), x = parseFloat(g.getAttribute("data-x")), y = parseFloat(g.getAttribute("data-y"));
    centre(x, top ? y - 20 + (box.clientHeight || full.h) / s / 2 : y, s);
  }

  // wheel zooms once the graph is clicked (or with ctrl/cmd); otherwise the page scrolls
  var active = false;
  box.addEventListener("mouseleave", function () { active = false; });
  box.addEventListener("wheel", function (e) {
    if (!active && !e.ctrlKey && !e.metaKey) return;
    e.preventDefault();
    var r = box.getBoundingClientRect();
    var mx = vb.x + (e.clientX - r.left) / r.width * vb.w, my = vb.y + (e.clientY - r.top) / r.height * vb.h;
    var k = e.deltaY > 0 ? 1.2 : 1 / 1.2;
    vb = { x: mx - (mx - vb.x) * k, y: my - (my - vb.y) * k, w: vb.w * k, h: vb.h * k };
    setVB();
  }, { passive: false });
  var drag = null;
  box.addEventListener("mousedown", function (e) { active = true; drag = { x: e.clientX, y: e.clientY, vx: vb.x, vy: vb.y, moved: false }; });
  window.addEventListener("mouseup", function () { setTimeout(function () { drag = null; }, 0); });
  window.addEventListener("mousemove", function (e) {
    if (!drag || e.buttons !== 1) return;
    var r = box.getBoundingClientRect();
    if (Math.abs(e.clientX - drag.x) + Math.abs(e.clientY - drag.y) > 3) drag.moved = true;
    vb.x = drag.vx - (e.clientX - drag.x) / r.width * vb.w;
    vb.y = drag.vy - (e.clientY - drag.y) / r.height * vb.h;
    setVB();
  });

  // one selection, an op or a module, shown in the graph, the tree, the node table and the panel
  var tree = document.getElementById("module-tree");
  var treeBox = tree.parentNode;
  var treeRows = Array.prototype.slice.call(tree.querySelectorAll("tbody tr"));
  var treeOpen = new Set([0]);
  var current = null;  // {node: i} or {module: j}
  function treeRefresh() {
    treeRows.forEach(function (tr, j) {
      var ok = true;
      for (var p = mods[j].parent; p >= 0 && ok; p = mods[p].parent) ok = treeOpen.has(p);
      tr.classList.toggle("hidden", !ok);
      var tw = tr.querySelector("button.tw");
      if (tw) tw.textContent = treeOpen.has(j) ? "▾" : "▸";
    });
  }
  function rowOf(j) { while (j >= data.tree) j = mods[j].parent; return j; }  // a function's block: its module's row
  function graphItem(id) {
    if (id[0] === "n") return svg.querySelector('g.node[data-node="' + CSS.escape(nodes[+id.slice(1)].name) + '"]');
    var j = +id.slice(1);
    if (id[0] === "c" && flat.has(j)) {  // a module drawn as its op(s): the first
      var i = nodes.findIndex(function (n) { return n.module === j; });
      return i < 0 ? null : graphItem(itemOfNode(i));
    }
    return svg.querySelector((id[0] === "m" ? "g.block" : "g.cluster") + '[data-module="' + CSS.escape(mods[j].path) + '"]');
  }
  function highlight(move) {  // the current selection, in the graph as drawn now
    svg.querySelectorAll(".sel").forEach(function (x) { x.classList.remove("sel"); });
    if (!current) return null;
    var id = current.node !== undefined ? itemOfNode(current.node) : itemOfModule(current.module);
    var g = id === "c0" ? null : graphItem(id);
    if (g) {
      g.classList.add("sel");
      if (g.classList.contains("cluster")) {  // and its frame
        var frame = svg.querySelector('g.clusters rect[data-module="' + CSS.escape(g.getAttribute("data-module")) + '"]');
        if (frame) frame.classList.add("sel");
      }
      if (move) show(g, g.classList.contains("cluster"));
    }
    return g;
  }
  function selectRow(j) {
    document.querySelectorAll("#module-tree tr.sel").forEach(function (x) { x.classList.remove("sel"); });
    for (var p = mods[j].parent; p >= 0; p = mods[p].parent) treeOpen.add(p);
    treeRefresh();
    var tr = treeRows[j];
    tr.classList.add("sel");
    var top = tr.offsetTop, h = tr.offsetHeight;  // scroll the tree only when the row is out of it
    if (top < treeBox.scrollTop || top + h > treeBox.scrollTop + treeBox.clientHeight) {
      treeBox.scrollTop = top - treeBox.clientHeight / 2;
    }
  }
  function selectModule(j, move) {
    current = { module: j };
    highlight(move);
    selectRow(rowOf(j));
    info.textContent = mods[j].tip;
  }
  function reveal(j) {  // open every module above j; true when the graph changed
    var changed = false;
    chain[j].slice(0, -1).forEach(function (k) { if (!open.has(k)) { open.add(k); changed = true; } });
    return changed;
  }
  function focusNode(name, move) {
    var i = byName[name];
    current = null;
    if (i === undefined) {  // an op on Python numbers only: in the node table, not drawn
      highlight(false);
      document.querySelectorAll("#module-tree tr.sel").forEach(function (x) { x.classList.remove("sel"); });
      info.textContent = name + ": computes Python numbers only (shape arithmetic); not drawn, see the node table";
      return false;
    }
    var m = nodes[i].module;
    if (reveal(m) || (m > 0 && !open.has(m))) { open.add(m); draw(); }
    current = { node: i };
    highlight(move);
    selectRow(rowOf(m));  // the module it ran in
    info.textContent = nodes[i].tip;
    return true;
  }
  window.nhwcFocus = focusNode;  // the tables' and the strip's links (report.js)

  svg.addEventListener("click", function (e) {
    if (drag && drag.moved) return;
    var t = e.target.closest("g.node, g.block, g.cluster");
    if (!t) return;
    if (t.classList.contains("node")) {
      var name = t.getAttribute("data-node");
      focusNode(name, false);
      if (window.nhwcSelectRow) window.nhwcSelectRow(name);
      return;
    }
    var j = byPath[t.getAttribute("data-module")];
    if (t.classList.contains("block")) open.add(j); else open.delete(j);
    current = { module: j };
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
    status.textContent = "";
    open = openSet(data.open); draw(); readable();
  });
  document.getElementById("graph-more").addEventListener("click", function () {
    var closed = [];
    layout.nodes().forEach(function (id) { if (id[0] === "m") closed.push(+id.slice(1)); });
    status.textContent = "";
    if (!closed.length) { status.textContent = "Every module is open."; return; }
    var next = new Set(open);
    closed.forEach(function (j) { next.add(j); });
    var n = count(next);
    if (n > LIMIT) {
      status.textContent = "Opening every block would draw " + n + " blocks and ops (at most " + LIMIT +
        " are laid out at once): click the blocks to open, or a row of the module tree.";
      return;
    }
    open = next; draw(); readable();
  });
  treeRefresh();
  draw();
  readable();
  if (window.ResizeObserver) {  // first laid out later (inside a notebook's control): start again then
    var sized = box.clientWidth > 0;
    new ResizeObserver(function () {
      if (!sized && box.clientWidth > 0) { sized = true; readable(); }
    }).observe(box);
  }
})();
