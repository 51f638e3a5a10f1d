// Progressive enhancement: the configuration log updates itself while its tests run, and a
// signed-in browser that opens a page's plain address (/setup) goes on to its session's page.
// Without this script every page is complete and a reload shows the same state.
"use strict";

// A session's pages live under a secret prefix (/s/<token>/), the only path its cookie is sent
// to: a server on another port of this host never sees the cookie (browsers ignore ports when
// sending cookies, but not when keeping localStorage). The prefix is kept in this origin's
// localStorage so that the sign-in page at a plain address can go on to it; it opens nothing
// without the HttpOnly cookie, and it is forgotten at sign-out or when its session has ended.
(function () {
  var KEY = "authgw-console-base";
  var PREFIX = /^\/s\/[A-Za-z0-9_-]{16,128}\/$/;
  var data = document.body.dataset;
  try {
    var kept = window.localStorage.getItem(KEY);
    if (data.base) {
      if (PREFIX.test(data.base)) window.localStorage.setItem(KEY, data.base);
    } else if (data.signedOut === "yes") {
      if (location.pathname.indexOf("/s/") === 0) {
        // Signed out, or this session ended: its prefix leads nowhere now.
        if (kept && location.pathname.indexOf(kept) === 0) window.localStorage.removeItem(KEY);
      } else if (kept && PREFIX.test(kept) && data.resume !== undefined &&
                 /^[a-z0-9\/]*$/.test(data.resume)) {
        location.replace(kept + data.resume);
      }
    }
  } catch (e) {
    // localStorage disabled: the plain addresses show the sign-in page, nothing more.
  }
})();

(function () {
  var summary = document.getElementById("summary");
  if (!summary || summary.dataset.finished === "yes") return;
  var api = summary.dataset.api;
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
    fetch(api, { credentials: "same-origin", cache: "no-store" })
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
