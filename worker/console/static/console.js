// dms-worker console: refreshes a page's live part in place, and asks before destructive
// actions. No framework, nothing fetched from elsewhere; every page works without this file.
(function () {
  "use strict";

  function confirmations(root) {
    root.querySelectorAll("form[data-confirm]").forEach(function (form) {
      if (form.dataset.bound) return;
      form.dataset.bound = "1";
      form.addEventListener("submit", function (event) {
        if (!window.confirm(form.dataset.confirm)) event.preventDefault();
      });
    });
  }

  function enabled() {
    var box = document.getElementById("autorefresh");
    return !box || box.checked;
  }

  function refresh(live) {
    var seconds = parseInt(live.dataset.refresh || "0", 10);
    if (!seconds) return;
    window.setInterval(function () {
      if (!enabled() || document.hidden) return;
      // Never swap the content while someone is typing or clicking inside it.
      if (live.contains(document.activeElement) && document.activeElement !== document.body) return;
      fetch(window.location.href, {headers: {"X-DMS-Console-Refresh": "1"}, credentials: "same-origin"})
        .then(function (response) {
          if (response.status === 401 || response.redirected) { window.location.reload(); return null; }
          return response.ok ? response.text() : null;
        })
        .then(function (html) {
          // The server escaped every value: this is our own markup, and CSP forbids inline script.
          if (html !== null) { live.innerHTML = html; confirmations(live); }
        })
        .catch(function () { /* the next tick tries again */ });
    }, seconds * 1000);
  }

  document.addEventListener("DOMContentLoaded", function () {
    confirmations(document);
    var live = document.getElementById("live");
    if (live) refresh(live);
  });
})();
