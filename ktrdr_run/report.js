(function () {
  "use strict";
  var node = document.getElementById("hover-data");
  var tip = document.getElementById("tooltip");
  if (!node || !tip) { return; }
  var data = JSON.parse(node.textContent);
  var lines = document.querySelectorAll("svg.chart .crosshair");
  function nearest(x) {
    var lo = 0, hi = data.x.length - 1;
    while (lo < hi) {
      var mid = (lo + hi) >> 1;
      if (data.x[mid] < x) { lo = mid + 1; } else { hi = mid; }
    }
    if (lo > 0 && x - data.x[lo - 1] < data.x[lo] - x) { lo -= 1; }
    return lo;
  }
  function hide() {
    tip.hidden = true;
    lines.forEach(function (line) { line.style.visibility = "hidden"; });
  }
  document.querySelectorAll("svg.chart").forEach(function (svg) {
    svg.addEventListener("mousemove", function (ev) {
      var ctm = svg.getScreenCTM();
      if (!ctm || !data.x.length) { return; }
      var i = nearest(new DOMPoint(ev.clientX, ev.clientY).matrixTransform(ctm.inverse()).x);
      lines.forEach(function (line) {
        line.setAttribute("x1", data.x[i]);
        line.setAttribute("x2", data.x[i]);
        line.style.visibility = "visible";
      });
      tip.textContent = data.t[i] + "  \\u00b7  equity " + data.e[i] + "  \\u00b7  drawdown " + data.d[i];
      tip.hidden = false;
      var left = ev.pageX + 14;
      if (ev.clientX + tip.offsetWidth + 24 > window.innerWidth) { left = ev.pageX - tip.offsetWidth - 14; }
      tip.style.left = left + "px";
      tip.style.top = (ev.pageY + 14) + "px";
    });
    svg.addEventListener("mouseleave", hide);
  });
})();
