// Progressive enhancement: the configuration log updates itself while its tests run.
// Without this script the page is complete and a reload shows the same state.
"use strict";
(function () {
  var summary = document.getElementById("summary");
  if (!summary || summary.dataset.finished === "yes") return;
  var run = summary.dataset.run;
  var list = document.getElementById("tests");

  function row(test) {
    var item = document.getElementById("test-" + test.seq);
    if (!item) {
      item = document.createElement("li");
      item.id = "test-" + test.seq;
      ["badge", "label", "name", "what", "detail", "hint", "check"].forEach(function (part) {
        var el = document.createElement(part === "label" ? "strong" : part === "name" ? "code" : part === "badge" ? "span" : "div");
        el.className = part;
        item.appendChild(el);
        if (part === "label" || part === "name") item.appendChild(document.createTextNode(" "));
      });
      list.appendChild(item);
    }
    item.className = "test " + test.status;
    item.dataset.name = test.name;
    // textContent only: details come from servers and settings, never markup.
    item.querySelector(".badge").textContent = test.status;
    item.querySelector(".label").textContent = test.label;
    item.querySelector(".name").textContent = test.name;
    item.querySelector(".what").textContent = test.what;
    item.querySelector(".detail").textContent = test.detail;
    item.querySelector(".hint").textContent = test.hint ? "Hint: " + test.hint : "";
    item.querySelector(".check").textContent =
      (test.status === "fail" || test.status === "warn") && test.check ? "If this test fails: " + test.check : "";
  }

  function poll() {
    fetch("/api/log/" + encodeURIComponent(run), { credentials: "same-origin", cache: "no-store" })
      .then(function (response) { return response.ok ? response.json() : Promise.reject(response.status); })
      .then(function (data) {
        data.rows.forEach(row);
        if (data.finished) {
          summary.textContent = data.summary;
          summary.dataset.finished = "yes";
        } else {
          setTimeout(poll, 500);
        }
      })
      .catch(function () { setTimeout(poll, 2000); });
  }
  poll();
})();
