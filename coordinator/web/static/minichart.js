/* minichart: a tiny SVG line chart for the swarm status page.
 * Written for this project (Apache-2.0, like the rest of swarm); no third-party code.
 *
 *   MiniChart.line(container, points, {width, height, color, yFormat, xFormat, emptyText, xInteger})
 *
 * points: array of [x, y] numbers (non-finite pairs are skipped). The container's children are
 * replaced. Text goes in through textContent only, so labels can never inject markup.
 */
(function (global) {
  "use strict";
  var SVG = "http://www.w3.org/2000/svg";

  function el(name, attrs, parent) {
    var node = document.createElementNS(SVG, name);
    for (var key in attrs) { if (Object.prototype.hasOwnProperty.call(attrs, key)) node.setAttribute(key, String(attrs[key])); }
    if (parent) parent.appendChild(node);
    return node;
  }

  /* "Nice" tick values covering [lo, hi]: steps of 1, 2 or 5 times a power of ten; with
   * ``integer`` (counts such as step numbers) the step is at least 1 and every tick an integer. */
  function niceTicks(lo, hi, count, integer) {
    if (!(hi > lo)) { var pad = integer ? 1 : Math.abs(lo) > 0 ? Math.abs(lo) * 0.1 : 1; lo -= pad; hi += pad; }
    var raw = (hi - lo) / Math.max(1, count);
    var mag = Math.pow(10, Math.floor(Math.log10(raw)));
    var norm = raw / mag;
    var step = (norm < 1.5 ? 1 : norm < 3 ? 2 : norm < 7 ? 5 : 10) * mag;
    if (integer) step = Math.max(1, Math.round(step));
    var start = Math.floor(lo / step) * step, end = Math.ceil(hi / step) * step;
    var ticks = [];
    for (var v = start; v <= end + step * 0.5; v += step) ticks.push(integer ? Math.round(v) : Math.abs(v) < step * 1e-9 ? 0 : v);
    return ticks;
  }

  function defaultFormat(v) {
    var a = Math.abs(v);
    if (a >= 1e9) return (v / 1e9).toFixed(1) + "G";
    if (a >= 1e6) return (v / 1e6).toFixed(1) + "M";
    if (a >= 1e4) return (v / 1e3).toFixed(0) + "k";
    if (a >= 100) return v.toFixed(0);
    if (a >= 1) return v.toFixed(2).replace(/\.?0+$/, "");
    if (a === 0) return "0";
    return v.toPrecision(2);
  }

  function line(container, points, opts) {
    opts = opts || {};
    var W = opts.width || 420, H = opts.height || 200;
    var m = { l: 48, r: 12, t: 8, b: 26 };
    var fmtY = opts.yFormat || defaultFormat, fmtX = opts.xFormat || defaultFormat;
    var pts = (points || []).filter(function (p) { return p && isFinite(p[0]) && isFinite(p[1]); });
    while (container.firstChild) container.removeChild(container.firstChild);
    var svg = el("svg", { width: W, height: H, viewBox: "0 0 " + W + " " + H, role: "img" }, container);
    if (pts.length === 0) {
      var t = el("text", { x: W / 2, y: H / 2, "text-anchor": "middle", fill: "#6b7383", "font-size": 12 }, svg);
      t.textContent = opts.emptyText || "no data yet";
      return svg;
    }
    var xs = pts.map(function (p) { return p[0]; }), ys = pts.map(function (p) { return p[1]; });
    var xt = niceTicks(Math.min.apply(null, xs), Math.max.apply(null, xs), 5, !!opts.xInteger);
    var yt = niceTicks(Math.min.apply(null, ys), Math.max.apply(null, ys), 4);
    var x0 = xt[0], x1 = xt[xt.length - 1], y0 = yt[0], y1 = yt[yt.length - 1];
    var sx = function (x) { return m.l + (x - x0) / (x1 - x0 || 1) * (W - m.l - m.r); };
    var sy = function (y) { return H - m.b - (y - y0) / (y1 - y0 || 1) * (H - m.t - m.b); };
    var axis = el("g", { "font-size": 10, fill: "#6b7383" }, svg);
    yt.forEach(function (v) {
      el("line", { x1: m.l, x2: W - m.r, y1: sy(v), y2: sy(v), stroke: "#eceff3" }, axis);
      var t = el("text", { x: m.l - 4, y: sy(v) + 3, "text-anchor": "end" }, axis);
      t.textContent = fmtY(v);
    });
    xt.forEach(function (v) {
      var t = el("text", { x: sx(v), y: H - m.b + 14, "text-anchor": "middle" }, axis);
      t.textContent = fmtX(v);
    });
    el("line", { x1: m.l, x2: W - m.r, y1: H - m.b, y2: H - m.b, stroke: "#9aa3b2" }, axis);
    el("line", { x1: m.l, x2: m.l, y1: m.t, y2: H - m.b, stroke: "#9aa3b2" }, axis);
    var d = pts.map(function (p, i) { return (i ? "L" : "M") + sx(p[0]).toFixed(1) + "," + sy(p[1]).toFixed(1); }).join("");
    el("path", { d: d, fill: "none", stroke: opts.color || "#2b6cb0", "stroke-width": 1.6 }, svg);
    var last = pts[pts.length - 1];
    el("circle", { cx: sx(last[0]), cy: sy(last[1]), r: 3, fill: opts.color || "#2b6cb0" }, svg);
    var title = el("title", {}, svg);
    title.textContent = "last: x=" + fmtX(last[0]) + " y=" + fmtY(last[1]);
    return svg;
  }

  global.MiniChart = { line: line, niceTicks: niceTicks, format: defaultFormat };
})(window);
