/* radcohort console: live regions without a library (docs/console.md).
 *
 * An element with data-poll="URL" is replaced, every data-poll-ms milliseconds (default 3000), by the
 * HTML fragment that URL returns (same origin, the session cookie goes along). The fragment carries its
 * own data-poll while the job is still going, or data-final once it has ended: polling stops by itself,
 * so a page shows a job's end without a reload. A 401 (signed out) stops polling and shows a note.
 * About the size of HTMX's hx-get + hx-trigger="every 3s" + hx-swap="outerHTML"; no eval, no inline code.
 */
(function () {
  "use strict";

  function schedule(el) {
    var url = el.getAttribute("data-poll");
    if (!url || el.__radcohortPolling) return;
    el.__radcohortPolling = true;
    var ms = parseInt(el.getAttribute("data-poll-ms") || "3000", 10);
    window.setTimeout(function () { refresh(el, url); }, Math.max(ms, 500));
  }

  function refresh(el, url) {
    if (!document.body.contains(el)) return;
    fetch(url, { credentials: "same-origin", headers: { "X-Console-Poll": "1" }, cache: "no-store" })
      .then(function (resp) {
        if (resp.status === 401) { note(el, "Signed out: reload the page to sign in again."); return null; }
        if (!resp.ok) { throw new Error("HTTP " + resp.status); }
        return resp.text();
      })
      .then(function (html) {
        if (html === null) return;
        var tpl = document.createElement("template");
        tpl.innerHTML = html.trim();
        var fresh = tpl.content.firstElementChild;
        if (!fresh) return;
        el.replaceWith(fresh);
        scan(fresh.parentNode || document);
      })
      .catch(function () {
        // the server may be restarting: try again later, without flooding it
        el.__radcohortPolling = false;
        el.setAttribute("data-poll-ms", "10000");
        schedule(el);
      });
  }

  function note(el, text) {
    var p = document.createElement("p");
    p.className = "warn";
    p.textContent = text;
    el.insertBefore(p, el.firstChild);
  }

  function scan(root) {
    var found = (root.querySelectorAll ? root.querySelectorAll("[data-poll]") : []);
    for (var i = 0; i < found.length; i++) schedule(found[i]);
  }

  // a confirmation for destructive buttons (class "danger")
  document.addEventListener("submit", function (ev) {
    var btn = ev.submitter || (ev.target && ev.target.querySelector("button.danger"));
    if (btn && btn.classList && btn.classList.contains("danger") && !window.confirm(btn.textContent.trim() + "?")) {
      ev.preventDefault();
    }
  });

  document.addEventListener("DOMContentLoaded", function () { scan(document); });
})();
