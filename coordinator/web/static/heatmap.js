/* Heatmaps of the swarm's link matrices on a canvas, for the swarm status page.
 * Written for this project (Apache-2.0); no third-party code.
 *
 *   SwarmHeatmap.draw(figure, ids, matrix, {goodHigh, format, label, ageText, tip})
 *
 * figure holds a <canvas> and a .legend; matrix[i][j] is the value from ids[i] to ids[j] or null
 * (not measured). goodHigh: high values are good (bandwidth) or bad (latency). label(id) names a
 * node; ageText(i, j) says how old a measurement is; tip is the element shown on hover. Names
 * reach the page only through canvas fillText and textContent.
 */
(function (global) {
  "use strict";

  function h(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  /* A sequential palette (dark blue = good, pale yellow = poor); t in [0, 1], 1 = good. */
  var PALETTE = [[255, 250, 200], [199, 233, 180], [127, 205, 187], [65, 182, 196], [29, 145, 192], [34, 94, 168], [12, 44, 132]];
  function colour(t) {
    t = Math.max(0, Math.min(1, t)) * (PALETTE.length - 1);
    var i = Math.min(PALETTE.length - 2, Math.floor(t)), f = t - i;
    var a = PALETTE[i], b = PALETTE[i + 1];
    return "rgb(" + [0, 1, 2].map(function (k) { return Math.round(a[k] + (b[k] - a[k]) * f); }).join(",") + ")";
  }
  function gradientCss() {
    var stops = []; for (var k = 0; k <= 10; k++) stops.push(colour(k / 10));
    return "linear-gradient(to right," + stops.join(",") + ")";
  }

  function draw(fig, ids, matrix, opts) {
    var goodHigh = !!opts.goodHigh, fmt = opts.format, nameOf = opts.label, tip = opts.tip;
    var canvas = fig.querySelector("canvas");
    tip.hidden = true;  // its text may describe a cell that changed; the next mouse move redraws it
    var n = ids.length;
    var labels = n > 0 && n <= 16;
    var ctx = canvas.getContext("2d");
    var LABEL_FONT = "11px sans-serif";
    // Cut long names in the middle: volunteers' names often differ only at the end.
    function shortLabel(id) { var s = nameOf(id); return s.length > 14 ? s.slice(0, 6) + "\u2026" + s.slice(-7) : s; }
    // The label margin fits the longest label (not a fixed width), so a small swarm's heatmap
    // box is the size of its content.
    var margin = 0;
    if (labels) {
      ctx.font = LABEL_FONT;
      for (var q = 0; q < n; q++) margin = Math.max(margin, ctx.measureText(shortLabel(ids[q])).width);
      margin = Math.ceil(margin) + 8;
    }
    var cell = n ? Math.min(48, Math.max(2, Math.floor(360 / n))) : 0;
    var size = margin + cell * n;
    var dpr = window.devicePixelRatio || 1;
    canvas.width = Math.max(1, size) * dpr; canvas.height = Math.max(1, size) * dpr;
    canvas.style.width = size + "px"; canvas.style.height = size + "px";
    canvas.setAttribute("data-n", String(n)); canvas.setAttribute("data-margin", String(margin)); canvas.setAttribute("data-cell", String(cell));
    ctx = canvas.getContext("2d");  // resizing the canvas reset its state
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, size, size);
    var lo = Infinity, hi = -Infinity;
    matrix.forEach(function (row, i) { row.forEach(function (v, j) { if (i !== j && v !== null && v > 0) { lo = Math.min(lo, v); hi = Math.max(hi, v); } }); });
    var logScale = hi > 0 && lo > 0 && hi / lo > 20;
    function t(v) {
      if (!(hi > lo)) return 0.7;
      var x = logScale ? (Math.log(v) - Math.log(lo)) / (Math.log(hi) - Math.log(lo)) : (v - lo) / (hi - lo);
      return goodHigh ? x : 1 - x;
    }
    for (var i = 0; i < n; i++) for (var j = 0; j < n; j++) {
      var v = matrix[i][j];
      ctx.fillStyle = i === j ? "#c9ced8" : v === null ? "#eceef2" : colour(t(v));
      ctx.fillRect(margin + j * cell, margin + i * cell, cell - (cell > 4 ? 1 : 0), cell - (cell > 4 ? 1 : 0));
    }
    if (labels) {
      ctx.fillStyle = "#1d2330"; ctx.font = LABEL_FONT; ctx.textBaseline = "middle";
      for (var k = 0; k < n; k++) {
        var label = shortLabel(ids[k]);
        ctx.textAlign = "right"; ctx.fillText(label, margin - 4, margin + k * cell + cell / 2);
        ctx.save(); ctx.translate(margin + k * cell + cell / 2, margin - 4); ctx.rotate(-Math.PI / 2);
        ctx.textAlign = "left"; ctx.fillText(label, 0, 0); ctx.restore();
      }
    }
    // legend
    var legend = fig.querySelector(".legend");
    var bar = h("span", "bar"); bar.style.background = gradientCss();
    var parts = [];
    if (hi >= lo) {
      parts.push(h("span", null, goodHigh ? fmt(lo) : fmt(hi)), bar, h("span", null, goodHigh ? fmt(hi) : fmt(lo)));
      if (logScale) parts.push(h("span", null, "(log scale)"));
    }
    parts.push(h("span", "swatch"), h("span", null, "not measured"));
    legend.replaceChildren.apply(legend, parts);
    // hover
    canvas.onmousemove = function (ev) {
      var j = Math.floor((ev.offsetX - margin) / cell), i = Math.floor((ev.offsetY - margin) / cell);
      if (!(i >= 0 && j >= 0 && i < n && j < n)) { tip.hidden = true; return; }
      var v = matrix[i][j];
      var text = nameOf(ids[i]) + " \u2192 " + nameOf(ids[j]) + "\n" +
        (i === j ? "same node" : v === null ? "not measured" : fmt(v) + "\n" + opts.ageText(i, j));
      tip.textContent = text; tip.hidden = false;
      tip.style.left = (ev.clientX + 12) + "px"; tip.style.top = (ev.clientY + 12) + "px";
    };
    canvas.onmouseleave = function () { tip.hidden = true; };
  }

  global.SwarmHeatmap = { draw: draw, colour: colour };
})(window);
